"""PNG figures for the reports (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_trajectory(trajectory: dict, original: float, path: Path, ylabel: str = "search ppl",
                    xlabel: str | None = None) -> None:
    """Criterion against the number of converted layers (last to first), adaptive vs uniform (Fig. 9)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, points in trajectory.items():
        if not points:
            continue
        xs, ys = zip(*points)
        style = dict(linewidth=2.5, color="black") if label == "adaptive" else dict(linewidth=1.2, alpha=0.85)
        ax.plot(xs, ys, marker="o", markersize=3, label=label, **style)
    ax.axhline(original, color="grey", linestyle="--", linewidth=1, label="original (GQA)")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel or "converted layers (from the last layer down)")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Layer-adaptive vs uniform FreqFold")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_plan(plan: list, path: Path, labels: dict | None = None) -> None:
    """Chosen fold per layer as bars (GQA layers left empty)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(plan)), 3.2))
    xs = np.arange(len(plan))
    heights = [f if f is not None else 0 for f in plan]
    ax.bar(xs, heights, color="#3b6ea5")
    ax.set_yscale("log", base=2)
    ax.set_xlabel("layer")
    ax.set_ylabel("FreqFold f")
    ax.set_xticks(xs[:: max(1, len(plan) // 15)])
    ax.set_title("Fold plan" + (" (" + ", ".join(f"{k}: {v}" for k, v in labels.items()) + ")" if labels else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sensitivity(delta: dict, folds: list[int], lines_path: Path, heatmap_path: Path) -> None:
    """The paper's Figure 4: ppl change per layer for each fold, as lines and as a heatmap."""
    plt = _pyplot()
    layers = sorted(delta)
    matrix = np.array([[delta[layer][f] for f in folds] for layer in layers])
    fig, ax = plt.subplots(figsize=(7, 4))
    for column, fold in enumerate(folds):
        ax.plot(layers, matrix[:, column], marker="o", markersize=3, label=f"f={fold}")
    ax.set_xlabel("layer converted alone")
    ax.set_ylabel("Δ ppl vs original")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(lines_path, dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(folds) + 2), max(3, 0.22 * len(layers) + 1)))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(folds)), [str(f) for f in folds])
    ax.set_xlabel("fold f")
    ax.set_ylabel("layer")
    fig.colorbar(image, ax=ax, label="Δ ppl")
    fig.tight_layout()
    fig.savefig(heatmap_path, dpi=120)
    plt.close(fig)
