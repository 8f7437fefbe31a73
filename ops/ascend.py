"""Ascend-only dispatch of the serving hot path to MindSpore's fused kernels.

NOT RUN in this project's CI or development machines: they are CPU-only, and on CPU every kernel
used here fails with "kernel … unregistered".  The functions follow the contracts of
``reference.py`` (and of the CPU kernels in ``paged_attention.py``); the argument conventions are
those of MindFormers' inference MLA/attention layers.  ``dispatch.py`` is the only importer, and
only when the device target is Ascend: it hands ``rms_norm`` to the cells and the serving layer
steps, and ``decode_mla`` / ``decode_gqa`` to the serving engine as its decode attention.

* ``mla_decode``: ``ops.auto_generate.Mla`` (absorbed MLA decode over a paged latent cache; the
  kernel wants the head count to be a multiple of 16, so heads are zero-padded and the padding is
  dropped from the output — SmolLM2's 9 heads need it, 7B-class models with 28/32 heads do not);
* ``gqa_decode``: ``PagedAttention`` for the layers a hybrid model keeps as GQA;
* ``write_cache``: ``reshape_and_cache`` (the in-place pool write);
* ``rope`` and ``rms_norm``: the fused rotary-embedding and RMSNorm kernels;
* ``decode_mla`` / ``decode_gqa``: ``mla_decode`` / ``gqa_decode`` with the serving engine's
  ``DecodeAttention`` signature (queries [B, H, 1, ·], the softmax scale as a [1] tensor, folded
  into the queries because the kernels take it as a compile-time float).

On Ascend the pools live in device memory (bf16/fp16), not in host numpy arrays as on CPU.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import ops

HEAD_MULTIPLE = 16  # Mla kernel constraint

# Role (see dispatch.py) → the MindSpore operator that runs it on the NPU.
FUSED_OPERATORS = {
    "rms_norm": "ops.rms_norm",
    "decode_mla": "ops.auto_generate.Mla",
    "decode_gqa": "ops.auto_generate.PagedAttention",
}


def write_cache(key, value, key_cache, value_cache, slot_mapping):
    """Scatter new entries [T, heads, dim] into pools [N, S, heads, dim] at flat slots [T] (block·S + slot)."""
    return ops.auto_generate.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)


def mla_decode(q_latent, q_pe, latent_pool, k_pe_pool, block_tables, seq_lens, scale: float):
    """q_latent [B, H, r], q_pe [B, H, dr], pools [N, S, r] / [N, S, dr] → out_latent [B, H, r]."""
    batch, heads, _ = q_latent.shape
    padded = -(-heads // HEAD_MULTIPLE) * HEAD_MULTIPLE
    if padded != heads:
        q_latent = ops.pad(q_latent, (0, 0, 0, padded - heads))
        q_pe = ops.pad(q_pe, (0, 0, 0, padded - heads))
    blocks, block_size = latent_pool.shape[:2]
    one_token_each = ops.ones((batch,), ms.int32)
    out, _ = ops.auto_generate.Mla()(
        q_latent, q_pe, latent_pool.reshape(blocks, block_size, 1, -1), k_pe_pool.reshape(blocks, block_size, 1, -1),
        block_tables, None, None, None, one_token_each, seq_lens, padded, float(scale))
    return out.reshape(batch, padded, -1)[:, :heads]


def gqa_decode(q, k_pool, v_pool, block_tables, seq_lens, scale: float):
    """q [B, H, d], pools [N, S, KV, d] → [B, H, d]."""
    heads, kv_heads = q.shape[1], k_pool.shape[2]
    attention = ops.auto_generate.PagedAttention(heads, float(scale), kv_heads)
    return attention(q, k_pool, v_pool, block_tables, seq_lens)


def rope(x, cos, sin):
    """Rotate-half RoPE on x [B, N, S, D] with cos/sin [1|B, 1|N, S, D] (full width, not half)."""
    return ops.rotary_position_embedding(x, cos, sin, 0)


def rms_norm(x, weight, eps: float):
    return ops.rms_norm(x, weight, eps)[0]


def decode_mla(q_latent, q_pe, latent_pool, k_pe_pool, block_tables, query_positions, seq_lens, scale):
    """The engine's MLA decode signature over ``mla_decode``: [B, H, 1, r] queries → [B, H, 1, r]."""
    out = mla_decode(q_latent.squeeze(2) * scale, q_pe.squeeze(2) * scale, latent_pool, k_pe_pool, block_tables,
                     seq_lens, 1.0)
    return out.expand_dims(2)


def decode_gqa(q, k_pool, v_pool, block_tables, query_positions, seq_lens, scale):
    """The engine's GQA decode signature over ``gqa_decode``: [B, H, 1, d] queries → [B, H, 1, d]."""
    return gqa_decode(q.squeeze(2) * scale, k_pool, v_pool, block_tables, seq_lens, 1.0).expand_dims(2)
