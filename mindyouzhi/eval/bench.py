"""Run one benchmark task on one model: score its items, aggregate accuracy, time it.

Scoring rules:

* choice items, ``scoring="loglik"``: every continuation is scored; ``accuracy`` takes the one with
  the highest summed log-probability, ``acc_norm`` the highest log-probability per character
  (lm-evaluation-harness's ``acc`` / ``acc_norm``); ties go to the first choice.
* choice items, ``scoring="calibrated"`` (label-word classification only): contextual calibration
  (Zhao et al. 2021) — each label's log-probability minus its log-probability after the same prompt
  with the text replaced by the content-free input "N/A", which removes the model's prior for
  label words (a small model otherwise predicts one label for almost every input).
* choice items, ``scoring="generate"`` (lettered questions only): greedy generation, the answer
  letters are extracted from the response (``tasks.answers``) and must equal the gold set.
* generation items: greedy generation cut at the item's stop strings, then the task's own scorer
  (IFEval rules, MATH-500 answer equivalence, CrossNER entity F1, CFLUE-A metrics) or exact match
  and, for a JSON gold, JSON validity and per-field accuracy.  With ``batch_size`` > 1 a real model
  decodes the prompts together through the paged serving engine (continuous batching).

``macro_accuracy`` is the mean of the per-group accuracies (the C-Eval "average" over subjects;
for classification tasks, grouped by gold label, it is the balanced accuracy).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from mindyouzhi.errors import UserError

from . import SCORING_MODES
from .lm import ContinuationScorer, LanguageModel, generate_text, generate_texts, progress
from .tasks import ChoiceItem, GenerationItem, TaskOptions, TaskSpec, get_task
from .tasks.answers import extract_letters, score_generation
from .tasks.base import by_group, rate

DEFAULT_MAX_NEW_TOKENS = {"choice": 32, "generation": 256}


@dataclass(frozen=True)
class BenchSettings:
    batch_size: int = 1
    scoring: str = "loglik"
    max_new_tokens: Optional[int] = None  # None: 32 for lettered answers, 256 for generation tasks
    chat: bool = False  # wrap each prompt in the tokenizer's chat template as one user turn
    pad_multiple: int = 64  # see ContinuationScorer: bounds the number of distinct jitted shapes
    max_batch_tokens: Optional[int] = 2048  # sequences x padded length per forward: bounds memory
    progress: bool = True


@dataclass(frozen=True)
class PreparedTask:
    """A task's items, loaded and validated before any model is (data errors surface in seconds)."""

    spec: TaskSpec
    items: list
    header: dict  # task, data, shots, limit: echoed in the result


def prepare_task(task: str, data, *, shots: Optional[int] = None, limit: Optional[int] = None,
                 fewshot_data=None, scoring: str = "loglik") -> PreparedTask:
    spec = get_task(task)
    if scoring not in SCORING_MODES:
        raise UserError(f"--scoring {scoring!r} is not one of {', '.join(SCORING_MODES)}")
    if scoring == "generate" and spec.kind == "choice" and not spec.letter_answers:
        raise UserError(f"--scoring generate needs lettered answers; task {task} is scored by log-likelihood only")
    if scoring == "calibrated" and not spec.classification:
        raise UserError(f"--scoring calibrated applies to label-word classification tasks (fpb, sst5), not {task}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    shots = spec.default_shots if shots is None else shots
    if shots < 0:
        raise UserError(f"--shots must be >= 0, got {shots}")
    options = TaskOptions(shots=shots, limit=limit, fewshot_data=Path(fewshot_data) if fewshot_data else None)
    items = spec.load(Path(data), options)
    return PreparedTask(spec, items, {"task": spec.name, "data": str(data), "shots": shots, "limit": limit})


def run_prepared(lm: LanguageModel, prepared: PreparedTask, settings: BenchSettings = BenchSettings()) -> dict:
    """Evaluate ``lm`` on prepared items; a JSON-ready result with per-item rows."""
    return {**prepared.header, **evaluate_items(lm, prepared.spec, prepared.items, settings)}


def run_bench(
    lm: LanguageModel,
    task: str,
    data,
    *,
    shots: Optional[int] = None,
    limit: Optional[int] = None,
    fewshot_data=None,
    settings: BenchSettings = BenchSettings(),
) -> dict:
    """Load ``task`` from ``data`` and evaluate ``lm`` on it."""
    prepared = prepare_task(task, data, shots=shots, limit=limit, fewshot_data=fewshot_data, scoring=settings.scoring)
    return run_prepared(lm, prepared, settings)


def evaluate_items(lm: LanguageModel, spec: TaskSpec, items: Sequence, settings: BenchSettings) -> dict:
    started = time.perf_counter()
    if spec.kind == "choice" and settings.scoring in ("loglik", "calibrated"):
        rows, work = _score_choices_by_loglik(lm, spec, items, settings)
    elif spec.kind == "choice":
        rows, work = _score_choices_by_generation(lm, spec, items, settings)
    else:
        rows, work = _score_generations(lm, spec, items, settings)
    seconds = time.perf_counter() - started
    # A task scorer that marks rows ``correct`` (MATH-500) is aggregated like choice items.
    by_correct = spec.kind == "choice" or (bool(rows) and "correct" in rows[0])
    aggregate = spec.aggregate or (_aggregate_choices if by_correct else _aggregate_generations)
    metrics, groups, extra = aggregate(rows)
    stats = {"seconds": round(seconds, 3), "items_per_second": _rate(len(rows), seconds), **work}
    if "forward_tokens" in work:
        stats["tokens_per_second"] = _rate(work["forward_tokens"], seconds)
    if "new_tokens" in work:
        stats["new_tokens_per_second"] = _rate(work["new_tokens"], seconds)
    scoring = settings.scoring if spec.kind == "choice" else "generate"
    return {
        "scoring": scoring,
        "chat": settings.chat,
        "n": len(rows),
        "primary_metric": spec.primary_metric if scoring != "generate" or spec.kind == "generation" else "accuracy",
        "metrics": metrics,
        "grouped_by": spec.grouped_by,
        "group_metric": spec.group_metric,
        "groups": groups,
        **extra,
        "stats": stats,
        "items": rows,
    }


def _rate(count: float, seconds: float) -> Optional[float]:
    return round(count / seconds, 3) if seconds > 0 else None


def _prompt(lm: LanguageModel, text: str, chat: bool) -> str:
    if not chat:
        return text
    return lm.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)


