"""bench/ppl: WikiText-2 perplexity and throughput, ours (MindSpore) vs transformers (PyTorch fp32 and
bf16), same model, same token ids, same windows, same run.

Non-overlapping windows of --seq-len, ppl = exp(total NLL / predicted tokens).  Every contestant
gets one untimed warm-up pass of the first window (MindSpore compiles one graph per shape, PyTorch warms its
allocator); the timed windows are interleaved — window i runs on every contestant before window
i + 1 — so machine load hits all of them alike.  Contestants: ours in the resolved
``--forward-precision`` (``eval ppl``'s rule: auto = bf16 on a CPU with native bf16 dot products),
ours in fp32 when that differs (the path before bf16), transformers fp32 and transformers bf16.
Targets: ours-fp32 ppl within 0.1 % of transformers-fp32; our throughput ≥ 0.8 × transformers-bf16
(issue 23).

    .venv/bin/python bench/ppl.py [--model smollm2|qwen2.5-coder|DIR] [--seq-len 2048] [--windows 4]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODELS = {"smollm2": "smollm2", "qwen2.5-coder": "qwen25_coder"}


def torch_window_nll(model, window: np.ndarray) -> float:
    import torch

    with torch.no_grad():
        ids = torch.tensor(window[None, :-1], dtype=torch.long)
        logits = model(ids).logits[0].double()
        targets = torch.tensor(window[1:], dtype=torch.long)
        return float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))


def model_dir(name: str) -> Path:
    if name in MODELS:
        return getattr(common, MODELS[name])()
    return Path(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help=f"{' | '.join(MODELS)} | a model directory")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--forward-precision", default="auto", choices=["auto", "bf16", "fp32"])
    args = parser.parse_args()

    import torch
    import transformers

    from mindyouzhi.eval.lm import resolve_precision
    from mindyouzhi.eval.ppl import token_stream, window_nll, windows
    from mindyouzhi.models.runner import ModelRunner

    directory = model_dir(args.model)
    _, test = common.wikitext()
    precision = resolve_precision(args.forward_precision)
    used = precision["used"]
    ours = {f"mindspore_{used}": ModelRunner.from_dir(directory, precision=used)}
    if used != "fp32":
        ours["mindspore_fp32"] = ModelRunner.from_dir(directory, precision="fp32")
    tokenizer = next(iter(ours.values())).tokenizer
    data = windows(token_stream(tokenizer, test), args.seq_len, args.windows, test)
    warm = data[:1]  # compiles / warms up, untimed; the timed pass covers every window, this one too
    scorers = {name: (lambda w, r=runner: float(window_nll(r.token_nll, w[None]).sum())) for name, runner in ours.items()}
    for dtype in ("fp32", "bf16"):
        reference = transformers.AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float32 if dtype == "fp32" else torch.bfloat16).eval()
        scorers[f"torch_{dtype}"] = lambda w, m=reference: torch_window_nll(m, w)

    for score in scorers.values():
        score(warm[0])
    nll = dict.fromkeys(scorers, 0.0)
    seconds = dict.fromkeys(scorers, 0.0)
    for window in data:
        for name, score in scorers.items():
            start = time.perf_counter()
            nll[name] += score(window)
            seconds[name] += time.perf_counter() - start

    predicted = data.shape[0] * (data.shape[1] - 1)
    ppl = {name: math.exp(total / predicted) for name, total in nll.items()}
    speed = {name: data.size / seconds[name] for name in scorers}
    ours_name = f"mindspore_{used}"
    result = {
        "model": str(directory),
        "data": f"wiki.test.raw, first {data.shape[0]} windows of {args.seq_len} tokens",
        "forward_precision": precision,
        "ppl": ppl, "tokens_per_second": speed,
        "ppl_fp32_relative_difference": abs(ppl["mindspore_fp32"] - ppl["torch_fp32"]) / ppl["torch_fp32"],
        "ppl_relative_difference_to_torch_bf16": abs(ppl[ours_name] - ppl["torch_bf16"]) / ppl["torch_bf16"],
        "speed_over_torch_bf16": speed[ours_name] / speed["torch_bf16"],
        "speed_over_torch_fp32": speed[ours_name] / speed["torch_fp32"],
        "bf16_speedup_over_our_fp32": speed[ours_name] / speed["mindspore_fp32"],
        "targets": {"ppl_fp32_within_0.1%": abs(ppl["mindspore_fp32"] / ppl["torch_fp32"] - 1) <= 1e-3,
                    "speed_at_least_0.8x_torch_bf16": speed[ours_name] >= 0.8 * speed["torch_bf16"]},
        "torch_threads": torch.get_num_threads(), "load_average_1m": common.machine()["load_average_1m"],
    }
    print(common.dump(result))
    common.save("ppl", result)


if __name__ == "__main__":
    main()
