"""Progress bars on stderr (stdout stays clean for --json)."""
from __future__ import annotations

import os
import sys

from tqdm import tqdm


def progress_bar(total: int, desc: str, unit: str = "it", **kwargs) -> tqdm:
    disable = os.environ.get("MINDYOUZHI_NO_PROGRESS") == "1"
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False,
                disable=disable, unit_scale=unit == "tok", **kwargs)
