"""bench/parity: our MindSpore GQA model vs HF transformers (PyTorch) on the same weights.

SmolLM2-135M (imported from its GGUF) and stories260K: max abs logit difference over one sequence
of --tokens tokens of WikiText-2 raw test.  Target: ≤ 1e-4 (fp32).

    .venv/bin/python bench/parity.py [--tokens 512]
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()

    import torch
    import transformers

    from mindyouzhi.eval.ppl import token_stream
    from mindyouzhi.models.runner import ModelRunner

    _, test = common.wikitext()
    results = {}
    for name, model_dir in (("SmolLM2-135M", common.smollm2()), ("stories260K", common.stories260k())):
        ours = ModelRunner.from_dir(model_dir)
        ids = token_stream(ours.tokenizer, test)[: args.tokens][None]
        mine = ours.logits(ids)
        reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32,
                                                                      attn_implementation="eager").eval()
        with torch.no_grad():
            theirs = reference(torch.tensor(ids, dtype=torch.long)).logits.numpy()
            reference.config._attn_implementation = "sdpa"  # the reference against itself: fp32 noise floor
            sdpa = reference(torch.tensor(ids, dtype=torch.long)).logits.numpy()
        results[name] = {"tokens": int(ids.shape[1]), "max_abs_logit_diff": float(np.abs(mine - theirs).max()),
                         "reference_eager_vs_sdpa_max_abs_diff": float(np.abs(sdpa - theirs).max()),
                         "max_abs_logit": float(np.abs(theirs).max()),
                         "argmax_agreement": float((mine.argmax(-1) == theirs.argmax(-1)).mean())}
    print(common.dump(results))
    common.save("parity", {"target_max_abs_logit_diff": 1e-4, "results": results})


if __name__ == "__main__":
    main()
