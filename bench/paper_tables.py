"""Benchmark: the paper's general and finance tables (``eval suite --preset``) for several models.

    python bench/paper_tables.py --model ORIGINAL --model CONVERTED [--model TRAINED] \
        [--label original --label converted] --data-root DIR [--limit 1] [--exam-shots 5] [--items 50]
        [--max-new-tokens 128] [--presets general,finance]

Runs both presets on every model through the suite (models loaded one at a time) with reduced
budgets, which the printed table states: exam benchmarks (C-Eval, FinEval, FinanceIQ) run
``--exam-shots`` (default 5, their protocol) on the first ``--limit`` questions of every subject; the other benchmarks use their
first ``--items`` items (CFLUE-A/CrossNER: per task/domain); generation tasks stop after
``--max-new-tokens``.  Prints both tables in the paper's layout and writes
``bench/results/paper_tables_<presets>.json`` (per-item rows included).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mindyouzhi.eval.lm import load_language_model  # noqa: E402
from mindyouzhi.eval.suite import PRESETS, preset_entries, render_paper_table, run_suite  # noqa: E402
from mindyouzhi.io_utils import write_json_atomic  # noqa: E402

EXAMS = {"ceval", "fineval", "financeiq"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, type=Path)
    parser.add_argument("--label", action="append", default=[])
    parser.add_argument("--data-root", required=True, type=Path)
    parser.add_argument("--limit", type=int, default=1, help="questions per exam subject")
    parser.add_argument("--exam-shots", type=int, default=5, help="few-shot examples of the exams (paper: 5)")
    parser.add_argument("--items", type=int, default=50, help="items of every other benchmark")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--presets", default="general,finance")
    args = parser.parse_args()
    results, tables = {}, []
    for preset in args.presets.split(","):
        entries, not_run = preset_entries(preset, args.data_root, batch_size=args.batch_size)
        for entry in entries:
            entry.settings["limit"] = args.limit if entry.task in EXAMS else args.items
            if entry.task in EXAMS:
                entry.settings["shots"] = args.exam_shots
            if "max_new_tokens" in entry.settings:
                entry.settings["max_new_tokens"] = args.max_new_tokens
        started = time.perf_counter()
        result = run_suite(args.model, entries, args.label, loader=load_language_model)
        result["seconds"] = round(time.perf_counter() - started, 1)
        result["not_run"] = not_run
        results[preset] = result
        tables.append(render_paper_table(result, PRESETS[preset]["title"], not_run))
        print(tables[-1], flush=True)
    out = REPO / "bench" / "results" / f"paper_tables_{args.presets.replace(',', '_')}.json"
    write_json_atomic(out, {"limit": args.limit, "items": args.items, "max_new_tokens": args.max_new_tokens,
                            "results": results})


if __name__ == "__main__":
    main()
