"""Benchmark: decode throughput and KV bytes, GQA vs absorbed MLA, in the same paged engine, in
each forward precision.

    python bench/decode.py --original /tmp/smol [--converted /tmp/smol-mla] \\
        [--contexts 512,1024,2048,4096,8192] [--batch 8] [--steps 6] [--attention custom,gather] \\
        [--precisions fp32,bf16] [--greedy-tokens 64]

Every model runs in every ``--precisions`` entry (fp32: plain MindSpore ops, the path before
issue 23; bf16: the runner's bf16 kernels, fused layer steps and one decode graph per step — with
``--attention custom`` its layers are the fused attention steps, marked "(fused step)"), as
separate contestants of the same alternating loop, so the bf16/fp32 ratio is a same-run figure.
``--greedy-tokens N`` also runs real greedy generation through ``Engine.generate`` — --batch
prompts together, N new tokens each (the eval generation tasks' path) — per model and precision,
and reports decode tokens/s and how many tokens each precision shares with fp32.

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
import os
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
            "fused_decode_step": contestant.model.fused_decode,
            "step_seconds": contestant.times,
        }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", required=True, type=Path, help="GQA model directory (e.g. SmolLM2-135M)")
    parser.add_argument("--converted", type=Path, default=None, help="its MLA conversion (optional)")
    parser.add_argument("--contexts", default="512,1024,2048,4096,8192")
    parser.add_argument("--batch", type=int, default=8, help="sequences decoded together")
    parser.add_argument("--precisions", default="fp32,bf16", help="forward precisions to run (fp32, bf16)")
    parser.add_argument("--greedy-tokens", type=int, default=0, help="also time greedy generation of N tokens")
    parser.add_argument("--steps", type=int, default=6, help="timed decode steps per model and context")
    parser.add_argument("--attention", default="custom,gather", help="decode attention implementations to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    models = {"gqa": args.original, **({"mla": args.converted} if args.converted else {})}
    precisions = args.precisions.split(",")
    runners = {f"{name}-{precision}" if precision != "fp32" else name:
               ModelRunner.from_dir(path, with_tokenizer=False, precision=precision)
               for name, path in models.items() for precision in precisions}
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
    print("KV bytes per token: " + "  ".join(f"{name} {check['pool_bytes_per_token']:,} "
                                             f"({'exact' if check['exact'] else 'MISMATCH'})"
                                             for name, check in kv_check.items()))

    runs = []
    for attention_name in args.attention.split(","):
        attention = select_attention(attention_name)
        for context in contexts:
            result = measure(runners, context, args.batch, args.steps, attention, args.seed)
            run = {"attention": attention.name, "context": context, "batch": args.batch, **result}
            if "mla" in result:
                run["mla_over_gqa_speed"] = result["mla"]["tokens_per_second"] / result["gqa"]["tokens_per_second"]
            for name in result:
                if name.endswith("-bf16"):
                    run[f"{name}_over_fp32_speed"] = (result[name]["tokens_per_second"]
                                                      / result[name[:-len("-bf16")]]["tokens_per_second"])
            runs.append(run)
            speeds = "   ".join(f"{name}{' (fused step)' if value['fused_decode_step'] else ''} "
                                f"{value['tokens_per_second']:7.1f} tok/s" for name, value in result.items())
            ratios = "   ".join(f"{key[:-len('_speed')]} {value:5.2f}×" for key, value in run.items()
                                if key.endswith("_speed"))
            print(f"{attention.name:>6} ctx {context:>5} batch {args.batch}: {speeds}   {ratios}", flush=True)

    greedy = greedy_runs(models, precisions, args.batch, args.greedy_tokens) if args.greedy_tokens else []

    long_context = [run for run in runs if run["context"] >= 2048 and "mla_over_gqa_speed" in run]
    target_speed = all(run["mla_over_gqa_speed"] >= 1.0 for run in long_context)
    target_bytes = all(check["exact"] for check in kv_check.values())
    print(f"target: KV bytes exact: {'met' if target_bytes else 'MISSED'}; "
          f"MLA not slower than GQA at ≥2k context: {'met' if target_speed else 'MISSED'}"
          + ("" if args.converted else " (no --converted: not measured)"))
    write_json_atomic(args.out, {
        "benchmark": "decode", "original": str(args.original), "converted": str(args.converted),
        "block_size": BLOCK_SIZE, "batch": args.batch, "steps": args.steps, "precisions": precisions,
        "kv_bytes_check": kv_check, "runs": runs, "greedy": greedy,
        "targets": {"kv_bytes_exact": target_bytes, "mla_not_slower_from_2k": target_speed},
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "load_average_1m": os.getloadavg()[0]},
        "context_contents": "synthetic random cache entries (decode cost is value-independent)",
    })
    print(f"wrote {args.out}")
    return 0 if target_bytes and target_speed else 1


GREEDY_PROMPTS = ["The capital of France is", "Once upon a time there was", "def fibonacci(n):",
                  "The three laws of robotics are", "Water boils at", "My favourite book is",
                  "In 1969, the first man", "To make bread you need"]


def greedy_runs(models: dict, precisions: list[str], batch: int, new_tokens: int) -> list[dict]:
    """Greedy generation through ``Engine.generate`` (batch prompts together) per model and
    precision: decode tokens/s from the engine's own counters, after one warm-up generation."""
    from mindyouzhi.serve.engine import Engine, EngineOptions
    from mindyouzhi.serve.sampling import SamplingParams

    out = []
    for name, path in models.items():
        outputs = {}
        for precision in precisions:
            runner = ModelRunner.from_dir(path, precision=precision)
            prompts = [runner.tokenizer.encode(GREEDY_PROMPTS[i % len(GREEDY_PROMPTS)]) for i in range(batch)]
            blocks = batch * -(-(max(map(len, prompts)) + new_tokens) // BLOCK_SIZE) + 1
            engine = Engine(runner, EngineOptions(max_batch=batch, num_blocks=blocks, block_size=BLOCK_SIZE))
            engine.generate(prompts, SamplingParams(max_new_tokens=4, temperature=0.0))  # compile
            engine.stats = type(engine.stats)()
            completions = engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens, temperature=0.0))
            outputs[precision] = [c.output_ids for c in completions]
            stats = engine.stats
            row = {"model": name, "precision": precision, "batch": batch, "new_tokens": new_tokens,
                   "decode_tokens_per_second": stats.decode_tokens / stats.decode_seconds,
                   "fused_decode_step": engine.model.fused_decode,
                   "prefill_seconds": stats.prefill_seconds, "decode_seconds": stats.decode_seconds}
            if precision != "fp32" and "fp32" in outputs:
                shared = sum(next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
                             for x, y in zip(outputs[precision], outputs["fp32"]))
                row["tokens_equal_to_fp32_before_first_difference"] = f"{shared}/{sum(map(len, outputs['fp32']))}"
            out.append(row)
            print(f"greedy {name} {precision}{' (fused step)' if row['fused_decode_step'] else ''}: "
                  f"{row['decode_tokens_per_second']:.1f} decode tok/s at batch {batch}"
                  + (f", {row['tokens_equal_to_fp32_before_first_difference']} tokens as fp32"
                     if "tokens_equal_to_fp32_before_first_difference" in row else ""), flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
