"""Per-request decoding parameters and the token choice.

The choice itself is ``mindyouzhi.models.generation.sample_token``, the single-sequence
reference's own, so a request served by the engine draws exactly what ``generate`` draws from the
same logits and seed.  Each request owns its random generator: batching, preemption and other
requests never change the stream of random numbers it sees.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from mindyouzhi.errors import UserError
from mindyouzhi.models.generation import sample_token


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: Optional[int] = None  # None = fresh entropy
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens {self.max_new_tokens!r}: must be a positive integer")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise UserError(f"temperature {self.temperature!r}: must be a finite number ≥ 0")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise UserError(f"top_p {self.top_p!r}: must be in (0, 1]")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise UserError(f"seed {self.seed!r}: must be a non-negative integer")

    def make_rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


def choose_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    return sample_token(logits, params.temperature, params.top_p, rng)