def _max_new_tokens(spec: TaskSpec, settings: BenchSettings) -> int:
    return settings.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[spec.kind]


def _score_choices_by_loglik(lm, spec: TaskSpec, items: Sequence[ChoiceItem], settings: BenchSettings):
    scorer = ContinuationScorer(lm, settings.batch_size, settings.pad_multiple, spec.name if settings.progress else None,
                                settings.max_batch_tokens)
    contexts = [_prompt(lm, item.context, settings.chat) for item in items]
    requests = [(context, choice) for item, context in zip(items, contexts) for choice in item.choices]
    calibrated = settings.scoring == "calibrated"
    priors: dict[str, np.ndarray] = {}
    if calibrated:
        # Few-shot prompts differ only in the text, so most items share one content-free context.
        free = list(dict.fromkeys(_prompt(lm, item.calibration_context, settings.chat) for item in items))
        free_scores = iter(scorer.score([(context, choice) for context in free for choice in items[0].choices]))
        priors = {context: np.array([next(free_scores).logprob for _ in items[0].choices]) for context in free}
    scores = iter(scorer.score(requests))
    rows = []
    for item in items:
        logprobs = np.array([next(scores).logprob for _ in item.choices])
        if calibrated:
            logprobs = logprobs - priors[_prompt(lm, item.calibration_context, settings.chat)]
        per_char = logprobs / np.array([max(len(choice), 1) for choice in item.choices])
        best, best_norm = int(np.argmax(logprobs)), int(np.argmax(per_char))
        rows.append({
            "id": item.item_id,
            "group": item.group,
            "gold": item.labels[item.gold],
            "pred": item.labels[best],
            "correct": best == item.gold,
            "pred_norm": item.labels[best_norm],
            "correct_norm": best_norm == item.gold,
            "logprobs": [round(float(value), 4) for value in logprobs],
        })
    stats = scorer.stats
    work = {
        "forward_sequences": stats.forward_sequences,
        "forward_tokens": stats.forward_tokens,
        "truncated_contexts": stats.truncated_requests,
    }
    return rows, work


def _each_with_progress(items: Sequence, desc: Optional[str]):
    bar = progress(len(items), desc, "item")
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()


def _score_choices_by_generation(lm, spec: TaskSpec, items: Sequence[ChoiceItem], settings: BenchSettings):
    rows, new_tokens = [], 0
    max_new = _max_new_tokens(spec, settings)
    for item in _each_with_progress(items, spec.name if settings.progress else None):
        generation = generate_text(lm, _prompt(lm, item.context, settings.chat), max_new)
        new_tokens += generation.new_tokens
        multiple = any(len(label) > 1 for label in item.labels)
        predicted = extract_letters(generation.text, item.letters, multiple)
        rows.append({
            "id": item.item_id,
            "group": item.group,
            "gold": item.labels[item.gold],
            "pred": predicted,
            "correct": predicted == item.labels[item.gold],
            "response": generation.text,
        })
    return rows, {"new_tokens": new_tokens}


