"""bench/exactness: every lossless step of the conversion on the real models.

(a) RoRoPE with RoPE kept on every rotated component (rope_dim = head_dim, f = 1, full latent)
    vs the original model; (b) stage 2 at full rank vs stage 1 (rope_dim = head_dim/2, each fold).
Target: max abs logit difference ≤ 1e-4 on one WikiText-2 test sequence of --tokens tokens.

    .venv/bin/python bench/exactness.py [--tokens 512]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import common  # noqa: E402


def convert(model_dir: Path, out: Path, calib: Path, **kwargs) -> None:
    from mindyouzhi.transition.convert import ConvertOptions, convert as run

    run(ConvertOptions(model=model_dir, out=out, calib=calib, calib_tokens=4096, **kwargs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    from mindyouzhi.eval.ppl import token_stream
    from mindyouzhi.models.runner import ModelRunner
    from mindyouzhi.transition.folds import legal_folds

    calib, test = common.wikitext()
    results = {}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for name, model_dir in (("stories260K", common.stories260k()), ("SmolLM2-135M", common.smollm2())):
            original_runner = ModelRunner.from_dir(model_dir)
            ids = token_stream(original_runner.tokenizer, test)[: args.tokens][None]
            original = original_runner.logits(ids)
            row = {}
            convert(model_dir, work / f"{name}-all", calib, rope_all=True, freqfold="1", kv_lora_rank="full", stage=1)
            row["rope_on_every_component_vs_original"] = float(
                np.abs(ModelRunner.from_dir(work / f"{name}-all", with_tokenizer=False).logits(ids) - original).max())
            config = original_runner.config
            rope_dim = config.head_dim // 2
            for fold in legal_folds(config.head_dim, rope_dim):
                s1, s2 = work / f"{name}-s1-{fold}", work / f"{name}-s2-{fold}"
                convert(model_dir, s1, calib, rope_dim=rope_dim, freqfold=str(fold), stage=1)
                convert(model_dir, s2, calib, rope_dim=rope_dim, freqfold=str(fold), kv_lora_rank="full")
                stage1 = ModelRunner.from_dir(s1, with_tokenizer=False).logits(ids)
                stage2 = ModelRunner.from_dir(s2, with_tokenizer=False).logits(ids)
                row[f"f={fold}: stage2_full_rank_vs_stage1"] = float(np.abs(stage2 - stage1).max())
                row[f"f={fold}: stage1_vs_original (lossy)"] = float(np.abs(stage1 - original).max())
            results[name] = row
            print(name, common.dump(row), flush=True)
    common.save("exactness", {"tokens": args.tokens, "target": 1e-4, "results": results})


if __name__ == "__main__":
    main()
