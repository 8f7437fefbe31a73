"""bench/cli_startup: how long `mindyouzhi` takes to answer before any model work starts.

Each command runs once to fill the bytecode cache (what an installed package has), then
``--runs`` more times; the median wall time is reported next to the bare interpreter's start.
Also lists which heavy libraries ``import mindyouzhi.cli`` loads (target: none, and < 0.4 s for
``--help``, every subcommand's ``--help`` and the ``data`` commands).

    .venv/bin/python bench/cli_startup.py [--runs 7]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

COMMANDS = [["--help"], ["convert", "--help"], ["eval", "bench", "--help"], ["train", "--help"],
            ["serve", "--help"], ["capacity", "--help"], ["export", "--help"], ["data", "compress", "--help"],
            ["data", "amounts", "to-upper", "1680.32"]]
HEAVY = ("mindspore", "matplotlib", "transformers", "torch", "numpy", "scipy", "tokenizers", "safetensors")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.setdefault("PYTHONPYCACHEPREFIX", str(common.CACHE / "pycache"))
    return env


def median_seconds(cmd: list[str], runs: int) -> float:
    subprocess.run(cmd, capture_output=True, env=_env(), check=True)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(cmd, capture_output=True, env=_env(), check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def heavy_imports() -> list[str]:
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import mindyouzhi.cli"], capture_output=True,
                          text=True, env=_env(), check=True)
    loaded = {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
    return sorted(loaded & set(HEAVY))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    rows = {"python -c pass": median_seconds([sys.executable, "-c", "pass"], args.runs)}
    for words in COMMANDS:
        rows["mindyouzhi " + " ".join(words)] = median_seconds([common.cli(), *words], args.runs)
    heavy = heavy_imports()
    for name, seconds in rows.items():
        print(f"{seconds:6.3f} s  {name}")
    print(f"heavy libraries imported by `import mindyouzhi.cli`: {', '.join(heavy) or 'none'}")
    common.save("cli_startup", {"runs": args.runs, "median_seconds": rows, "heavy_imports": heavy})


if __name__ == "__main__":
    main()
