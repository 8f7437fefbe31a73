"""Perplexity the way the paper measures it (``mindyouzhi eval ppl``).

The corpus (any format ``mindyouzhi.textdata`` reads) is tokenized as one stream (no special
tokens), cut into non-overlapping windows of ``seq_len`` tokens (a trailing partial window is
dropped), every window predicts its last ``seq_len − 1`` tokens, and ppl = exp(total NLL / predicted tokens).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from mindyouzhi.errors import UserError
from mindyouzhi.io_utils import available_memory_bytes
from mindyouzhi.textdata import read_text, token_stream  # noqa: F401  (the readers callers import from here)


def windows(tokens: np.ndarray, seq_len: int, max_windows: Optional[int], path: str | Path, flag: str = "--data") -> np.ndarray:
    """Non-overlapping windows [n, seq_len]; refuses text shorter than one window."""
    if seq_len < 2:
        raise UserError(f"--seq-len {seq_len}: must be at least 2")
    count = len(tokens) // seq_len
    if count == 0:
        raise UserError(f"{flag} {path}: {len(tokens)} tokens, shorter than one window of --seq-len {seq_len}")
    if max_windows is not None:
        if max_windows < 1:
            raise UserError(f"--max-windows {max_windows}: must be at least 1")
        count = min(count, max_windows)
    return tokens[: count * seq_len].reshape(count, seq_len)


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    seconds: float
    window_nll: list = field(default_factory=list)  # per window (its seq_len − 1 predicted tokens): bootstrap intervals
    streamed: bool = False

    @property
    def tokens_per_second(self) -> float:
        return self.windows * self.seq_len / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "tokens": self.tokens, "windows": self.windows, "seq_len": self.seq_len,
                "nll": self.nll, "seconds": round(self.seconds, 3), "tokens_per_second": round(self.tokens_per_second, 1),
                "streamed_layers": self.streamed, "window_nll": [round(value, 6) for value in self.window_nll]}


def window_nll(score: Callable[[np.ndarray, np.ndarray], np.ndarray], batch: np.ndarray) -> np.ndarray:
    """NLL of each window of a batch with a per-token NLL scorer (inputs, targets) → [B, T-1]."""
    return np.asarray(score(batch[:, :-1], batch[:, 1:]), np.float64).sum(axis=1)


def _result(per_window: np.ndarray, window_ids: np.ndarray, start: float, streamed: bool) -> PerplexityResult:
    total = float(per_window.sum())
    predicted = window_ids.shape[0] * (window_ids.shape[1] - 1)
    return PerplexityResult(math.exp(total / predicted), total, predicted, window_ids.shape[0], window_ids.shape[1],
                            time.perf_counter() - start, per_window.tolist(), streamed)


def perplexity(runner, window_ids: np.ndarray, batch_size: int = 1, progress: Optional[Callable[[int], None]] = None) -> PerplexityResult:
    start = time.perf_counter()
    per_window = []
    for begin in range(0, len(window_ids), batch_size):
        batch = window_ids[begin: begin + batch_size]
        per_window.append(window_nll(runner.token_nll, batch))
        if progress:
            progress(batch.size)
    return _result(np.concatenate(per_window), window_ids, start, streamed=False)


def perplexity_streamed(config, source, window_ids: np.ndarray, batch_size: int = 1, precision: str = "fp32",
                        where: str = "weights", progress: Optional[Callable[[int], None]] = None) -> PerplexityResult:
    """The same perplexity with one layer in memory at a time (``runner.streamed_window_nll``)."""
    from mindyouzhi.models.runner import streamed_window_nll

    start = time.perf_counter()
    per_window = streamed_window_nll(config, source, window_ids, batch_size, precision, where, progress)
    return _result(per_window, window_ids, start, streamed=True)


def should_stream(config, precision: str, available_bytes: Optional[int] = None) -> tuple[bool, int]:
    """Stream layers when the loaded weights (fp32, plus their bf16 copies) would take more than half of
    the memory available now; (decision, bytes the loaded model would take)."""
    from mindyouzhi.serve.capacity import weight_count

    loaded = weight_count(config) * (6 if precision == "bf16" else 4)
    if available_bytes is None:
        available_bytes = available_memory_bytes()
    return available_bytes is not None and loaded > available_bytes // 2, loaded
