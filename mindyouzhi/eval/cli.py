"""``mindyouzhi eval bench | kl | suite``: thin click commands over bench.py, kl.py and suite.py.

Data is read and validated before a model is loaded, so a malformed file fails in seconds.  With
``--json`` exactly one JSON object goes to stdout (progress bars go to stderr); ``--report`` writes
the full result, per-item rows included, atomically.  The scorers (numpy and the model code) are
imported inside the commands: ``--help`` never waits for them.
"""
from __future__ import annotations

from pathlib import Path

import click

from mindyouzhi.cli_support import (emit, forward_precision_option, json_option, overwrite_option, progress_option,
                                     renamed_option)
from mindyouzhi.io_utils import write_json_atomic, write_text_atomic
from mindyouzhi.paths import check_outputs

from . import DEFAULT_KL_SEQ_LEN, SCORING_MODES
from .tasks import TASKS

_MODEL_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
_REPORT = click.Path(dir_okay=False, path_type=Path)
_REPORT_HELP = "Also write the full result JSON (per-item rows included) to this file; formerly --out."


@click.command("bench")
@click.option("--model", "model_dir", required=True, type=_MODEL_DIR, help="Model directory (GQA, MLA or hybrid).")
@click.option("--task", required=True, type=click.Choice(list(TASKS)), help="Benchmark format.")
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Data file, split directory or the benchmark's root folder as downloaded (fineval/ → its val "
                   "split, financeiq/ → test, CFLUE's knowledge/, CrossNER's ner_data/); see docs/eval.md.")
@click.option("--shots", type=int, default=None, help="Few-shot examples per question (default 5 for ceval/fineval/financeiq, else 0).")
@click.option("--limit", type=int, default=None, help="Evaluate only the first N questions of each data file.")
@click.option("--batch-size", type=int, default=1, show_default=True,
              help="Sequences per forward pass; generation tasks decode this many together in the serving engine.")
@click.option("--max-batch-tokens", type=int, default=2048, show_default=True,
              help="Cap on sequences x padded length per forward (memory grows with it times the vocabulary).")
@click.option("--scoring", type=click.Choice(SCORING_MODES), default="loglik", show_default=True,
              help="Choice tasks: answer log-likelihood; 'calibrated' (fpb, sst5) minus the label prior under a "
                   "content-free prompt; or greedy generation + answer extraction (lettered answers).")
@click.option("--max-new-tokens", type=int, default=None, help="Generation budget (default 32 for letters, 256 for generation tasks).")
@click.option("--chat", is_flag=True, help="Wrap each prompt in the tokenizer's chat template (instruct models).")
@click.option("--fewshot-data", type=click.Path(path_type=Path), default=None,
              help="Where few-shot examples come from (default for exam CSVs: the sibling dev/ split).")
@click.option("--report", type=_REPORT, default=None, help=_REPORT_HELP)
@renamed_option("--out", "--report", "report", type=_REPORT)
@forward_precision_option
@overwrite_option
@progress_option
@json_option
def bench_cmd(model_dir, task, data, shots, limit, batch_size, max_batch_tokens, scoring, max_new_tokens, chat, fewshot_data,
              report, forward_precision, overwrite, as_json):
    """Accuracy of one model on a multiple-choice, classification or generation benchmark."""
    from . import lm as lm_module
    from .bench import BenchSettings, format_summary, prepare_task, run_prepared, summary

    check_outputs({"--report": report}, {"--model": model_dir, "--data": data, "--fewshot-data": fewshot_data}, overwrite)
    prepared = prepare_task(task, data, shots=shots, limit=limit, fewshot_data=fewshot_data, scoring=scoring)
    precision = lm_module.resolve_precision(forward_precision)
    model = lm_module.load_language_model(model_dir, precision=precision["used"])
    settings = BenchSettings(batch_size=batch_size, scoring=scoring, max_new_tokens=max_new_tokens, chat=chat,
                             max_batch_tokens=max_batch_tokens)
    result = {"model": str(model_dir), **run_prepared(model, prepared, settings), "forward_precision": precision}
    if report is not None:
        write_json_atomic(report, result)
    emit(summary(result), as_json, format_summary(result, str(model_dir)))


@click.command("kl")
@click.option("--teacher", "teacher_dir", required=True, type=_MODEL_DIR, help="Reference model (the original).")
@click.option("--student", "student_dir", required=True, type=_MODEL_DIR, help="Model compared with it (converted / trained).")
@click.option("--data", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Text file (one token stream cut into windows), .jsonl with a 'text' field per record, or "
                   "generate:N[:SEED]: N tokens the teacher writes itself (default seed 1042, held out from convert's).")
