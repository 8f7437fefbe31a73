"""The model math as pure functions of (activations, weights).

Cells (``layers.py``, ``attention.py``, ``decoder.py``) own the Parameters and call these; the
conversion and the search call them directly under one ``ms.jit`` per layer *shape*, with weights
passed as arguments.  (A new jitted Cell per candidate layer would recompile and keep ~90 MB per
graph on CPU; arguments reuse one compiled graph for every layer of the same shape.)

Layout conventions: activations [B, T, D]; weights (out, in) as in the checkpoints; RoPE tables
``cos``/``sin`` [T, d/2]; ``mask`` an additive causal mask broadcastable to the score shape.
"""
from __future__ import annotations

import math

import mindspore as ms
from mindspore import ops

from mindyouzhi.convert_weights.architectures import weight_order

from .rope import apply_rotate_half

# Argument orders of the jitted layer functions: the family spec's layer tables (absent optional
# tensors are passed as None).
GQA_LAYER_WEIGHTS = weight_order("gqa")
MLA_LAYER_WEIGHTS = weight_order("mla")


def rms_norm(x, weight, eps):
    variance = ops.mean(x * x, -1, keep_dims=True)
    return x * ops.rsqrt(variance + eps) * weight


def swiglu(x, gate, up, down, gate_bias=None, up_bias=None, down_bias=None, dense=ops.dense):
    return dense(ops.silu(dense(x, gate, gate_bias)) * dense(x, up, up_bias), down, down_bias)


# -- GQA ------------------------------------------------------------------------------------------
def gqa_project_q(x, cos, sin, heads, head_dim, eps, wq, bq, q_norm, dense=ops.dense):
    b, t, _ = x.shape
    q = dense(x, wq, bq).reshape(b, t, heads, head_dim)
    if q_norm is not None:
        q = rms_norm(q, q_norm, eps)
    return apply_rotate_half(q.transpose(0, 2, 1, 3), cos, sin)


def gqa_project_kv(x, cos, sin, kv_heads, head_dim, eps, wk, bk, wv, bv, k_norm, dense=ops.dense):
    """RoPE'd keys and values [B, KV, T, d] (what a GQA cache stores)."""
    b, t, _ = x.shape
    k = dense(x, wk, bk).reshape(b, t, kv_heads, head_dim)
    if k_norm is not None:
        k = rms_norm(k, k_norm, eps)
    k = apply_rotate_half(k.transpose(0, 2, 1, 3), cos, sin)
    v = dense(x, wv, bv).reshape(b, t, kv_heads, head_dim).transpose(0, 2, 1, 3)
    return k, v


def gqa_attend(q, k, v, mask, heads, kv_heads):
    """q [B, H, Tq, d], k/v [B, KV, Tk, d] → [B, Tq, H·d]; query head h reads KV head h // (H/KV)."""
    b, _, tq, d = q.shape
    tk = k.shape[2]
    groups = heads // kv_heads
    grouped = q.reshape(b, kv_heads, groups * tq, d)
    scores = ops.matmul(grouped, k.swapaxes(-1, -2)) * (1.0 / math.sqrt(d))
    scores = scores.reshape(b, kv_heads, groups, tq, tk) + mask
    probs = ops.softmax(scores, -1).reshape(b, kv_heads, groups * tq, tk)
    out = ops.matmul(probs, v).reshape(b, heads, tq, d)
    return out.transpose(0, 2, 1, 3).reshape(b, tq, heads * d)


def gqa_attention(x, cos, sin, mask, heads, kv_heads, head_dim, eps, wq, bq, wk, bk, wv, bv, wo, bo, q_norm, k_norm,
                  dense=ops.dense):
    q = gqa_project_q(x, cos, sin, heads, head_dim, eps, wq, bq, q_norm, dense)
    k, v = gqa_project_kv(x, cos, sin, kv_heads, head_dim, eps, wk, bk, wv, bv, k_norm, dense)
    return dense(gqa_attend(q, k, v, mask, heads, kv_heads), wo, bo)


