"""bench/gguf_parity: our GGUF import of Qwen2.5-Coder-0.5B-Instruct vs transformers' own GGUF loader.

The reference is ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` (fp32) on the
reassembled GGUF (arch qwen2, q/k/v biases, no q/k row permutation).  Ours is the directory
``mindyouzhi import --gguf`` writes, run by our MindSpore ``ModelRunner`` and, to isolate the
import from the runtime, by transformers' ``Qwen2ForCausalLM``.  Figures: max |Δlogit| over a short
chat prompt, relative to the largest reference logit (target ≤ 1e-4), argmax agreement, and the
tokenizers compared on the prompt, a Chinese/emoji string and a WikiText-2 paragraph.

    .venv/bin/python bench/gguf_parity.py
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PROMPT = "Write a Python function that returns the n-th Fibonacci number."
CHINESE_AND_EMOJI = "你好，世界！今天的天气很好。我们去公园散步吧 🌳🚶‍♀️😀 ——「测试」123"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()

    import torch
    import transformers

    from mindyouzhi.models.runner import ModelRunner
    from mindyouzhi.tokenizer import load_tokenizer

    gguf_file = common.qwen25_coder_gguf()
    model_dir = common.qwen25_coder()
    ours_tokenizer = load_tokenizer(model_dir)
    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    prompt = ours_tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
    _, test = common.wikitext()
    texts = {"chat_prompt": prompt, "chinese_emoji": CHINESE_AND_EMOJI,
             "wikitext_paragraph": test.read_text(encoding="utf-8")[:4000]}
    tokenizer = {name: ours_tokenizer.encode(text) == reference_tokenizer(text, add_special_tokens=False)["input_ids"]
                 for name, text in texts.items()}
    ids = np.asarray([ours_tokenizer.encode(prompt)])

    runner = ModelRunner.from_dir(model_dir, with_tokenizer=False)
    mine = runner.logits(ids)
    del runner
    gc.collect()
    torch.set_num_threads(2)
    imported = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        imported_logits = imported(torch.from_numpy(ids)).logits.numpy()
    del imported
    gc.collect()
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                                  dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reference(torch.from_numpy(ids)).logits.numpy()

    scale = float(np.abs(theirs).max())

    def compare(logits: np.ndarray) -> dict:
        diff = float(np.abs(logits - theirs).max())
        return {"max_abs_logit_diff": diff, "relative_to_max_logit": diff / scale,
                "argmax_agreement": float((logits.argmax(-1) == theirs.argmax(-1)).mean())}

    results = {"gguf": str(gguf_file), "prompt_tokens": int(ids.shape[1]), "max_abs_reference_logit": scale,
               "mindspore_runner_vs_transformers_gguf": compare(mine),
               "transformers_on_imported_dir_vs_transformers_gguf": compare(imported_logits),
               "tokenizer_equal_to_transformers_gguf": tokenizer}
    print(common.dump(results))
    common.save("gguf_parity", {"target_relative": 1e-4, "results": results})


if __name__ == "__main__":
    main()
