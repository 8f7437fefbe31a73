"""``mindyouzhi analyze layers``: the layer-sensitivity study (the paper's Figure 4)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from mindyouzhi.convert_weights.safetensors_io import SafetensorsStore
from mindyouzhi.io_utils import atomic_output_dir, check_output_dir, sha256_file, write_json_atomic
from mindyouzhi.models.config import ModelConfig

from .calibration import GramCache, calibration_windows, text_windows
from .folds import check_fold, collapse, legal_folds, paper_label
from .pipeline import check_convertible, compute_original_grams
from .plots import plot_sensitivity
from .search import CandidateFactory, HybridEvaluator, layer_sensitivity


def analyze_layers(model_dir: Path, search_data: Path, calib: Path, out: Path, rope_dim: Optional[int],
                   folds: Optional[list[int]], calib_tokens: int, search_tokens: int, search_seq_len: int, seed: int,
                   batch_size: int, overwrite: bool) -> dict:
    from mindyouzhi.tokenizer import load_tokenizer

    config = ModelConfig.from_dir(model_dir)
    check_convertible(config, str(model_dir))
    check_output_dir(out, overwrite)
    rope_dim = rope_dim or config.head_dim // 2
    collapse(config.head_dim, rope_dim)
    folds = folds or legal_folds(config.head_dim, rope_dim)
    for fold in folds:
        check_fold(fold, config.head_dim, rope_dim, "--folds")
    tokenizer = load_tokenizer(model_dir)
    calib_windows, _ = calibration_windows(tokenizer, calib, calib_tokens, 256, seed, None)
    search_windows = text_windows(tokenizer, search_data, search_tokens, search_seq_len, seed + 1, "--search-data")
    store = SafetensorsStore(model_dir)
    grams = GramCache()
    evaluator = HybridEvaluator(config, store, search_windows, "stage1", batch_size, where=str(model_dir))
    factory = CandidateFactory(evaluator, grams, rope_dim, None)
    compute_original_grams(config, store, calib_windows, grams, batch_size, str(model_dir), "mean")
    study = layer_sensitivity(evaluator, factory, folds)
    result = {
        "model": str(model_dir), "rope_dim": rope_dim, "folds": folds,
        "paper_labels": {str(f): paper_label(f, config.head_dim, rope_dim) for f in folds},
        "original": study["original"],
        "delta": {layer: {str(f): v for f, v in row.items()} for layer, row in study["delta"].items()},
        "best_fold_per_layer": {layer: min(row, key=row.get) for layer, row in study["delta"].items()},
        "data": {"search": {"path": str(search_data), "sha256": sha256_file(search_data)},
                 "calib": {"path": str(calib), "sha256": sha256_file(calib)}},
        "evaluations": evaluator.evaluations,
        "full_forward_equivalents": evaluator.full_forward_equivalents(),
    }
    with atomic_output_dir(out, overwrite) as tmp:
        write_json_atomic(tmp / "layers.json", result)
        plot_sensitivity(study["delta"], folds, tmp / "layer_sensitivity.png", tmp / "layer_sensitivity_heatmap.png")
    result["delta"] = {layer: {int(f): v for f, v in row.items()} for layer, row in result["delta"].items()}
    return result
