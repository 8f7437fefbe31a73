"""``mindyouzhi eval bench | kl | suite``: thin click commands over bench.py, kl.py and suite.py.

Data is read and validated before a model is loaded, so a malformed file fails in seconds.  With
``--json`` exactly one JSON object goes to stdout (progress bars go to stderr); ``--out`` writes the
full result, per-item rows included, atomically.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import click

from mindyouzhi.io_utils import write_json_atomic

from . import lm as lm_module
from .bench import SCORING_MODES, BenchSettings, format_summary, prepare_task, run_prepared, summary
from .kl import DEFAULT_SEQ_LEN, format_kl, run_kl
from .suite import load_suite_config, render_markdown, run_suite, suite_summary
from .tasks import TASKS

_MODEL_DIR = click.Path(exists=True, file_okay=False, path_type=Path)


def _emit_json(obj) -> None:
    click.echo(json.dumps(obj, ensure_ascii=False))


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@click.command("bench")
@click.option("--model", "model_dir", required=True, type=_MODEL_DIR, help="Model directory (GQA, MLA or hybrid).")
@click.option("--task", required=True, type=click.Choice(list(TASKS)), help="Benchmark format.")
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Data file, or for ceval/fineval/financeiq a split directory (e.g. fineval/val) or one subject CSV.")
@click.option("--shots", type=int, default=None, help="Few-shot examples per question (default 5 for ceval/fineval/financeiq, else 0).")
@click.option("--limit", type=int, default=None, help="Evaluate only the first N questions of each data file.")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Sequences per forward pass.")
@click.option("--max-batch-tokens", type=int, default=2048, show_default=True,
              help="Cap on sequences x padded length per forward (memory grows with it times the vocabulary).")
@click.option("--scoring", type=click.Choice(SCORING_MODES), default="loglik", show_default=True,
              help="Choice tasks: answer log-likelihood, or greedy generation + answer extraction (lettered answers).")
@click.option("--max-new-tokens", type=int, default=None, help="Generation budget (default 32 for letters, 256 for gen-jsonl).")
@click.option("--chat", is_flag=True, help="Wrap each prompt in the tokenizer's chat template (instruct models).")
@click.option("--fewshot-data", type=click.Path(path_type=Path), default=None,
              help="Where few-shot examples come from (default for exam CSVs: the sibling dev/ split).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (no per-item rows) instead of the summary.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the full result JSON here.")
def bench_cmd(model_dir, task, data, shots, limit, batch_size, max_batch_tokens, scoring, max_new_tokens, chat, fewshot_data, as_json, out):
    """Accuracy of one model on a multiple-choice, classification or generation benchmark."""
    prepared = prepare_task(task, data, shots=shots, limit=limit, fewshot_data=fewshot_data, scoring=scoring)
    model = lm_module.load_language_model(model_dir)
    settings = BenchSettings(batch_size=batch_size, scoring=scoring, max_new_tokens=max_new_tokens, chat=chat,
                             max_batch_tokens=max_batch_tokens)
    result = {"model": str(model_dir), **run_prepared(model, prepared, settings)}
    if out is not None:
        write_json_atomic(out, result)
    if as_json:
        _emit_json(summary(result))
    else:
        click.echo(format_summary(result, str(model_dir)))


@click.command("kl")
@click.option("--teacher", "teacher_dir", required=True, type=_MODEL_DIR, help="Reference model (the original).")
@click.option("--student", "student_dir", required=True, type=_MODEL_DIR, help="Model compared with it (converted / trained).")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Text file (one token stream cut into windows) or .jsonl with a 'text' field per record.")
@click.option("--seq-len", type=int, default=DEFAULT_SEQ_LEN, show_default=True, help="Tokens per window.")
@click.option("--max-windows", type=int, default=None, help="Use only the first N windows.")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--buckets", default=None, help="Position-bucket boundaries, e.g. 16,64,256 (default 16,64,256,1024,... below seq-len).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the summary.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the result JSON here.")
def kl_cmd(teacher_dir, student_dir, data, seq_len, max_windows, batch_size, buckets, as_json, out):
    """Mean token KL(teacher‖student) and top-1 agreement, overall and by position in the window."""
    teacher = lm_module.load_language_model(teacher_dir)
    student = lm_module.load_language_model(student_dir)
    result = run_kl(teacher, student, data, seq_len=seq_len, max_windows=max_windows, batch_size=batch_size, buckets=buckets)
    result = {"teacher": str(teacher_dir), "student": str(student_dir), **result}
    if out is not None:
        write_json_atomic(out, result)
    if as_json:
        _emit_json(result)
    else:
        click.echo(format_kl(result))


@click.command("suite")
@click.option("--model", "model_dirs", required=True, multiple=True, type=_MODEL_DIR,
              help="Model directory; repeat to compare (the first is the reference).")
@click.option("--label", "labels", multiple=True, help="Column name per --model, in order (default: directory names).")
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML listing the tasks (see docs/eval.md).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for results.json (with per-item rows) and results.md.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (no per-item rows) instead of the table.")
def suite_cmd(model_dirs, labels, config_path, out_dir, as_json):
    """Several benchmarks on one or more models, with a side-by-side Markdown + JSON table."""
    entries = load_suite_config(config_path)
    result = {"config": str(config_path), **run_suite(model_dirs, entries, labels, loader=lm_module.load_language_model)}
    table = render_markdown(result)
    if out_dir is not None:
        write_json_atomic(out_dir / "results.json", result)
        _write_text_atomic(out_dir / "results.md", table)
    if as_json:
        _emit_json(suite_summary(result))
    else:
        click.echo(table, nl=False)
