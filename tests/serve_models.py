"""Tiny models for the serving tests: a GQA original, its full MLA conversion and a hybrid.

Built once per test session (converting takes seconds) under pytest's session temp dir, so every
serving test module shares them.  The converted models get a minimal chat template so the chat
endpoint can be exercised with the word-level test tokenizer.
"""
from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from hf_fixtures import tiny_convertible, write_text

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w7{% endif %}"
RANK, ROPE = 24, 8  # kv_lora_rank and rope_dim of the converted models


def build_serve_models(root: Path) -> dict[str, Path]:
    models = {"gqa": root / "llama-model", "mla": root / "mla", "hybrid": root / "hybrid"}
    if all((path / "config.json").is_file() for path in models.values()):
        return models
    from mindyouzhi.cli import main

    root.mkdir(parents=True, exist_ok=True)
    tiny_convertible(root, "llama", layers=2)
    calib = write_text(root / "calib.txt", 3000, seed=0)
    for name, extra in (("mla", []), ("hybrid", ["--layers", "1"])):
        result = CliRunner().invoke(main, [
            "convert", "--model", str(models["gqa"]), "--out", str(models[name]), "--calib", str(calib),
            "--calib-tokens", "1024", "--calib-seq-len", "64", "--rope-dim", str(ROPE), "--kv-lora-rank", str(RANK),
            "--freqfold", "2", "--nope-rotation", "mean", "--overwrite", *extra])  # a fixed model (no auto choice)
        assert result.exit_code == 0, result.output
        config_path = models[name] / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["chat_template"] = CHAT_TEMPLATE
        config_path.write_text(json.dumps(config))
    return models
