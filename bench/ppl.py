"""bench/ppl: SmolLM2-135M WikiText-2 perplexity, ours (MindSpore) vs transformers (PyTorch).

Same token ids for both (our tokenizer), non-overlapping windows of --seq-len, ppl =
exp(total NLL / predicted tokens).  Throughput is measured in the same run, forward + NLL over the
same windows, after one warm-up window each (MindSpore compiles one graph per shape).  Targets:
ppl agreement within 0.1 %, MindSpore tokens/s ≥ 0.7 × PyTorch fp32.

    .venv/bin/python bench/ppl.py [--seq-len 2048] [--windows 4]
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import common  # noqa: E402


def torch_window_nll(model, window: np.ndarray) -> float:
    import torch

    with torch.no_grad():
        ids = torch.tensor(window[None, :-1], dtype=torch.long)
        logits = model(ids).logits[0].double()
        targets = torch.tensor(window[1:], dtype=torch.long)
        return float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=4)
    args = parser.parse_args()

    import torch
    import transformers

    from mindyouzhi.eval.ppl import token_stream, window_nll, windows
    from mindyouzhi.models.runner import ModelRunner

    model_dir = common.smollm2()
    _, test = common.wikitext()
    ours = ModelRunner.from_dir(model_dir)
    data = windows(token_stream(ours.tokenizer, test), args.seq_len, args.windows, test)
    warm = data[:1]  # one untimed pass each: MindSpore compiles per shape, PyTorch warms its allocator
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()

    window_nll(ours.token_nll, warm)
    start = time.perf_counter()
    ours_nll = sum(window_nll(ours.token_nll, w[None]) for w in data)
    ours_seconds = time.perf_counter() - start

    torch_window_nll(reference, warm[0])
    start = time.perf_counter()
    ref_nll = sum(torch_window_nll(reference, w) for w in data)
    ref_seconds = time.perf_counter() - start

    predicted = data.shape[0] * (data.shape[1] - 1)
    ours_ppl, ref_ppl = math.exp(ours_nll / predicted), math.exp(ref_nll / predicted)
    tokens = data.size
    result = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)",
        "data": f"wiki.test.raw, first {data.shape[0]} windows of {args.seq_len} tokens",
        "ppl_mindspore": ours_ppl, "ppl_transformers": ref_ppl,
        "ppl_relative_difference": abs(ours_ppl - ref_ppl) / ref_ppl,
        "tokens_per_second_mindspore": tokens / ours_seconds, "tokens_per_second_pytorch": tokens / ref_seconds,
        "speed_ratio": ref_seconds / ours_seconds, "torch_threads": torch.get_num_threads(),
    }
    print(common.dump(result))
    common.save("ppl", result)


if __name__ == "__main__":
    main()