# -- MLA ------------------------------------------------------------------------------------------
def mla_project_q(x, cos, sin, heads, nope, rope, wq, bq, dense=ops.dense):
    """q_nope [B, H, T, dn] and RoPE'd q_pe [B, H, T, dr]."""
    b, t, _ = x.shape
    q = dense(x, wq, bq).reshape(b, t, heads, nope + rope).transpose(0, 2, 1, 3)
    return q[..., :nope], apply_rotate_half(q[..., nope:], cos, sin)


def mla_project_latent(x, cos, sin, rank, eps, wa, ba, latent_norm, dense=ops.dense):
    """The cache entry: latent c [B, T, r] (normed if configured) and RoPE'd k_pe [B, T, dr]."""
    kv = dense(x, wa, ba)
    latent = kv[..., :rank]
    if latent_norm is not None:
        latent = rms_norm(latent, latent_norm, eps)
    return latent, apply_rotate_half(kv[..., rank:], cos, sin)


def mla_attend_expanded(q_nope, q_pe, latent, k_pe, mask, heads, nope, rope, v_dim, wb, dense=ops.dense):
    """Prefill/training form: per-head k = [W_UK c ; k_pe], v = W_UV c."""
    b, t, _ = latent.shape
    kv = dense(latent, wb).reshape(b, t, heads, nope + v_dim).transpose(0, 2, 1, 3)
    scores = ops.matmul(q_pe, k_pe.expand_dims(1).swapaxes(-1, -2))
    if nope > 0:
        scores = scores + ops.matmul(q_nope, kv[..., :nope].swapaxes(-1, -2))
    probs = ops.softmax(scores * (1.0 / math.sqrt(nope + rope)) + mask, -1)
    out = ops.matmul(probs, kv[..., nope:])
    return out.transpose(0, 2, 1, 3).reshape(b, q_pe.shape[2], heads * v_dim)


def mla_attend_absorbed(q_nope, q_pe, latent, k_pe, mask, heads, nope, rope, v_dim, rank, wb):
    """Decode form over a latent cache: q absorbed through W_UK, output through W_UV.

    q_* [B, H, Tq, ·]; latent [B, Tk, r]; k_pe [B, Tk, dr]; → [B, Tq, H·dv].
    """
    w = wb.reshape(heads, nope + v_dim, rank)
    b, _, tq, _ = q_pe.shape
    scores = ops.matmul(q_pe, k_pe.expand_dims(1).swapaxes(-1, -2))
    if nope > 0:
        q_latent = ops.matmul(q_nope, w[:, :nope].expand_dims(0))  # [B, H, Tq, r]
        scores = scores + ops.matmul(q_latent, latent.expand_dims(1).swapaxes(-1, -2))
    probs = ops.softmax(scores * (1.0 / math.sqrt(nope + rope)) + mask, -1)
    out_latent = ops.matmul(probs, latent.expand_dims(1))  # [B, H, Tq, r]
    out = ops.matmul(out_latent, w[:, nope:].swapaxes(-1, -2).expand_dims(0))  # [B, H, Tq, dv]
    return out.transpose(0, 2, 1, 3).reshape(b, tq, heads * v_dim)


def mla_attention(x, cos, sin, mask, heads, nope, rope, v_dim, rank, eps, wq, bq, wa, ba, latent_norm, wb, wo, bo,
                  dense=ops.dense):
    q_nope, q_pe = mla_project_q(x, cos, sin, heads, nope, rope, wq, bq, dense)
    latent, k_pe = mla_project_latent(x, cos, sin, rank, eps, wa, ba, latent_norm, dense)
    return dense(mla_attend_expanded(q_nope, q_pe, latent, k_pe, mask, heads, nope, rope, v_dim, wb, dense), wo, bo)