@click.option("--seq-len", type=int, default=DEFAULT_KL_SEQ_LEN, show_default=True, help="Tokens per window.")
@click.option("--max-windows", type=int, default=None, help="Use only the first N windows.")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--buckets", default=None, help="Position-bucket boundaries, e.g. 16,64,256 (default 16,64,256,1024,... below seq-len).")
@click.option("--report", type=_REPORT, default=None, help=_REPORT_HELP)
@renamed_option("--out", "--report", "report", type=_REPORT)
@overwrite_option
@progress_option
@json_option
def kl_cmd(teacher_dir, student_dir, data, seq_len, max_windows, batch_size, buckets, report, overwrite, as_json):
    """Mean token KL(teacher‖student) and top-1 agreement, overall and by position in the window."""
    from . import lm as lm_module
    from .kl import format_kl, run_kl

    from mindyouzhi.generated_text import DEFAULT_CALIB_SEED, HELD_OUT_SEED_OFFSET, resolve_text_source
    from mindyouzhi.models.config import check_window

    check_outputs({"--report": report}, {"--teacher": teacher_dir, "--student": student_dir, "--data": data}, overwrite)
    data = resolve_text_source(data, teacher_dir, DEFAULT_CALIB_SEED + HELD_OUT_SEED_OFFSET, "--data")
    teacher = lm_module.load_language_model(teacher_dir)
    student = lm_module.load_language_model(student_dir)
    for model in (teacher, student):  # windows within both models' context
        if getattr(model, "config", None) is not None:
            check_window(seq_len, "--seq-len", model.config)
    result = run_kl(teacher, student, data, seq_len=seq_len, max_windows=max_windows, batch_size=batch_size, buckets=buckets)
    result = {"teacher": str(teacher_dir), "student": str(student_dir), **result}
    if report is not None:
        write_json_atomic(report, result)
    emit(result, as_json, format_kl(result))


@click.command("suite")
@click.option("--model", "model_dirs", required=True, multiple=True, type=_MODEL_DIR,
              help="Model directory; repeat to compare (the first is the reference).")
@click.option("--label", "labels", multiple=True, help="Column name per --model, in order (default: directory names).")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML listing the tasks (see docs/eval.md); or use --preset.")
@click.option("--preset", type=click.Choice(["general", "finance"]), default=None,
              help="The paper's general or finance table (benchmarks found under --data-root; the others are named).")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="With --preset: folder holding ceval/, fineval/, ... [$MINDYOUZHI_SHARED/data/eval].")
@click.option("--limit", type=int, default=None, help="With --preset: first N questions of each data file.")
@click.option("--batch-size", type=int, default=None, help="With --preset: sequences per forward / decoding batch.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for results.json (with per-item rows) and results.md.")
@forward_precision_option
@progress_option
@json_option
def suite_cmd(model_dirs, labels, config_path, preset, data_root, limit, batch_size, out_dir, forward_precision, as_json):
    """Several benchmarks on one or more models, with a side-by-side Markdown + JSON table."""
    import functools

    from mindyouzhi.errors import UserError

    from . import lm as lm_module
    from .suite import PRESETS, load_suite_config, preset_entries, render_markdown, render_paper_table, run_suite, suite_summary

    check_outputs({"--out": out_dir}, {**{"--model" + (f" #{i + 1}" if i else ""): m for i, m in enumerate(model_dirs)}, "--config": config_path,
                                       "--data-root": data_root}, overwrite=True, directories={"--out"})
    if (config_path is None) == (preset is None):
        raise UserError("give exactly one of --config FILE and --preset general|finance")
    if preset is None and (data_root or limit or batch_size):
        raise UserError("--data-root, --limit and --batch-size go with --preset (a --config sets them per task)")
    not_run: list = []
    if preset is not None:
        entries, not_run = preset_entries(preset, data_root, limit, batch_size)
    else:
        entries = load_suite_config(config_path)
    source = {"config": str(config_path)} if preset is None else {"preset": preset, "not_run": not_run}
    precision = lm_module.resolve_precision(forward_precision)
    loader = functools.partial(lm_module.load_language_model, precision=precision["used"])
    result = {**source, **run_suite(model_dirs, entries, labels, loader=loader), "forward_precision": precision}
    table = render_markdown(result)
    if preset is not None:
        table = render_paper_table(result, PRESETS[preset]["title"], not_run) + "\n" + table
    if out_dir is not None:
        write_json_atomic(out_dir / "results.json", result)
        write_text_atomic(out_dir / "results.md", table)
    emit(suite_summary(result), as_json, table.rstrip("\n"))
