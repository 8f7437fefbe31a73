"""mindyouzhi: GQA → MLA conversion (TransMLA + YouZhi layer-adaptive FreqFold) for MindSpore."""

__version__ = "0.1.0"

import os as _os

# The CPU kernels of ops/ (bf16 products, paged attention) run on OpenMP threads between MindSpore's
# own operators, on the same cores: idle OpenMP workers must sleep, not spin (spinning made a bf16
# layer's gradient graph 3× slower, docs/training.md "CPU precision").  libgomp reads this once
# when it loads — which `import mindspore` does —, so it is set before anything imports MindSpore.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# MindSpore's own log lines (graph recompilation notices, C++ warnings, build banners) stay off the
# terminal: ERROR and above only, unless the user set GLOG_v or passes ``mindyouzhi --verbose``.
# Like OMP_WAIT_POLICY this must be set before MindSpore is imported, which happens lazily.
_os.environ.setdefault("GLOG_v", "3")
