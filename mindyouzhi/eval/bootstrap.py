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
