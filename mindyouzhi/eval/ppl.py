"""Perplexity the way the paper measures it (``mindyouzhi eval ppl``).

The corpus (any format ``mindyouzhi.textdata`` reads) is tokenized as one stream (no special
tokens), cut into non-overlapping windows of ``seq_len`` tokens (a trailing partial window is
dropped), every window predicts its last ``seq_len − 1`` tokens, and ppl = exp(total NLL / predicted tokens).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from mindyouzhi.errors import UserError
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

    @property
    def tokens_per_second(self) -> float:
        return self.windows * self.seq_len / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "tokens": self.tokens, "windows": self.windows, "seq_len": self.seq_len,
                "nll": self.nll, "seconds": round(self.seconds, 3), "tokens_per_second": round(self.tokens_per_second, 1)}


def window_nll(score: Callable[[np.ndarray, np.ndarray], np.ndarray], batch: np.ndarray) -> float:
    """Total NLL of a batch of windows with a per-token NLL scorer (inputs, targets) → [B, T-1]."""
    return float(np.asarray(score(batch[:, :-1], batch[:, 1:]), np.float64).sum())


def perplexity(runner, window_ids: np.ndarray, batch_size: int = 1, progress: Optional[Callable[[int], None]] = None) -> PerplexityResult:
    start = time.perf_counter()
    total = 0.0
    for begin in range(0, len(window_ids), batch_size):
        batch = window_ids[begin: begin + batch_size]
        total += window_nll(runner.token_nll, batch)
        if progress:
            progress(batch.size)
    predicted = window_ids.shape[0] * (window_ids.shape[1] - 1)
    return PerplexityResult(math.exp(total / predicted), total, predicted, window_ids.shape[0], window_ids.shape[1],
                            time.perf_counter() - start)
