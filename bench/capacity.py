"""Benchmark: how many concurrent (1k in + 1k out) requests one KV budget holds, GQA vs MLA,
measured by filling a real pool in the engine.

    python bench/capacity.py --original /tmp/smol --converted /tmp/smol-mla \\
        [--kv-memory 384MiB] [--prompt-len 1024] [--gen-len 1024]

For each model the engine gets a pool of exactly ``--kv-memory`` bytes and one more identical
request than the arithmetic predicts; ``reserve`` admission holds a request only if its whole
life fits, so every sequence counted as held really had its full context in the pool at the same
time (the run ends when that wave produces its last token; the extra request is still waiting).

Target: measured MLA/GQA concurrency ≥ 0.95 × the ideal byte ratio
(the paper reports 2.69× against an ideal 3.56× for openPangu-7B).  Prints the figures and writes
``bench/results/capacity.json``.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mindyouzhi.io_utils import write_json_atomic  # noqa: E402
from mindyouzhi.models.runner import ModelRunner  # noqa: E402
from mindyouzhi.serve.capacity import format_bytes, measure, parse_bytes  # noqa: E402

RESULTS = REPO / "bench" / "results" / "capacity.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", required=True, type=Path, help="GQA model directory (e.g. SmolLM2-135M)")
    parser.add_argument("--converted", required=True, type=Path, help="its MLA conversion")
    parser.add_argument("--kv-memory", default="384MiB", help="the KV pool budget, the same for both models")
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--gen-len", type=int, default=1024)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--attention", default="auto", help="decode attention: auto | custom | gather")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    budget = parse_bytes(args.kv_memory, "--kv-memory")
    print(f"KV budget {format_bytes(budget)}, requests of {args.prompt_len} + {args.gen_len} tokens", flush=True)
    measured = {}
    for name, directory in (("gqa", args.original), ("mla", args.converted)):
        runner = ModelRunner.from_dir(directory, with_tokenizer=False)
        started = time.perf_counter()
        measured[name] = measure(runner, budget, args.prompt_len, args.gen_len, args.attention, args.block_size)
        result = measured[name]
        print(f"{name.upper()}: {result['kv_bytes_per_token']:,} B/token → held {result['held']} sequences at once "
              f"(predicted {result['predicted']}, pool peak {result['peak_blocks']}/{result['usable_blocks']} blocks), "
              f"{result['tokens_per_second']:.1f} generated tok/s incl. prefill, "
              f"{result['decode_tokens_per_second']:.1f} decode tok/s, {time.perf_counter() - started:.0f} s", flush=True)
        del runner

    ideal = measured["gqa"]["kv_bytes_per_token"] / measured["mla"]["kv_bytes_per_token"]
    ratio = measured["mla"]["held"] / measured["gqa"]["held"]
    met = ratio >= 0.95 * ideal
    print(f"concurrency MLA/GQA {ratio:.2f}× against an ideal byte ratio of {ideal:.2f}× "
          f"({ratio / ideal:.1%} of ideal; target ≥ 95%: {'met' if met else 'MISSED'})")
    write_json_atomic(args.out, {
        "benchmark": "capacity", "original": str(args.original), "converted": str(args.converted),
        "kv_budget_bytes": budget, "prompt_len": args.prompt_len, "gen_len": args.gen_len,
        "block_size": args.block_size, "measured": measured, "ideal_byte_ratio": ideal,
        "measured_concurrency_ratio": ratio, "fraction_of_ideal": ratio / ideal, "target_met": met,
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
    })
    print(f"wrote {args.out}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
