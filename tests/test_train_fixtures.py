"""Shared helpers for the post-training tests (no tests here): a tiny GQA teacher with a chat
template, its converted MLA student, small text and SFT files, and recipe writing."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import yaml
from click.testing import CliRunner

from hf_fixtures import WORDS, tiny_convertible, write_text

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}assistant {% endif %}")


def add_chat_template(model_dir: Path) -> None:
    path = model_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    path.write_text(json.dumps(config))


def write_sft(path: Path, records: int, seed: int = 0) -> Path:
    """Alpaca-style records over the tiny vocabulary: the response is the query shifted by one word."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as handle:
        for _ in range(records):
            query = [WORDS[i] for i in rng.integers(0, 60, size=int(rng.integers(3, 9)))]
            answer = [WORDS[(WORDS.index(w) + 1) % len(WORDS)] for w in query]
            handle.write(json.dumps({"instruction": " ".join(query), "input": "", "output": " ".join(answer),
                                     "history": []}) + "\n")
    return path


def build_models(root: Path) -> dict:
    """Teacher (tiny llama, 2 layers, chat template) and its converted MLA student."""
    from mindyouzhi.cli import main

    root.mkdir(parents=True, exist_ok=True)
    teacher = tiny_convertible(root / "teacher", "llama", 2)
    add_chat_template(teacher)
    calib = write_text(root / "text.txt", 4000, seed=1)
    student = root / "student"
    result = CliRunner().invoke(main, ["convert", "--model", str(teacher), "--out", str(student), "--calib", str(calib),
                                       "--calib-tokens", "1024", "--calib-seq-len", "64", "--search-tokens", "512",
                                       "--search-seq-len", "64", "--rope-dim", "8", "--kv-lora-rank", "24",
                                       "--freqfold", "2", "--json"])
    assert result.exit_code == 0, result.output
    return {"teacher": teacher, "student": student, "text": calib, "sft": write_sft(root / "sft.jsonl", 48)}


def shared_models(tmp_path_factory) -> dict:
    """``build_models`` once per test session (every post-training test module reuses them)."""
    root = tmp_path_factory.getbasetemp() / "train-models"
    done = root / "ready.json"
    if not done.is_file():
        models = build_models(root)
        done.write_text(json.dumps({k: str(v) for k, v in models.items()}))
    return {k: Path(v) for k, v in json.loads(done.read_text()).items()}


def write_recipe(path: Path, **sections) -> Path:
    """A recipe with small defaults; ``sections`` replace or extend them (nested dicts merge)."""
    recipe = {
        "run_mode": "gkd",
        "seed": 3,
        "output_dir": str(path.parent / "run"),
        "model": {},
        "train_dataset": {"seq_length": 32, "shuffle": True},
        "runner_config": {"batch_size": 2, "gradient_accumulation_steps": 1, "epochs": 1, "save_steps": 0},
        "optimizer": {"type": "AdamW", "betas": [0.9, 0.99], "eps": 1.0e-8, "weight_decay": 0.0},
        "lr_schedule": {"type": "CosineWithWarmUpLR", "learning_rate": 2.0e-3, "warmup_ratio": 0.1},
        "runner_wrapper": {"max_grad_norm": 1.0},
        "parallel_config": {"data_parallel": 1},
        "context": {"mode": 0, "device_target": "CPU"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def final_weights(run_dir: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


def log_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]


def venv_env() -> dict:
    """Environment for child processes: the venv's bin first on PATH (msrun spawns `python`)."""
    import sys

    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["MINDYOUZHI_NO_PROGRESS"] = "1"
    env.setdefault("GLOG_v", "3")
    return env
