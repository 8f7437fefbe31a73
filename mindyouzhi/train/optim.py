"""AdamW (decoupled weight decay, bias-corrected — the torch.optim.AdamW update) on the fused
``ops.AdamWeightDecay`` kernel (CPU, GPU and Ascend).

The fused kernel updates ``param``, ``exp_avg`` and ``exp_avg_sq`` in place; it implements the
BERT-style rule without bias correction, so the correction is folded into its scalar inputs, which
the host computes per step (``AdamW.scalars``):

    torch:  p ← p·(1 − lr·wd) − lr · (m/c1) / (√(v/c2) + ε),   c1 = 1 − β1ᵗ, c2 = 1 − β2ᵗ
    fused:  p ← p − lr′ · (m / (√v + ε′) + wd′ · p)
    with    lr′ = lr·√c2 / c1,   ε′ = ε·√c2,   wd′ = wd·lr / lr′

(verified against the torch formula in ``tests/test_train_losses.py``).  A plain-op version in the
graph kept every intermediate of every parameter alive — several GB and ~3 s per step for
SmolLM2's 28M-entry embedding on CPU; the fused kernel needs no temporaries.

Weight decay applies to matrices only (not norms or biases).  Moments are Parameters named
``exp_avg.<param>`` / ``exp_avg_sq.<param>``, saved and restored by name for resume.
"""
from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import ParameterTuple, Tensor, nn, ops

from mindyouzhi.errors import UserError

_update = ops.MultitypeFuncGraph("adamw_update")
_FUSED = ops.AdamWeightDecay()


@_update.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                  "Bool")
def _adamw_update(lr, beta1, beta2, eps, decay, no_decay, param, exp_avg, exp_avg_sq, grad, decayed):
    return _FUSED(param, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, decay if decayed else no_decay, grad)


class AdamW(nn.Cell):
    """``construct(grads, lr, eps, decay)`` applies one step with the scalars from ``scalars(step)``."""

    def __init__(self, params, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__()
        self.params = ParameterTuple(params)
        self.exp_avg = self.params.clone(prefix="exp_avg", init="zeros")
        self.exp_avg_sq = self.params.clone(prefix="exp_avg_sq", init="zeros")
        self.decayed = tuple(len(p.shape) >= 2 for p in params)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps_value = float(eps)
        self.weight_decay = float(weight_decay)
        self.beta1 = Tensor(self.betas[0], ms.float32)
        self.beta2 = Tensor(self.betas[1], ms.float32)
        self.no_decay = Tensor(0.0, ms.float32)
        self.hyper_map = ops.HyperMap()

    def scalars(self, step: int, lr: float) -> tuple[Tensor, Tensor, Tensor]:
        """(lr′, ε′, wd′) for optimizer step ``step`` (1-based) at learning rate ``lr``."""
        c1 = 1.0 - self.betas[0] ** step
        c2 = 1.0 - self.betas[1] ** step
        lr_fused = lr * math.sqrt(c2) / c1
        decay = self.weight_decay * c1 / math.sqrt(c2) if lr > 0 else 0.0
        return (Tensor(lr_fused, ms.float32), Tensor(self.eps_value * math.sqrt(c2), ms.float32),
                Tensor(decay, ms.float32))

    def construct(self, grads, lr, eps, decay):
        return self.hyper_map(ops.partial(_update, lr, self.beta1, self.beta2, eps, decay, self.no_decay),
                              self.params, self.exp_avg, self.exp_avg_sq, grads, self.decayed)

    def apply_eagerly(self, grads, lr, eps, decay) -> None:
        """The same update, one fused kernel per parameter outside any graph: no graph holding
        temporaries for every parameter at once (used by the layer-wise step)."""
        for param, exp_avg, exp_avg_sq, grad, decayed in zip(self.params, self.exp_avg, self.exp_avg_sq, grads,
                                                             self.decayed):
            _FUSED(param, exp_avg, exp_avg_sq, lr, self.beta1, self.beta2, eps, decay if decayed else self.no_decay,
                   grad)

    def moments(self) -> tuple:
        """Every moment Parameter (``exp_avg.<param>``, ``exp_avg_sq.<param>``)."""
        return (*self.exp_avg, *self.exp_avg_sq)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Optimizer state by name (each moment keeps its parameter's name after the prefix)."""
        return {p.name: p.asnumpy() for p in self.moments()}

    def load_state_arrays(self, state, where: str) -> None:
        for param in self.moments():
            if param.name not in state:
                raise UserError(f"{where}: optimizer state {param.name} is missing")
            value = np.asarray(state.get(param.name) if hasattr(state, "get") else state[param.name], np.float32)
            if tuple(value.shape) != tuple(param.shape):
                raise UserError(f"{where}: optimizer state {param.name} has shape {list(value.shape)}, "
                                f"expected {list(param.shape)}")
            param.set_data(Tensor(value))
