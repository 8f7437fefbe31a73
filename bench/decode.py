"""Benchmark: decode throughput and KV bytes, GQA vs absorbed MLA, in the same paged engine.

    python bench/decode.py --original /tmp/smol --converted /tmp/smol-mla \\
        [--contexts 512,1024,2048,4096,8192] [--batch 4] [--steps 6] [--attention custom,gather]

For every context length, each model gets a KV pool holding ``--batch`` sequences of that many
tokens, and runs batched decode steps through ``PagedModel.decode`` — the engine's own forward
(paged pool, block tables, one compiled call per layer) — with the decode attention implemented
by the custom CPU kernel and by plain MindSpore ops.  The contexts are *synthetic*: random cache
entries written straight into each sequence's own blocks, because decode cost does not depend on
the values and prefilling 8k-token contexts on two CPU cores would dominate the run.  Steps of
the two models alternate, so machine noise hits both alike; medians are reported.

Checks: MLA KV bytes per token = (kv_lora_rank + rope_dim)·4·layers
exactly (GQA: 2·kv_heads·head_dim·4·layers); MLA decode not slower than GQA from 2k context on.
Prints the table and writes ``bench/results/decode.json``.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mindyouzhi.io_utils import write_json_atomic  # noqa: E402
from mindyouzhi.models.runner import ModelRunner  # noqa: E402
from mindyouzhi.serve.attention import select_attention  # noqa: E402
from mindyouzhi.serve.kv_pool import KVPool  # noqa: E402
from mindyouzhi.serve.paged_model import PagedModel  # noqa: E402

RESULTS = REPO / "bench" / "results" / "decode.json"
BLOCK_SIZE = 16


def expected_bytes_per_token(config) -> int:
    """The formula, from the config alone (not from the pool being checked)."""
    total = 0
    for layer in range(config.num_hidden_layers):
        if config.is_mla(layer):
            total += (int(config.mla.kv_lora_rank[layer]) + config.mla.rope_dim) * 4
        else:
            total += 2 * config.num_key_value_heads * config.head_dim * 4
    return total


class Contestant:
    """One model with a pool of ``batch`` synthetic contexts of ``context`` tokens."""

    def __init__(self, name: str, runner, context: int, batch: int, steps: int, attention, seed: int):
        self.name, self.runner, self.context = name, runner, context
        blocks_per_sequence = -(-(context + steps + 2) // BLOCK_SIZE)
        self.pool = KVPool(runner.config, batch * blocks_per_sequence + 1, BLOCK_SIZE)
        rng = np.random.default_rng(seed)
        for first, second in self.pool.arrays:
            for array in (first, second):  # fill in slices: a whole 8k GQA pool is >1 GB
                for block in range(0, array.shape[0], 64):
                    chunk = array[block:block + 64]
                    chunk[...] = rng.standard_normal(chunk.shape, dtype=np.float32)
        self.tables = [self.pool.allocator.allocate(blocks_per_sequence) for _ in range(batch)]
        self.model = PagedModel(runner, self.pool, attention)
        self.tokens = rng.integers(10, runner.config.vocab_size, batch).tolist()
        self.position = context
        self.times: list[float] = []

    def step(self, timed: bool) -> None:
        started = time.perf_counter()
        logits = self.model.decode(self.tokens, [self.position] * len(self.tokens), self.tables)
        if timed:
            self.times.append(time.perf_counter() - started)
        self.tokens = logits.argmax(-1).tolist()
        self.position += 1


def measure(runners: dict, context: int, batch: int, steps: int, attention, seed: int) -> dict:
    contestants = [Contestant(name, runner, context, batch, steps, attention, seed) for name, runner in runners.items()]
    for contestant in contestants:  # compile and warm up
        contestant.step(timed=False)
        contestant.step(timed=False)
    for _ in range(steps):
        for contestant in contestants:
            contestant.step(timed=True)
    result = {}
    for contestant in contestants:
        median = float(np.median(contestant.times))
        result[contestant.name] = {
            "step_seconds_median": median, "tokens_per_second": batch / median,
            "kv_bytes_per_token": contestant.pool.bytes_per_token,
            "kv_bytes_per_sequence": contestant.pool.bytes_per_token * context,
            "step_seconds": contestant.times,
        }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", required=True, type=Path, help="GQA model directory (e.g. SmolLM2-135M)")
    parser.add_argument("--converted", required=True, type=Path, help="its MLA conversion")
    parser.add_argument("--contexts", default="512,1024,2048,4096,8192")
    parser.add_argument("--batch", type=int, default=4, help="sequences decoded together")
    parser.add_argument("--steps", type=int, default=6, help="timed decode steps per model and context")
    parser.add_argument("--attention", default="custom,gather", help="decode attention implementations to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    runners = {"gqa": ModelRunner.from_dir(args.original, with_tokenizer=False),
               "mla": ModelRunner.from_dir(args.converted, with_tokenizer=False)}
    # A context of the model's full length (8192 for SmolLM2) leaves no position to decode into:
    # such a context is shortened by the decode steps it needs, and reported as measured.
    limit = min(r.config.max_position_embeddings for r in runners.values())
    contexts = [min(int(c), limit - args.steps - 3) for c in args.contexts.split(",")]

    kv_check = {}
    for name, runner in runners.items():
        pool = KVPool(runner.config, 2, BLOCK_SIZE)
        kv_check[name] = {"pool_bytes_per_token": pool.bytes_per_token,
                          "formula_bytes_per_token": expected_bytes_per_token(runner.config),
                          "exact": pool.bytes_per_token == expected_bytes_per_token(runner.config)}
    mla_config = runners["mla"].config
    print(f"KV bytes per token: GQA {kv_check['gqa']['pool_bytes_per_token']:,}  "
          f"MLA {kv_check['mla']['pool_bytes_per_token']:,} "
          f"(= ({mla_config.mla.kv_lora_rank[0]} + {mla_config.mla.rope_dim})·4·{mla_config.num_hidden_layers}: "
          f"{'exact' if kv_check['mla']['exact'] else 'MISMATCH'})")

    runs = []
    for attention_name in args.attention.split(","):
        attention = select_attention(attention_name)
        for context in contexts:
            result = measure(runners, context, args.batch, args.steps, attention, args.seed)
            ratio = result["mla"]["tokens_per_second"] / result["gqa"]["tokens_per_second"]
            runs.append({"attention": attention.name, "context": context, "batch": args.batch, **result,
                         "mla_over_gqa_speed": ratio})
            print(f"{attention.name:>6} ctx {context:>5}: GQA {result['gqa']['tokens_per_second']:7.1f} tok/s   "
                  f"MLA {result['mla']['tokens_per_second']:7.1f} tok/s   MLA/GQA {ratio:5.2f}×   "
                  f"KV/seq {result['gqa']['kv_bytes_per_sequence'] / 2**20:7.1f} → "
                  f"{result['mla']['kv_bytes_per_sequence'] / 2**20:6.1f} MiB", flush=True)

    long_context = [run for run in runs if run["context"] >= 2048]
    target_speed = all(run["mla_over_gqa_speed"] >= 1.0 for run in long_context)
    target_bytes = all(check["exact"] for check in kv_check.values())
    print(f"target: MLA KV bytes exact: {'met' if target_bytes else 'MISSED'}; "
          f"MLA not slower than GQA at ≥2k context: {'met' if target_speed else 'MISSED'}")
    write_json_atomic(args.out, {
        "benchmark": "decode", "original": str(args.original), "converted": str(args.converted),
        "block_size": BLOCK_SIZE, "batch": args.batch, "steps": args.steps, "kv_bytes_check": kv_check,
        "runs": runs, "targets": {"mla_kv_bytes_exact": target_bytes, "mla_not_slower_from_2k": target_speed},
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "context_contents": "synthetic random cache entries (decode cost is value-independent)",
    })
    print(f"wrote {args.out}")
    return 0 if target_bytes and target_speed else 1


if __name__ == "__main__":
    sys.exit(main())
