"""Benchmark: calibrated vs plain label scoring on FPB and SST-5 (Zhao et al. 2021).

    python bench/calibration.py --model DIR --shared ../shared [--limit 300] [--shots 0]

For each task the same prompts are scored twice on one loaded model: ``loglik`` (the label word with
the highest log-probability) and ``calibrated`` (each label's log-probability minus its
log-probability after the content-free prompt "N/A").  FPB: Sentences_AllAgree, first ``--limit``
lines; SST-5: stsa.fine.test, first ``--limit`` lines.  Besides accuracy it reports the balanced
accuracy (``macro_accuracy``: mean per-label recall) and how often the most frequent prediction is
chosen, which shows the prior bias calibration removes.  Writes ``bench/results/calibration.json``.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mindyouzhi.eval.bench import BenchSettings, prepare_task, run_prepared  # noqa: E402
from mindyouzhi.eval.lm import load_language_model  # noqa: E402
from mindyouzhi.io_utils import write_json_atomic  # noqa: E402

RESULTS = REPO / "bench" / "results" / "calibration.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--shared", required=True, type=Path)
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    data = args.shared / "data" / "eval"
    tasks = {"FPB AllAgree": ("fpb", data / "fpb" / "Sentences_AllAgree.txt"),
             "SST-5 test": ("sst5", data / "sst5" / "stsa.fine.test")}
    lm = load_language_model(args.model)
    rows = []
    for name, (task, path) in tasks.items():
        for scoring in ("loglik", "calibrated"):
            prepared = prepare_task(task, path, limit=args.limit, scoring=scoring)
            started = time.perf_counter()
            result = run_prepared(lm, prepared, BenchSettings(batch_size=args.batch_size, scoring=scoring))
            predictions = Counter(row["pred"] for row in result["items"])
            top, count = predictions.most_common(1)[0]
            rows.append({"task": name, "scoring": scoring, "n": result["n"], **result["metrics"],
                         "most_common_prediction": top, "most_common_share": round(count / result["n"], 4),
                         "seconds": round(time.perf_counter() - started, 1)})
    print("| task | scoring | n | accuracy | balanced accuracy | most frequent prediction |")
    print("|---|---|---:|---:|---:|---|")
    for row in rows:
        print(f"| {row['task']} | {row['scoring']} | {row['n']} | {100 * row['accuracy']:.2f} % | "
              f"{100 * row['macro_accuracy']:.2f} % | {row['most_common_prediction']} ({100 * row['most_common_share']:.0f} %) |")
    write_json_atomic(RESULTS, {"model": str(args.model), "limit": args.limit, "rows": rows})


if __name__ == "__main__":
    main()
