"""Attention cells: GQA (the source models) and MLA (the converted layers).

The cells own the Parameters (named like the checkpoints) and delegate the math to
``functional.py``, handing it each projection's own ``Projection`` (``layers.py``) as ``dense`` so
that every weight is multiplied by the MatMul primitive of its own cell.  This is the training
form (whole-graph step, semi-auto parallel step, probe dumps); inference runs ``functional.py`` on
plain tensors (``runner.py``).  MLA follows DeepSeek-V2/V3 naming and shapes (``q_proj``,
``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``) with one internal
difference: its RoPE slice uses rotate-half pairing and an arbitrary frequency table (the
exporter permutes rows to DeepSeek's interleaved pairing).

MLA here is the expanded form (prefill / training): per-head k = [W_UK c ; k_pe], v = W_UV c
(the absorbed decode form is ``functional.mla_attend_absorbed``, used by the runner).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from mindspore import nn

from . import functional as F
from .layers import Linear, RMSNorm


def _bias(weights: dict, name: str) -> Optional[np.ndarray]:
    return weights.get(f"{name}.bias")


class GQAAttention(nn.Cell):
    def __init__(self, weights: dict[str, np.ndarray], num_heads: int, num_kv_heads: int, head_dim: int,
                 eps: float, qk_norm: bool = False):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.eps = num_heads, num_kv_heads, head_dim, float(eps)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, proj, Linear(weights[f"{proj}.weight"], _bias(weights, proj)))
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(weights["q_norm.weight"], eps)
            self.k_norm = RMSNorm(weights["k_norm.weight"], eps)

    def _norm_weights(self):
        return (self.q_norm.weight, self.k_norm.weight) if self.qk_norm else (None, None)

    def construct(self, x, cos, sin, mla_cos, mla_sin, mask):
        # every projection through its own cell's MatMul (``Linear.dense``): the primitives a shard strategy sets
        q_norm, k_norm = self._norm_weights()
        q = F.gqa_project_q(x, cos, sin, self.num_heads, self.head_dim, self.eps, self.q_proj.weight,
                            self.q_proj.bias, q_norm, self.q_proj.dense)
        k = F.gqa_project_q(x, cos, sin, self.num_kv_heads, self.head_dim, self.eps, self.k_proj.weight,
                            self.k_proj.bias, k_norm, self.k_proj.dense)  # the key: the same reshape, norm, RoPE
        b, t, _ = x.shape
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        return self.o_proj(F.gqa_attend(q, k, v, mask, self.num_heads, self.num_kv_heads))


class MLAAttention(nn.Cell):
    """Multi-head latent attention with a shared RoPE key of width ``rope_dim``."""

    def __init__(self, weights: dict[str, np.ndarray], num_heads: int, nope_dim: int, rope_dim: int, v_dim: int,
                 kv_lora_rank: int, eps: float, latent_norm: bool):
        super().__init__()
        self.num_heads, self.nope_dim, self.rope_dim, self.v_dim = num_heads, nope_dim, rope_dim, v_dim
        self.kv_lora_rank, self.eps = kv_lora_rank, float(eps)
        self.q_proj = Linear(weights["q_proj.weight"], _bias(weights, "q_proj"))
        self.kv_a_proj_with_mqa = Linear(weights["kv_a_proj_with_mqa.weight"], _bias(weights, "kv_a_proj_with_mqa"))
        self.kv_b_proj = Linear(weights["kv_b_proj.weight"])
        self.o_proj = Linear(weights["o_proj.weight"], _bias(weights, "o_proj"))
        self.latent_norm = latent_norm
        if latent_norm:
            self.kv_a_layernorm = RMSNorm(weights["kv_a_layernorm.weight"], eps)

    def construct(self, x, cos, sin, mla_cos, mla_sin, mask):
        # every projection through its own cell's MatMul (``Linear.dense``): the primitives a shard strategy sets
        norm = self.kv_a_layernorm.weight if self.latent_norm else None
        q_nope, q_pe = F.mla_project_q(x, mla_cos, mla_sin, self.num_heads, self.nope_dim, self.rope_dim,
                                       self.q_proj.weight, self.q_proj.bias, self.q_proj.dense)
        latent, k_pe = F.mla_project_latent(x, mla_cos, mla_sin, self.kv_lora_rank, self.eps,
                                            self.kv_a_proj_with_mqa.weight, self.kv_a_proj_with_mqa.bias, norm,
                                            self.kv_a_proj_with_mqa.dense)
        out = F.mla_attend_expanded(q_nope, q_pe, latent, k_pe, mask, self.num_heads, self.nope_dim, self.rope_dim,
                                    self.v_dim, self.kv_b_proj.weight, self.kv_b_proj.dense)
        return self.o_proj(out)