def _generate_all(lm, prompts: Sequence[str], max_new: int, stops: Sequence[tuple[str, ...]], settings: BenchSettings,
                  desc: Optional[str]) -> list:
    if settings.batch_size > 1 and len(prompts) > 1:
        return generate_texts(lm, prompts, max_new, stops, batch_size=settings.batch_size, progress_desc=desc)
    return [generate_text(lm, prompt, max_new, stop) for prompt, stop in
            zip(_each_with_progress(prompts, desc), stops)]


def _score_generations(lm, spec: TaskSpec, items: Sequence[GenerationItem], settings: BenchSettings):
    max_new = _max_new_tokens(spec, settings)
    prompts = [_prompt(lm, item.prompt, settings.chat) for item in items]
    generations = _generate_all(lm, prompts, max_new, [item.stop for item in items], settings,
                                spec.name if settings.progress else None)
    rows = []
    for item, generation in zip(items, generations):
        row = {"id": item.item_id, "group": item.group, "response": generation.text}
        if spec.score is not None:
            row.update(spec.score(generation.text, item))
        else:
            score = score_generation(generation.text, item.gold)
            row.update(gold=item.gold, exact=score.exact)
            if score.json_valid is not None:
                row["json_valid"] = score.json_valid
                row["fields"] = score.fields
        rows.append(row)
    return rows, {"new_tokens": sum(generation.new_tokens for generation in generations)}


def _aggregate_choices(rows: Sequence[dict]):
    has_norm = bool(rows) and "correct_norm" in rows[0]
    groups = {}
    for name, members in by_group(rows).items():
        groups[name] = {"n": len(members), "accuracy": rate(row["correct"] for row in members)}
        if has_norm:
            groups[name]["acc_norm"] = rate(row["correct_norm"] for row in members)
    metrics = {"accuracy": rate(row["correct"] for row in rows)}
    if has_norm:
        metrics["acc_norm"] = rate(row["correct_norm"] for row in rows)
    metrics["macro_accuracy"] = rate(group["accuracy"] for group in groups.values())
    return metrics, groups, {}


def _aggregate_generations(rows: Sequence[dict]):
    groups = {name: {"n": len(members), "exact_match": rate(row["exact"] for row in members)} for name, members in by_group(rows).items()}
    metrics = {"exact_match": rate(row["exact"] for row in rows)}
    extra = {}
    json_rows = [row for row in rows if "json_valid" in row]
    if json_rows:
        metrics["json_valid"] = rate(row["json_valid"] for row in json_rows)
        per_field: dict[str, list[bool]] = {}
        for row in json_rows:
            for path, correct in row["fields"].items():
                per_field.setdefault(path, []).append(correct)
        metrics["field_accuracy"] = rate(flag for flags in per_field.values() for flag in flags)
        extra["fields"] = {path: {"n": len(flags), "accuracy": rate(flags)} for path, flags in sorted(per_field.items())}
    return metrics, groups, extra


def summary(result: dict) -> dict:
    """The result without per-item rows (what ``--json`` prints)."""
    return {key: value for key, value in result.items() if key != "items"}


def format_summary(result: dict, model: str = "") -> str:
    """Human-readable report: headline metrics, then one line per group when there are several."""
    metrics = result["metrics"]
    primary = result["primary_metric"]
    head = f"{result['task']}{' on ' + model if model else ''}: {primary} {metrics[primary]:.4f} over {result['n']} items"
    lines = [head]
    details = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items() if name != primary)
    setup = f"shots {result['shots']}, scoring {result['scoring']}" + (f", limit {result['limit']} per file" if result["limit"] else "")
    lines.append(f"  {details}  ({setup})" if details else f"  ({setup})")
    stats = result["stats"]
    rate = f", {stats['tokens_per_second']} tok/s" if stats.get("tokens_per_second") else ""
    lines.append(f"  {stats['seconds']} s, {stats['items_per_second']} items/s{rate}")
    if stats.get("truncated_contexts"):
        lines.append(f"  warning: {stats['truncated_contexts']} prompt(s) were cut on the left to fit max_seq_len")
    if len(result["groups"]) > 1:
        key = result.get("group_metric") or ("accuracy" if "accuracy" in metrics else "exact_match")
        width = max(len(name) for name in result["groups"])
        lines.append(f"  per {result['grouped_by']}:")
        for name, group in result["groups"].items():
            lines.append(f"    {name:<{width}}  {group[key]:.4f}  (n={group['n']})")
    for path, field_result in result.get("fields", {}).items():
        lines.append(f"  field {path}: {field_result['accuracy']:.4f} (n={field_result['n']})")
    return "\n".join(lines)
