"""bench/convert_cost: wall time and peak RSS of one streaming conversion with a fixed plan.

Runs ``mindyouzhi convert --freqfold F`` in a child process (so its peak RSS is its own) on
SmolLM2-135M and compares the peak with the model's fp32 size and with the streaming budget:
one layer's weights + embeddings + the calibration hidden states (one stream, two with
``--statistics two-stream``) + the Gram
statistics, on top of the runtime's own baseline (MindSpore
import, measured separately).  Issue-12 targets: f4/r96 with 32k calibration tokens in ≤ 84 s wall
and ≤ 1.5 GiB peak RSS on the 2-core machine (the public TransMLA converter: 84 s, 4.03 GiB).

    .venv/bin/python bench/convert_cost.py [--calib-tokens 32768] [--fold 4]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import common  # noqa: E402

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-tokens", type=int, default=32768)
    parser.add_argument("--fold", type=int, default=4)
    parser.add_argument("--rank", type=int, default=96)
    parser.add_argument("--statistics", default="stage1-stream", choices=["stage1-stream", "two-stream", "sequential"])
    parser.add_argument("--forward-precision", default="auto", choices=["auto", "bf16", "fp32"])
    args = parser.parse_args()
    from mindyouzhi.models.config import ModelConfig

    model_dir = common.smollm2()
    calib, _ = common.wikitext()
    config = ModelConfig.from_dir(model_dir)
    baseline = common.runtime_baseline_rss()
    with tempfile.TemporaryDirectory() as work:
        seconds, peak, stdout = common.child_peak([common.cli(), "convert", "--model", str(model_dir),
                                            "--out", f"{work}/out", "--calib", str(calib), "--calib-tokens", str(args.calib_tokens),
                                            "--rope-dim", "32", "--kv-lora-rank", str(args.rank), "--freqfold", str(args.fold),
                                            "--statistics", args.statistics, "--forward-precision", args.forward_precision,
                                            "--json"])
    report = json.loads(stdout)
    from mindyouzhi.convert_weights.safetensors_io import SafetensorsStore

    store = SafetensorsStore(model_dir)
    sizes = {name: 4 * int(np.prod(store.shape(name))) for name in store.keys()}
    model_bytes = sum(sizes.values())
    layer_bytes = sum(size for name, size in sizes.items() if name.startswith("model.layers.0."))
    d = config.hidden_size
    streams = 2 if args.statistics == "two-stream" else 1
    streaming_budget = {
        "one_layer_weights_source_and_converted": 2 * layer_bytes,
        "embeddings": sizes["model.embed_tokens.weight"],
        "calibration_hidden_states_streams_plus_layer_output": (streams + 1) * 4 * args.calib_tokens * d,
        "normed_inputs_and_gram_statistics": 4 * args.calib_tokens * d + 2 * 8 * (d + 1) ** 2,
    }
    result = {
        "model": "SmolLM2-135M-Instruct", "fold": args.fold, "rank": args.rank, "calib_tokens": args.calib_tokens,
        "statistics": args.statistics, "forward_precision": report["forward_precision"],
        "wall_seconds": seconds, "peak_rss_bytes": peak, "runtime_baseline_rss_bytes": baseline,
        "model_fp32_bytes": model_bytes, "peak_over_model": peak / model_bytes,
        "peak_above_baseline_over_model": (peak - baseline) / model_bytes,
        "streaming_budget_bytes": streaming_budget, "streaming_budget_total": sum(streaming_budget.values()),
        "within_budget": peak - baseline <= sum(streaming_budget.values()),
        "targets": {"wall_seconds": 84, "peak_rss_bytes": 1.5 * 2 ** 30},
        "load_average_1m_at_end": __import__("os").getloadavg()[0],
        "report_timings": report["timings_seconds"],
    }
    print(common.dump(result))
    common.save("convert_cost", result)


if __name__ == "__main__":
    main()
