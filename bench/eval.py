"""Benchmark: SmolLM2-135M original vs converted on finance and general benchmarks, with throughput.

    python bench/eval.py --original DIR --converted DIR --shared ../shared [--limit 200] [--subject-limit 3]

Runs, on both models in the same process (so timings are comparable: report ratios):

* Financial PhraseBank AllAgree, first ``--limit`` sentences, 3-shot.  FPB has no official split,
  so the few-shot examples are drawn from the 50%-agreement sentences that are *not* in AllAgree
  (written to a temporary file, never into the repository);
* SST-5 test, first ``--limit`` sentences, 3-shot from the train split;
* FinEval val and C-Eval val, the first ``--subject-limit`` questions of every subject,
  ``--exam-shots`` (default 5, the benchmarks' own protocol) from the dev split.  5-shot prompts
  reach 2.7k tokens; on a machine short of memory ``--exam-shots 2`` keeps them under ~1.3k;
* KL(original ‖ converted) and top-1 agreement on the first ``--kl-windows`` windows of 512 tokens
  of WikiText-2 raw test.

Throughput is reported twice: end to end per task (includes MindSpore's graph compilation, one
per new input shape, so it is noisy), and steady state — forward tokens/s of ``logprobs`` on one
sequence of 512 and of 2048 tokens after a warm-up call — which is the figure to compare.

Prints the side-by-side table and throughput, and writes ``bench/results/eval.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mindyouzhi.eval.lm import load_language_model  # noqa: E402
from mindyouzhi.eval.suite import SuiteEntry, render_markdown, run_suite, suite_summary  # noqa: E402
from mindyouzhi.eval.tasks.classification import FPB, read_sentences  # noqa: E402
from mindyouzhi.io_utils import write_json_atomic  # noqa: E402

RESULTS = REPO / "bench" / "results" / "eval.json"


def fpb_fewshot_pool(fpb_dir: Path, out: Path) -> Path:
    """FPB sentences with 50% agreement that are not among the AllAgree test sentences."""
    test = {sentence.sentence for sentence in read_sentences(fpb_dir / "Sentences_AllAgree.txt", FPB)}
    pool = [s for s in read_sentences(fpb_dir / "Sentences_50Agree.txt", FPB) if s.sentence not in test]
    out.write_text("".join(f"{s.sentence}@{s.label}\n" for s in pool), encoding="utf-8")
    return out


def entries(shared: Path, limit: int, subject_limit: int, exam_shots: int, kl_windows: int, batch_size: int,
            fpb_pool: Path) -> list[SuiteEntry]:
    data = shared / "data" / "eval"
    common = {"batch_size": batch_size}
    return [
        SuiteEntry("FPB AllAgree (3-shot)", "fpb", data / "fpb" / "Sentences_AllAgree.txt",
                   {**common, "shots": 3, "limit": limit, "fewshot_data": fpb_pool}),
        SuiteEntry("SST-5 test (3-shot)", "sst5", data / "sst5" / "stsa.fine.test",
                   {**common, "shots": 3, "limit": limit, "fewshot_data": data / "sst5" / "stsa.fine.train"}),
        SuiteEntry(f"FinEval val ({subject_limit}/subject, {exam_shots}-shot)", "fineval", data / "fineval" / "val",
                   {**common, "shots": exam_shots, "limit": subject_limit}),
        SuiteEntry(f"C-Eval val ({subject_limit}/subject, {exam_shots}-shot)", "ceval", data / "ceval" / "val",
                   {**common, "shots": exam_shots, "limit": subject_limit}),
        SuiteEntry("KL on WikiText-2 test (512)", "kl", shared / "data" / "wikitext-2" / "wiki.test.raw",
                   {"seq_len": 512, "max_windows": kl_windows, "batch_size": 1}),
    ]


def throughput(result: dict) -> dict:
    """Per task and model, end to end: seconds, items/s, tokens/s; and converted / original ratios."""
    reference, other = result["models"][0]["label"], result["models"][1]["label"]
    table = {}
    for task in result["tasks"]:
        per_model = {label: value["stats"] for label, value in task["results"].items()}
        row = {"per_model": per_model}
        if task["task"] != "kl":
            ref, conv = per_model[reference], per_model[other]
            if ref.get("tokens_per_second") and conv.get("tokens_per_second"):
                row["tokens_per_second_ratio"] = round(conv["tokens_per_second"] / ref["tokens_per_second"], 4)
        table[task["name"]] = row
    return table


def steady_state_throughput(model_dir: Path, lengths=(512, 2048), repeats: int = 2) -> dict:
    """Forward tokens/s of ``logprobs`` on one sequence per length, after a warm-up (compile) call."""
    lm = load_language_model(model_dir)
    ids = np.random.default_rng(0).integers(0, lm.tokenizer.vocab_size, size=max(lengths)).tolist()
    speeds = {}
    for length in lengths:
        lm.logprobs([ids[:length]])
        started = time.perf_counter()
        for _ in range(repeats):
            lm.logprobs([ids[:length]])
        speeds[str(length)] = round(repeats * length / (time.perf_counter() - started), 1)
    return speeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--original", required=True, type=Path)
    parser.add_argument("--converted", required=True, type=Path)
    parser.add_argument("--shared", required=True, type=Path, help="the shared/ folder (data/eval, data/wikitext-2)")
    parser.add_argument("--limit", type=int, default=200, help="sentences of FPB and SST-5")
    parser.add_argument("--subject-limit", type=int, default=3, help="questions per FinEval / C-Eval subject")
    parser.add_argument("--exam-shots", type=int, default=5, help="few-shot examples for FinEval / C-Eval")
    parser.add_argument("--kl-windows", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        pool = fpb_fewshot_pool(args.shared / "data" / "eval" / "fpb", Path(tmp) / "fpb_fewshot.txt")
        suite = entries(args.shared, args.limit, args.subject_limit, args.exam_shots, args.kl_windows, args.batch_size, pool)
        result = run_suite([args.original, args.converted], suite, ["original", "converted"])
    steady = {label: steady_state_throughput(model_dir)
              for label, model_dir in (("original", args.original), ("converted", args.converted))}
    steady["converted/original"] = {length: round(steady["converted"][length] / steady["original"][length], 4)
                                    for length in steady["original"]}
    table = render_markdown(result)
    report = {
        "benchmark": "eval",
        "settings": {"limit": args.limit, "subject_limit": args.subject_limit, "exam_shots": args.exam_shots,
                     "kl_windows": args.kl_windows, "batch_size": args.batch_size},
        "comparison": suite_summary(result),
        "throughput": throughput(result),
        "steady_state_tokens_per_second": steady,
        "table_markdown": table,
    }
    write_json_atomic(args.out, report)
    print(table)
    for name, row in report["throughput"].items():
        ratio = row.get("tokens_per_second_ratio")
        speeds = ", ".join(f"{label} {stats.get('tokens_per_second')} tok/s" for label, stats in row["per_model"].items())
        print(f"{name}: {speeds}" + (f" (converted/original {ratio})" if ratio else ""))
    for length, ratio in steady["converted/original"].items():
        print(f"steady state, {length}-token forward: original {steady['original'][length]} tok/s, "
              f"converted {steady['converted'][length]} tok/s (converted/original {ratio})")
    print(f"→ {args.out}")
    json.dumps(report)  # fail loudly here, not in a reader, if anything is not JSON-serialisable


if __name__ == "__main__":
    main()
