"""Learning-rate schedule: linear warmup then cosine decay to ``lr_end`` (MindFormers' CosineWithWarmUpLR).

Computed on the host from the optimizer step number and passed to the jitted step as a scalar, so
a resumed run continues the same curve by construction.  Step ``s`` (0-based) uses ``lr(s)``:
warmup takes the rate from ``warmup_lr_init`` to ``learning_rate`` over ``warmup_steps`` steps
(the first step already uses a non-zero rate), then the cosine runs towards ``lr_end``, which it
reaches at step ``total_steps`` — one past the last step, as in MindFormers' CosineWithWarmUpLR and
transformers' ``get_cosine_schedule_with_warmup`` — so every step, the last one included, updates
the weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class CosineWithWarmUp:
    learning_rate: float
    total_steps: int
    warmup_steps: int = 0
    lr_end: float = 0.0
    warmup_lr_init: float = 0.0

    @classmethod
    def from_recipe(cls, section: dict, run_steps: int) -> "CosineWithWarmUp":
        total = section["total_steps"] if section["total_steps"] and section["total_steps"] > 0 else run_steps
        warmup = section["warmup_steps"]
        if warmup is None:
            warmup = warmup_steps_for(section["warmup_ratio"], total)
        return cls(float(section["learning_rate"]), int(total), int(min(warmup, total)), float(section["lr_end"]),
                   float(section["warmup_lr_init"]))

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr_init + (self.learning_rate - self.warmup_lr_init) * (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.lr_end + 0.5 * (self.learning_rate - self.lr_end) * (1.0 + math.cos(math.pi * progress))


def warmup_steps_for(ratio: float, total_steps: int) -> int:
    """ceil(ratio · total): a ratio of 0.01 gives at least one warmup step on a short run."""
    return int(math.ceil(ratio * total_steps)) if ratio > 0 else 0
