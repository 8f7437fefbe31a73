"""bench/search_cost: the adaptive search on SmolLM2-135M — evaluations, cost, wall time, peak RSS.

Runs the default ``mindyouzhi convert --freqfold adaptive`` (criterion ``final`` with the local-error
shortlist; no uniform trajectories) in a child process and reads its report.  Targets (issue 12):
≤ 0.6·L·|S| full-model forward equivalents, the whole convert ≤ 20 min and peak RSS ≤ 1.5 GiB on
the 2-core machine.  Besides the search windows' forwards, the search streams the calibration
windows once per uniform plan (``calibration_streams``: each plan is converted from its own
statistics, so the search scores what it writes; docs/conversion.md §5).

    .venv/bin/python bench/search_cost.py [--search-tokens 8192] [--calib-tokens 32768]
        [--search-context uniform|original] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--search-tokens", type=int, default=8192)
    parser.add_argument("--search-seq-len", type=int, default=2048)
    parser.add_argument("--calib-tokens", type=int, default=32768)
    parser.add_argument("--search-context", choices=["uniform", "original"], default="uniform")
    parser.add_argument("--out", type=Path, default=None,
                        help="keep the converted model here (for a test-set evaluation); default: a temporary dir")
    args = parser.parse_args()
    from mindyouzhi.convert_weights.safetensors_io import SafetensorsStore
    from mindyouzhi.models.config import ModelConfig

    model_dir = common.smollm2()
    calib, _ = common.wikitext()
    config = ModelConfig.from_dir(model_dir)
    store = SafetensorsStore(model_dir)
    model_bytes = sum(4 * int(np.prod(store.shape(name))) for name in store.keys())
    baseline = common.runtime_baseline_rss()
    with tempfile.TemporaryDirectory() as work:
        out = args.out or Path(work) / "out"
        cmd = [common.cli(), "convert", "--model", str(model_dir), "--out", str(out),
               "--calib", str(calib), "--calib-tokens", str(args.calib_tokens), "--search-tokens", str(args.search_tokens),
               "--search-seq-len", str(args.search_seq_len), "--rope-dim", "32", "--kv-lora-rank", "96",
               "--freqfold", "adaptive", "--search-context", args.search_context, "--no-trajectories", "--json"]
        wall, peak, stdout = common.child_peak(cmd)
    report = json.loads(stdout)
    search = report["search"]
    layers, folds = config.num_hidden_layers, len(report["candidate_folds"])
    hidden_cache = 4 * args.search_tokens * config.hidden_size * (layers + 1)  # spilled to disk, read by slices
    calibration = 4 * args.calib_tokens * config.hidden_size * 3 + 8 * layers * (config.hidden_size + 1) ** 2
    result = {
        "model": "SmolLM2-135M-Instruct", "layers": layers, "candidate_folds": report["candidate_folds"],
        "search_tokens": args.search_tokens, "calib_tokens": args.calib_tokens,
        "evaluations": search["evaluations"], "budget_L_times_S": layers * folds,
        "search_forward_equivalents": search["search_forward_equivalents"],
        "ratio_to_L_times_S": search["search_forward_equivalents"] / (layers * folds),
        "with_uniform_guard_forward_equivalents": search["full_forward_equivalents"],
        "calibration_streams": search.get("calibration_streams"),
        "search_seconds": search["search_seconds"], "whole_convert_wall_seconds": wall,
        "peak_rss_bytes": peak, "runtime_baseline_rss_bytes": baseline, "model_fp32_bytes": model_bytes,
        "calibration_buffers_bytes": calibration, "search_hidden_cache_bytes_on_disk": hidden_cache,
        "peak_above_baseline_over_model": (peak - baseline) / model_bytes,
        "targets": {"ratio_to_L_times_S": 0.6, "wall_seconds": 20 * 60, "peak_rss_bytes": 1.5 * 2 ** 30},
        "load_average_1m_at_end": __import__("os").getloadavg()[0],
        "search_context": search.get("context"), "baseline_fold": search.get("baseline"),
        "uniform_scores": search.get("uniform_scores"), "adaptive_search_score": search.get("adaptive"),
        "bootstrap": [r.get("bootstrap") for r in search["rounds"]],
        "plan": report["fold_plan"], "timings": report["timings_seconds"],
    }
    print(common.dump(result))
    common.save("search_cost", result)


if __name__ == "__main__":
    main()
