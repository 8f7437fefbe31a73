"""bench/safetensors_rss: peak resident memory of reading a whole checkpoint tensor by tensor, and of
writing it back with the header-first writer (no spill file, each tensor written once).

Runs in a process that imports only numpy and ``safetensors_io`` (no MindSpore), so the peak RSS
above the starting point is what the reader/writer hold: about one tensor (the largest) if the
reads are not memory-mapped pages that stay resident, the file size if they were.

    .venv/bin/python bench/safetensors_rss.py [--model DIR]   (default: SmolLM2-135M from bench/common)
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    model = args.model or common.smollm2()
    from mindyouzhi.convert_weights.safetensors_io import SafetensorsStore, ShardedWriter

    store = SafetensorsStore(model)
    names = store.keys()
    file_bytes = sum(p.stat().st_size for p in Path(model).glob("*.safetensors"))
    largest = 0
    start = peak_rss()
    started = time.perf_counter()
    for name in names:
        largest = max(largest, store.get(name).nbytes)  # read as fp32, dropped at once
    read_seconds = time.perf_counter() - started
    after_read = peak_rss()
    with tempfile.TemporaryDirectory(dir=Path(model).parent) as tmp:
        writer = ShardedWriter(tmp, {name: store.shape(name) for name in names})
        started = time.perf_counter()
        for name in names:
            writer.add(name, store.get(name))
        writer.close()
        write_seconds = time.perf_counter() - started
    after_write = peak_rss()
    result = {"model": str(model), "tensors": len(names), "file_bytes": file_bytes, "largest_tensor_fp32_bytes": largest,
              "peak_rss_start": start, "peak_rss_after_read": after_read, "peak_rss_after_write": after_write,
              "read_growth": after_read - start, "write_growth": after_write - after_read,
              "read_seconds": read_seconds, "write_seconds": write_seconds, "machine": common.machine()}
    for key in ("file_bytes", "largest_tensor_fp32_bytes", "peak_rss_start", "read_growth", "write_growth"):
        print(f"{key:28s} {result[key] / 2**20:9.1f} MiB")
    print(f"{'read / write seconds':28s} {read_seconds:9.2f} / {write_seconds:.2f}")
    common.save("safetensors_rss", result)


if __name__ == "__main__":
    main()
