"""Basic MindSpore cells (fp32 on CPU), built directly from numpy weights.

Parameter names are the attribute paths, which we keep equal to the HF names
(``model.layers.3.self_attn.q_proj.weight`` …), so checkpoints load by name.

Every projection runs through its own ``ops.MatMul(transpose_b=True)`` primitive (``Projection``)
and every embedding lookup through its own ``ops.Gather``: those are the operators MindSpore's
semi-auto parallel can split (it has MatMulInfo / GatherInfo, but no operator info for the
``Dense`` primitive behind ``ops.dense``), and a shard strategy set on them
(``train/semi_auto.py``) is attached to the very primitive the cell's ``construct`` calls.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from mindyouzhi.ops.dispatch import kernels


def _param(array: np.ndarray, name: str, requires_grad: bool = True) -> Parameter:
    return Parameter(Tensor(np.ascontiguousarray(array, dtype=np.float32)), name=name, requires_grad=requires_grad)


class Projection(nn.Cell):
    """``dense(x, W, b)`` = x Wᵀ + b over the last axis of x, as one ``MatMul(transpose_b=True)`` on the
    [tokens, in] view plus one ``Add`` for the bias (MindFormers' ``Linear`` does the same).  Holds no
    Parameter: it is the callable the ``functional.py`` math takes as ``dense``, and the place the
    shard strategies of its owner's weight go (``matmul``: ((rows, in-split), (out-split, in-split)),
    ``bias_add``: ((rows, out-split), (out-split,)))."""

    def __init__(self):
        super().__init__()
        self.matmul = ops.MatMul(transpose_b=True)
        self.bias_add = ops.Add()

    def use_matmul(self, matmul) -> None:
        """Multiply with ``matmul`` ((x [tokens, in], W [out, in]) → x Wᵀ, differentiable) instead of
        the MatMul primitive: the CPU train step's bf16 product (``train/bf16_ops.py``).  The
        semi-auto parallel step never calls it, so its strategies stay on the primitive."""
        self.matmul = matmul

    def construct(self, x, weight, bias=None):
        shape = x.shape
        out = self.matmul(x.reshape(-1, shape[-1]), weight)
        if bias is not None:
            out = self.bias_add(out, bias)
        return out.reshape(shape[:-1] + (weight.shape[0],))


class Linear(nn.Cell):
    """y = x Wᵀ + b with W stored as (out, in), like the checkpoints (through ``self.dense``)."""

    def __init__(self, weight: np.ndarray, bias: Optional[np.ndarray] = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = _param(weight, "weight")
        self.bias = _param(bias, "bias") if bias is not None else None
        self.dense = Projection()

    def construct(self, x):
        return self.dense(x, self.weight, self.bias)


class Embedding(nn.Cell):
    def __init__(self, weight: np.ndarray):
        super().__init__()
        self.weight = _param(weight, "weight")
        self.gather = ops.Gather()

    def construct(self, ids):
        return self.gather(self.weight, ids, 0)


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
