"""Percentile bootstrap intervals for benchmark scores and perplexity.

A benchmark's score is an aggregate of its per-item rows (accuracy, micro-F1, IFEval's prompt-level
accuracy …), so the interval resamples *items* and recomputes the task's own aggregate — the same
function that produced the point estimate — rather than assuming a mean of 0/1 flags.  Two models
evaluated on the same items get a *paired* interval of their difference: both are resampled with
the same indices, which removes the between-item variance the two share (the honest way to say
"B is better than A beyond noise" at small n).

Perplexity resamples windows: ppl = exp(Σ nll_w / Σ tokens_w) over the drawn windows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

DEFAULT_REPLICATES = 1000
DEFAULT_SEED = 20261206

Metric = Callable[[Sequence[dict]], float]


@dataclass(frozen=True)
class Interval:
    """A point estimate with its 95 % percentile-bootstrap interval."""

    value: float
    low: float
    high: float
    n: int

    def excludes(self, value: float) -> bool:
        return value < self.low or value > self.high

    def to_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n}


def _draws(n: int, replicates: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(replicates, n))


def _percentiles(samples: Sequence[float], level: float) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(np.asarray(samples, np.float64), [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_metric(rows: Sequence[dict], metric: Metric, replicates: int = DEFAULT_REPLICATES,
                     seed: int = DEFAULT_SEED, level: float = 0.95) -> Interval:
    """Interval of ``metric(rows)`` over item resamples (``metric`` is the task's own aggregate)."""
    rows = list(rows)
    if not rows:
        raise ValueError("no rows to bootstrap")
    samples = [metric([rows[i] for i in draw]) for draw in _draws(len(rows), replicates, seed)]
    return Interval(metric(rows), *_percentiles(samples, level), len(rows))


def paired_difference(rows_a: Sequence[dict], rows_b: Sequence[dict], metric: Metric,
                      replicates: int = DEFAULT_REPLICATES, seed: int = DEFAULT_SEED, level: float = 0.95,
                      key: Callable[[dict], object] = lambda row: row["id"]) -> Interval:
    """Interval of ``metric(b) − metric(a)`` with both resampled on the same items.

    The two row lists are matched by ``key`` (the item id); a mismatch in the item sets is an error,
    not a silent unpaired comparison.
    """
    by_key = {key(row): row for row in rows_b}
    if len(by_key) != len(rows_b) or len(rows_a) != len(rows_b) or any(key(row) not in by_key for row in rows_a):
        raise ValueError("paired bootstrap needs the same items (by id) on both sides")
    rows_a = list(rows_a)
    rows_b = [by_key[key(row)] for row in rows_a]
    samples = []
    for draw in _draws(len(rows_a), replicates, seed):
        samples.append(metric([rows_b[i] for i in draw]) - metric([rows_a[i] for i in draw]))
    return Interval(metric(rows_b) - metric(rows_a), *_percentiles(samples, level), len(rows_a))


def bootstrap_perplexity(window_nll: Sequence[float], window_tokens: Sequence[int] | int,
                         replicates: int = DEFAULT_REPLICATES, seed: int = DEFAULT_SEED,
                         level: float = 0.95) -> Interval:
    """Interval of exp(Σ nll / Σ tokens) over window resamples."""
    nll = np.asarray(window_nll, np.float64)
    tokens = np.broadcast_to(np.asarray(window_tokens, np.float64), nll.shape)
    if nll.size == 0:
        raise ValueError("no windows to bootstrap")
    draws = _draws(nll.size, replicates, seed)
    samples = np.exp(nll[draws].sum(axis=1) / tokens[draws].sum(axis=1))
    return Interval(math.exp(nll.sum() / tokens.sum()), *_percentiles(samples, level), int(nll.size))


def paired_perplexity_ratio(nll_a: Sequence[float], nll_b: Sequence[float], window_tokens: Sequence[int] | int,
                            replicates: int = DEFAULT_REPLICATES, seed: int = DEFAULT_SEED,
                            level: float = 0.95) -> Interval:
    """Interval of ppl(b) / ppl(a) on the same windows, resampled together."""
    a, b = np.asarray(nll_a, np.float64), np.asarray(nll_b, np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("paired perplexity needs the same windows on both sides")
    tokens = np.broadcast_to(np.asarray(window_tokens, np.float64), a.shape)
    draws = _draws(a.size, replicates, seed)
    samples = np.exp((b[draws].sum(axis=1) - a[draws].sum(axis=1)) / tokens[draws].sum(axis=1))
    return Interval(math.exp((b.sum() - a.sum()) / tokens.sum()), *_percentiles(samples, level), int(a.size))


def _closure_interval(point: float, samples: np.ndarray, n: int, level: float) -> Interval:
    """``samples`` holds each replicate's closure; a replicate whose drop vanished (≤ 0) has none
    (NaN) and is left out — the share of a drop that is not there is undefined."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        raise ValueError("no replicate has a positive drop to close")
    return Interval(point, *_percentiles(finite, level), n)


def _share(reference: np.ndarray, degraded: np.ndarray, recovered: np.ndarray) -> np.ndarray:
    """(recovered − degraded) / (reference − degraded) on higher-is-better scores, NaN where the drop ≤ 0."""
    drop = reference - degraded
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(drop > 0, (recovered - degraded) / drop, np.nan)


def score_gap_closure(tasks: Sequence[tuple[Sequence[dict], Sequence[dict], Sequence[dict], Metric]],
                      replicates: int = DEFAULT_REPLICATES, seed: int = DEFAULT_SEED, level: float = 0.95,
                      key: Callable[[dict], object] = lambda row: row["id"]) -> Interval:
    """Interval of the share of a score drop a later model recovers, on the mean over tasks.

    Each task is ``(reference_rows, degraded_rows, recovered_rows, metric)`` — e.g. the original, the
    converted and the distilled model on the same items.  The share is
    (mean(recovered) − mean(degraded)) / (mean(reference) − mean(degraded)), means over tasks.  Each
    task's items are resampled with its own draws (tasks are independent samples), the same draw for
    the three models (they answered the same items: paired).  ``n`` is the number of items in all.
    """
    if not tasks:
        raise ValueError("no tasks to bootstrap")
    rng = np.random.default_rng(seed)
    points, samples, count = np.zeros(3), np.zeros((3, replicates)), 0
    for reference, degraded, recovered, metric in tasks:
        rows = [list(reference)]
        for other in (degraded, recovered):
            by_key = {key(row): row for row in other}
            if len(by_key) != len(rows[0]) or any(key(row) not in by_key for row in rows[0]):
                raise ValueError("score_gap_closure needs the same items (by id) for the three models")
            rows.append([by_key[key(row)] for row in rows[0]])
        draws = rng.integers(0, len(rows[0]), size=(replicates, len(rows[0])))
        for model, model_rows in enumerate(rows):
            points[model] += metric(model_rows)
            samples[model] += [metric([model_rows[i] for i in draw]) for draw in draws]
        count += len(rows[0])
    point = _share(*points[:, None])[0]
    return _closure_interval(float(point), _share(*samples), count, level)


def perplexity_gap_closure(nll_reference: Sequence[float], nll_degraded: Sequence[float],
                           nll_recovered: Sequence[float], window_tokens: Sequence[int] | int,
                           replicates: int = DEFAULT_REPLICATES, seed: int = DEFAULT_SEED,
                           level: float = 0.95) -> Interval:
    """Interval of the share of a perplexity rise a later model removes, (ppl_degraded −
    ppl_recovered) / (ppl_degraded − ppl_reference), the three models' windows resampled together."""
    arrays = [np.asarray(x, np.float64) for x in (nll_reference, nll_degraded, nll_recovered)]
    if arrays[0].size == 0 or any(a.shape != arrays[0].shape for a in arrays):
        raise ValueError("perplexity_gap_closure needs the same windows for the three models")
    nll = np.stack(arrays)
    tokens = np.broadcast_to(np.asarray(window_tokens, np.float64), nll.shape[1:])
    draws = _draws(nll.shape[1], replicates, seed)
    ppl = np.exp(nll[:, draws].sum(axis=2) / tokens[draws].sum(axis=1))          # [3, replicates]
    point = np.exp(nll.sum(axis=1) / tokens.sum())
    return _closure_interval(float(_share(-point[0], -point[1], -point[2])), _share(-ppl[0], -ppl[1], -ppl[2]),
                             int(nll.shape[1]), level)


def task_metric(task: str, metric: str) -> Optional[Metric]:
    """The aggregate a registered task scores its rows with, reduced to one named metric."""
    from .bench import _aggregate_choices, _aggregate_generations
    from .tasks import TASKS

    spec = TASKS.get(task)
    if spec is None:
        return None

    def compute(rows: Sequence[dict]) -> float:
        if spec.aggregate is not None:
            aggregate = spec.aggregate
        elif spec.kind == "choice" or (rows and "correct" in rows[0]):
            aggregate = _aggregate_choices
        else:
            aggregate = _aggregate_generations
        return float(aggregate(rows)[0][metric])

    return compute