# -- the same attention with a fused causal kernel -------------------------------------------------
# ``attend(q, k, v, cos, sin, scale)`` → [B, T, H·dv] takes q [B, T, H, dk], k [B, T, G, dk],
# v [B, T, G, dv] before RoPE and rotates the last 2·cos.shape[-1] components of every q and k row
# itself (e.g. ``mindyouzhi.ops.bf16.graph_attend()``).  Causal windows from position 0 only: the
# conversion's calibration and search passes, never a padded batch or a cache.
def gqa_attention_fused(x, cos, sin, heads, kv_heads, head_dim, eps, wq, bq, wk, bk, wv, bv, wo, bo, q_norm, k_norm,
                        dense, attend):
    b, t, _ = x.shape
    q = dense(x, wq, bq).reshape(b, t, heads, head_dim)
    k = dense(x, wk, bk).reshape(b, t, kv_heads, head_dim)
    if q_norm is not None:
        q = rms_norm(q, q_norm, eps)
    if k_norm is not None:
        k = rms_norm(k, k_norm, eps)
    v = dense(x, wv, bv).reshape(b, t, kv_heads, head_dim)
    return dense(attend(q, k, v, cos, sin, 1.0 / math.sqrt(head_dim)), wo, bo)


def mla_attention_fused(x, cos, sin, heads, nope, rope, v_dim, rank, eps, wq, bq, wa, ba, latent_norm, wb, wo, bo,
                        dense, attend):
    b, t, _ = x.shape
    q = dense(x, wq, bq).reshape(b, t, heads, nope + rope)
    kv_a = dense(x, wa, ba)
    latent = kv_a[..., :rank]
    if latent_norm is not None:
        latent = rms_norm(latent, latent_norm, eps)
    k_pe = ops.broadcast_to(kv_a[..., rank:].expand_dims(2), (b, t, heads, rope))
    kv = dense(latent, wb).reshape(b, t, heads, nope + v_dim)
    k = ops.concat([kv[..., :nope], k_pe], -1) if nope > 0 else k_pe
    return dense(attend(q, k, kv[..., nope:], cos, sin, 1.0 / math.sqrt(nope + rope)), wo, bo)


# -- whole layers ---------------------------------------------------------------------------------
def _residual_mlp(h, eps, ln2, gate, gate_bias, up, up_bias, down, down_bias, dense=ops.dense):
    return h + swiglu(rms_norm(h, ln2, eps), gate, up, down, gate_bias, up_bias, down_bias, dense)


def layer_graphs(dense=ops.dense, attend=None):
    """The jitted whole-layer functions ``(gqa_layer, mla_layer)`` with ``dense`` for every
    projection and, if given, the fused causal ``attend`` (see ``gqa_attention_fused``; then
    ``mask`` is not read): plain ops by default, or e.g. the kernels of ``mindyouzhi.ops.bf16``."""

    def gqa_layer(x, cos, sin, mask, heads, kv_heads, head_dim, eps, *w):
        ln1, ln2, gate, bg, up, bu, down, bd, wq, bq, wk, bk, wv, bv, wo, bo, q_norm, k_norm = w
        normed = rms_norm(x, ln1, eps)
        if attend is None:
            h = x + gqa_attention(normed, cos, sin, mask, heads, kv_heads, head_dim, eps,
                                  wq, bq, wk, bk, wv, bv, wo, bo, q_norm, k_norm, dense)
        else:
            h = x + gqa_attention_fused(normed, cos, sin, heads, kv_heads, head_dim, eps,
                                        wq, bq, wk, bk, wv, bv, wo, bo, q_norm, k_norm, dense, attend)
        return _residual_mlp(h, eps, ln2, gate, bg, up, bu, down, bd, dense)

    def mla_layer(x, cos, sin, mask, heads, nope, rope, v_dim, rank, eps, *w):
        ln1, ln2, gate, bg, up, bu, down, bd, wq, bq, wa, ba, latent_norm, wb, wo, bo = w
        normed = rms_norm(x, ln1, eps)
        if attend is None:
            h = x + mla_attention(normed, cos, sin, mask, heads, nope, rope, v_dim, rank, eps,
                                  wq, bq, wa, ba, latent_norm, wb, wo, bo, dense)
        else:
            h = x + mla_attention_fused(normed, cos, sin, heads, nope, rope, v_dim, rank, eps,
                                        wq, bq, wa, ba, latent_norm, wb, wo, bo, dense, attend)
        return _residual_mlp(h, eps, ln2, gate, bg, up, bu, down, bd, dense)

    return ms.jit(gqa_layer), ms.jit(mla_layer)


gqa_layer, mla_layer = layer_graphs()
