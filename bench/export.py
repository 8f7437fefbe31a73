"""bench/export: a converted SmolLM2-135M exported to DeepSeek-V3 and run by transformers, fp32 and bf16.

Converts SmolLM2-135M (rope_dim 32, kv_lora_rank 96, uniform fold ``--fold``, **without**
``--latent-norm``: the export writes its exact linear ``kv_a_layernorm``), exports it with
``mindyouzhi export``, and compares on ``--tokens`` tokens of WikiText-2 raw test:

* transformers ``DeepseekV3ForCausalLM`` fp32 vs our MindSpore runner on the converted model
  (max |Δlogit|, argmax agreement) — the export's exactness;
* the same export run in **bf16** vs fp32 (max |Δlogit|, argmax agreement, ppl), next to the
  *original* GQA model's own bf16-vs-fp32 difference in transformers — the bf16 noise floor the
  linear latent norm must not exceed by much.

    .venv/bin/python bench/export.py [--tokens 512] [--fold 4] [--calib-tokens 8192]
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def _transformers_logits(model_dir: Path, ids: np.ndarray, dtype) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def _ppl(logits: np.ndarray, ids: np.ndarray) -> float:
    logits = logits[0, :-1].astype(np.float64)
    targets = ids[0, 1:]
    shifted = logits - logits.max(-1, keepdims=True)
    logprobs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return float(math.exp(-logprobs[np.arange(len(targets)), targets].mean()))


def _compare(a: np.ndarray, b: np.ndarray) -> dict:
    return {"max_abs_logit_diff": float(np.abs(a - b).max()), "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--fold", type=int, default=4)
    parser.add_argument("--rank", type=int, default=96)
    parser.add_argument("--calib-tokens", type=int, default=8192)
    args = parser.parse_args()
    import torch

    from mindyouzhi.eval.ppl import token_stream
    from mindyouzhi.export.deepseek import export_deepseek_v3
    from mindyouzhi.models.runner import ModelRunner

    source = common.smollm2()
    calib, test = common.wikitext()
    with tempfile.TemporaryDirectory() as work:
        converted, exported = Path(work) / "mla", Path(work) / "ds"
        _, _, _ = common.child_peak([common.cli(), "convert", "--model", str(source), "--out", str(converted),
                                     "--calib", str(calib), "--calib-tokens", str(args.calib_tokens), "--rope-dim", "32",
                                     "--kv-lora-rank", str(args.rank), "--freqfold", str(args.fold), "--json"])
        summary = export_deepseek_v3(converted, exported)
        ours_runner = ModelRunner.from_dir(converted)
        ids = np.asarray(token_stream(ours_runner.tokenizer, test)[: args.tokens])[None]
        ours = ours_runner.logits(ids)
        fp32 = _transformers_logits(exported, ids, torch.float32)
        bf16 = _transformers_logits(exported, ids, torch.bfloat16)
    original_fp32 = _transformers_logits(source, ids, torch.float32)
    original_bf16 = _transformers_logits(source, ids, torch.bfloat16)
    result = {
        "model": "SmolLM2-135M-Instruct", "rope_dim": 32, "kv_lora_rank": args.rank, "fold": args.fold,
        "calib_tokens": args.calib_tokens, "tokens": int(ids.shape[1]), "data": str(test),
        "linear_latent_norm": summary["linear_latent_norm"], "export_seconds": summary["seconds"],
        "export_fp32_vs_ours": _compare(fp32, ours),
        "export_bf16_vs_fp32": _compare(bf16, fp32),
        "original_bf16_vs_fp32": _compare(original_bf16, original_fp32),
        "ppl": {"ours_fp32": _ppl(ours, ids), "export_fp32": _ppl(fp32, ids), "export_bf16": _ppl(bf16, ids),
                "original_fp32": _ppl(original_fp32, ids), "original_bf16": _ppl(original_bf16, ids)},
    }
    print(common.dump(result))
    common.save("export", result)


if __name__ == "__main__":
    main()
