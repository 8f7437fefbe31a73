"""Benchmark: calibrated vs plain label scoring on FPB and SST-5 (Zhao et al. 2021).

    python bench/calibration.py --model DIR --shared ../shared [--per-label 60]

For each task the same prompts are scored twice on one loaded model: ``loglik`` (the label word with
the highest log-probability) and ``calibrated`` (each label's log-probability minus its
log-probability after the content-free prompt "N/A"), zero-shot.  The files are ordered (the first
300 FPB AllAgree lines are 88 % positive), so each task is scored on a label-balanced sample: the
first ``--per-label`` sentences of every label, in file order (FPB: Sentences_AllAgree; SST-5:
stsa.fine.test), written to a temporary file.  Besides accuracy it reports the balanced accuracy
(``macro_accuracy``: mean per-label recall) and how often the most frequent prediction is chosen,
which shows the prior bias calibration removes.  Writes ``bench/results/calibration.json``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mindyouzhi.eval.bench import BenchSettings, prepare_task, run_prepared  # noqa: E402
from mindyouzhi.eval.lm import load_language_model  # noqa: E402
from mindyouzhi.eval.tasks.classification import FPB, SST5, read_sentences  # noqa: E402
from mindyouzhi.io_utils import write_json_atomic  # noqa: E402

RESULTS = REPO / "bench" / "results" / "calibration.json"


def balanced_sample(path: Path, form, per_label: int, out: Path, line_of) -> Path:
    """The first ``per_label`` sentences of every label, in file order, as a file of the same format."""
    taken: dict[str, int] = {}
    lines = []
    for sentence in read_sentences(path, form):
        if taken.get(sentence.label, 0) < per_label:
            taken[sentence.label] = taken.get(sentence.label, 0) + 1
            lines.append(line_of(sentence) + "\n")
    out.write_text("".join(lines), encoding="utf-8")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--shared", required=True, type=Path)
    parser.add_argument("--per-label", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    data = args.shared / "data" / "eval"
    work = Path(tempfile.mkdtemp(prefix="calibration-"))
    tasks = {"FPB AllAgree": ("fpb", balanced_sample(data / "fpb" / "Sentences_AllAgree.txt", FPB, args.per_label,
                                                     work / "fpb.txt", lambda s: f"{s.sentence}@{s.label}")),
             "SST-5 test": ("sst5", balanced_sample(data / "sst5" / "stsa.fine.test", SST5, args.per_label,
                                                    work / "sst5.txt", lambda s: f"{SST5.labels.index(s.label)} {s.sentence}"))}
    lm = load_language_model(args.model)
    rows = []
    for name, (task, path) in tasks.items():
        for scoring in ("loglik", "calibrated"):
            prepared = prepare_task(task, path, scoring=scoring)
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
    write_json_atomic(RESULTS, {"model": str(args.model), "per_label": args.per_label, "rows": rows})


if __name__ == "__main__":
    main()
