"""Paged attention from plain MindSpore ops: the reference for the custom kernels, and the engine's
portable path (prefill chunks on every device, decode when the kernel is not used).

A paged pool stores the cache of all sequences in fixed-size blocks: ``pool[block, slot, ...]``.
Sequence ``b`` owns the blocks ``block_tables[b, :]`` in order, so its token ``t`` lives at
``pool[block_tables[b, t // S], t % S]``.  The plain-op path gathers each sequence's blocks into a
contiguous ``[B, M·S, ...]`` tensor and masks the keys a query may not see (beyond its own
position, or padding); the kernels in ``paged_attention.cc`` walk the block table instead and never
materialise the copy.

Shapes: B sequences, C query tokens each, H query heads, KV key/value heads, r latent width,
dr RoPE width, d head width, N pool blocks of S tokens, M table entries per sequence.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import ops

# Additive mask value: finite, so a row with no visible key (a padding row) stays NaN-free.
MASKED = -1e9


def gather_pages(pool, block_tables):
    """[N, S, ...] pool and [B, M] tables → the sequences' caches [B, M·S, ...] in token order."""
    pages = ops.gather(pool, block_tables, 0)  # [B, M, S, ...]
    batch, max_blocks, block_size = pages.shape[:3]
    return pages.reshape((batch, max_blocks * block_size) + tuple(pool.shape[2:]))


def visibility_mask(query_positions, num_keys):
    """Additive mask [B, C, K]: key j is visible to a query at position p iff j ≤ p."""
    key_positions = ops.arange(0, num_keys, dtype=ms.int32).reshape(1, 1, -1)
    visible = key_positions <= query_positions.expand_dims(-1)
    return (1.0 - visible.astype(ms.float32)) * MASKED


def paged_mla_attend(q_latent, q_pe, latent_pool, k_pe_pool, block_tables, query_positions, scale):
    """Absorbed MLA for C query tokens per sequence → latent outputs [B, H, C, r].

    q_latent [B, H, C, r] (q_nope·W_UK), q_pe [B, H, C, dr]; latent_pool [N, S, r];
    k_pe_pool [N, S, dr]; block_tables [B, M] int32; query_positions [B, C] int32.
    """
    batch, heads, queries, rank = q_latent.shape
    latent = gather_pages(latent_pool, block_tables)  # [B, K, r]
    k_pe = gather_pages(k_pe_pool, block_tables)  # [B, K, dr]
    num_keys = latent.shape[1]
    # One batched matmul per term: all heads and queries of a sequence share its latent rows.
    scores = ops.bmm(q_latent.reshape(batch, heads * queries, rank), latent.swapaxes(1, 2))
    scores = scores + ops.bmm(q_pe.reshape(batch, heads * queries, -1), k_pe.swapaxes(1, 2))
    scores = scores.reshape(batch, heads, queries, num_keys) * scale
    probs = ops.softmax(scores + visibility_mask(query_positions, num_keys).expand_dims(1), -1)
    out = ops.bmm(probs.reshape(batch, heads * queries, num_keys), latent)
    return out.reshape(batch, heads, queries, rank)


def paged_gqa_attend(q, k_pool, v_pool, block_tables, query_positions, scale):
    """GQA for C query tokens per sequence → [B, H, C, d]; query head h reads KV head h // (H/KV).

    q [B, H, C, d]; k_pool / v_pool [N, S, KV, d]; block_tables [B, M]; query_positions [B, C].
    """
    batch, heads, queries, dim = q.shape
    kv_heads = k_pool.shape[2]
    keys = gather_pages(k_pool, block_tables).transpose(0, 2, 3, 1)  # [B, KV, d, K]
    values = gather_pages(v_pool, block_tables).transpose(0, 2, 1, 3)  # [B, KV, K, d]
    num_keys = keys.shape[-1]
    grouped = q.reshape(batch, kv_heads, (heads // kv_heads) * queries, dim)
    scores = ops.matmul(grouped, keys).reshape(batch, kv_heads, heads // kv_heads, queries, num_keys) * scale
    mask = visibility_mask(query_positions, num_keys).reshape(batch, 1, 1, queries, num_keys)
    probs = ops.softmax(scores + mask, -1).reshape(batch, kv_heads, (heads // kv_heads) * queries, num_keys)
    return ops.matmul(probs, values).reshape(batch, heads, queries, dim)


def _decode_positions(seq_lens):
    """Decode form: the query is the last cached token; padding rows (length 0) see nothing."""
    return (seq_lens - 1).expand_dims(-1)


def _zero_padding_rows(out, seq_lens):
    return out * (seq_lens > 0).astype(out.dtype).reshape(-1, 1, 1)


def paged_mla_decode_reference(q_latent, q_pe, latent_pool, k_pe_pool, block_tables, seq_lens, scale):
    """The custom MLA decode kernel's contract in plain ops: [B, H, r] queries → [B, H, r].

    ``seq_lens`` [B] int32 counts each sequence's cached tokens including the current one; a row
    of length 0 is padding and returns zeros (as the kernel does).
    """
    out = paged_mla_attend(q_latent.expand_dims(2), q_pe.expand_dims(2), latent_pool, k_pe_pool, block_tables,
                           _decode_positions(seq_lens), scale)
    return _zero_padding_rows(out.squeeze(2), seq_lens)


def paged_gqa_decode_reference(q, k_pool, v_pool, block_tables, seq_lens, scale):
    """The custom GQA decode kernel's contract in plain ops: [B, H, d] queries → [B, H, d]."""
    out = paged_gqa_attend(q.expand_dims(2), k_pool, v_pool, block_tables, _decode_positions(seq_lens), scale)
    return _zero_padding_rows(out.squeeze(2), seq_lens)
