"""Basic MindSpore cells (fp32 on CPU), built directly from numpy weights.

Parameter names are the attribute paths, which we keep equal to the HF names
(``model.layers.3.self_attn.q_proj.weight`` …), so checkpoints load by name.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from mindyouzhi.ops.dispatch import kernels


def _param(array: np.ndarray, name: str, requires_grad: bool = True) -> Parameter:
    return Parameter(Tensor(np.ascontiguousarray(array, dtype=np.float32)), name=name, requires_grad=requires_grad)


class Linear(nn.Cell):
    """y = x Wᵀ + b with W stored as (out, in), like the checkpoints."""

    def __init__(self, weight: np.ndarray, bias: Optional[np.ndarray] = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = _param(weight, "weight")
        self.bias = _param(bias, "bias") if bias is not None else None

    def construct(self, x):
        return ops.dense(x, self.weight, self.bias)


class Embedding(nn.Cell):
    def __init__(self, weight: np.ndarray):
        super().__init__()
        self.weight = _param(weight, "weight")

    def construct(self, ids):
        return ops.gather(self.weight, ids, 0)


class RMSNorm(nn.Cell):
    """RMSNorm: the fused kernel on Ascend, the plain-op twin elsewhere (``ops/dispatch.py``)."""

    def __init__(self, weight: np.ndarray, eps: float):
        super().__init__()
        self.weight = _param(weight, "weight")
        self.eps = float(eps)
        self.norm = kernels().rms_norm

    def construct(self, x):
        return self.norm(x, self.weight, self.eps)


class SwiGLU(nn.Cell):
    def __init__(self, weights: dict[str, np.ndarray]):
        super().__init__()
        for proj in ("gate_proj", "up_proj", "down_proj"):
            setattr(self, proj, Linear(weights[f"{proj}.weight"], weights.get(f"{proj}.bias")))

    def construct(self, x):
        return self.down_proj(ops.silu(self.gate_proj(x)) * self.up_proj(x))


def causal_mask(length: int) -> np.ndarray:
    """Additive causal mask [T, T] (0 on and below the diagonal, a large negative above)."""
    mask = np.triu(np.ones((length, length), dtype=bool), 1)
    return np.where(mask, np.float32(-1e9), np.float32(0.0)).astype(np.float32)


def to_tensor(array: np.ndarray, dtype=ms.float32) -> Tensor:
    return Tensor(np.ascontiguousarray(array), dtype)
