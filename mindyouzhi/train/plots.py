"""Training curves (loss, learning rate, tokens/s against the step) from ``train_log.jsonl``."""
from __future__ import annotations

import json
from pathlib import Path


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill: everything after it is rewritten on resume
    return records


def plot_training(log_path: Path, out_png: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_log(log_path) if "loss" in r]
    if not records:
        return
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].plot(steps, [r["loss"] for r in records], lw=1.2)
    axes[0].set_title("loss")
    axes[1].plot(steps, [r["lr"] for r in records], lw=1.2, color="tab:orange")
    axes[1].set_title("learning rate")
    axes[2].plot(steps, [r["tokens_per_second"] for r in records], lw=1.2, color="tab:green")
    axes[2].set_title("tokens / s")
    for axis in axes:
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out_png)
