"""The model forward over the paged KV pool: chunked prefill of one sequence, batched decode.

Each decoder layer runs as *one* compiled call: norm → projections (+RoPE) → write the new cache
entries into the pool in place → attention over the pool through the block tables → output
projection → MLP.  MLA layers cache only the latent ``c`` and ``k_pe`` and attend in the absorbed
form (the query goes through W_UK into latent space, the output comes back through W_UV); GQA
layers cache K/V.  Weights are graph *arguments*, so one compiled graph per (layer kind, padded
shape) serves every layer and every request.

Batches and prefill chunks are padded to a few sizes so the number of compiled graphs stays
small (padding rows write into the null block and are discarded); block-table widths follow the
attention implementation (``attention.DecodeAttention.dynamic_shapes``).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from mindyouzhi.models import functional as F
from mindyouzhi.models.decoder import mla_dims
from mindyouzhi.ops.dispatch import kernels
from mindyouzhi.ops.paged_attention import scale_tensor

from .attention import GATHER, DecodeAttention
from .kv_pool import NULL_BLOCK, KVPool, verify_in_place


# -- shape buckets --------------------------------------------------------------------------------
def bucket_batch(size: int) -> int:
    """1, 2, 4, 8, then multiples of 4 up to 32, then of 8: padding rows cost a full row of
    weight matmuls, so large batches get fine steps."""
    if size <= 8:
        return 1 << max(0, (size - 1).bit_length())
    step = 4 if size <= 32 else 8
    return -(-size // step) * step


def bucket_chunk(length: int, limit: int) -> int:
    """Prefill chunk lengths: powers of two from 16 up to the chunk limit."""
    return min(limit, max(16, 1 << max(0, (length - 1).bit_length())))


# -- one decoder layer, as a compiled step --------------------------------------------------------
def _absorb_query(q_nope, w_uk):
    """q_nope [B, H, C, dn] · W_UK [H, dn, r] → q_latent [B, H, C, r] (one batched matmul over heads)."""
    b, h, c, dn = q_nope.shape
    per_head = q_nope.transpose(1, 0, 2, 3).reshape(h, b * c, dn)
    return ops.bmm(per_head, w_uk).reshape(h, b, c, -1).transpose(1, 0, 2, 3)


def _expand_output(out_latent, w_uv):
    """out_latent [B, H, C, r] · W_UVᵀ [H, r, dv] → [B, C, H·dv]."""
    b, h, c, r = out_latent.shape
    per_head = out_latent.transpose(1, 0, 2, 3).reshape(h, b * c, r)
    out = ops.bmm(per_head, w_uv.swapaxes(1, 2)).reshape(h, b, c, -1)
    return out.transpose(1, 2, 0, 3).reshape(b, c, -1)


def _mla_layer_step(attend, norm, x, cos, sin, slots, latent_pool, k_pe_pool, tables, positions, lens, scale,
                    heads, nope, rope, v_dim, rank, eps, *w):
    ln1, ln2, gate, bg, up, bu, down, bd, wq, bq, wa, ba, latent_norm, wb, wo, bo = w
    b, c, _ = x.shape
    h = norm(x, ln1, eps)
    q_nope, q_pe = F.mla_project_q(h, cos.expand_dims(1), sin.expand_dims(1), heads, nope, rope, wq, bq)
    latent, k_pe = F.mla_project_latent(h, cos, sin, rank, eps, wa, ba, latent_norm)
    # The returned pools are the same memory, written in place; using them orders the reads after
    # the writes, so the current tokens attend to themselves.
    latent_pool = ops.scatter_nd_update(latent_pool, slots, latent.reshape(b * c, rank))
    k_pe_pool = ops.scatter_nd_update(k_pe_pool, slots, k_pe.reshape(b * c, rope))
    w_kv = wb.reshape(heads, nope + v_dim, rank)
    if nope > 0:
        q_latent = _absorb_query(q_nope, w_kv[:, :nope])
    else:  # exactness mode: every key component carries RoPE, the latent only feeds values
        q_latent = ops.zeros((b, heads, c, rank), q_pe.dtype)
    out_latent = attend(q_latent, q_pe, latent_pool, k_pe_pool, tables, positions, lens, scale)
    h = x + ops.dense(_expand_output(out_latent, w_kv[:, nope:]), wo, bo)
    return h + F.swiglu(norm(h, ln2, eps), gate, up, down, bg, bu, bd)


def _gqa_layer_step(attend, norm, x, cos, sin, slots, k_pool, v_pool, tables, positions, lens, scale,
                    heads, kv_heads, head_dim, eps, *w):
    ln1, ln2, gate, bg, up, bu, down, bd, wq, bq, wk, bk, wv, bv, wo, bo, q_norm, k_norm = w
    b, c, _ = x.shape
    h = norm(x, ln1, eps)
    q = F.gqa_project_q(h, cos.expand_dims(1), sin.expand_dims(1), heads, head_dim, eps, wq, bq, q_norm)
    k, v = F.gqa_project_kv(h, cos.expand_dims(1), sin.expand_dims(1), kv_heads, head_dim, eps, wk, bk, wv, bv, k_norm)
    k_pool = ops.scatter_nd_update(k_pool, slots, k.transpose(0, 2, 1, 3).reshape(b * c, kv_heads, head_dim))
    v_pool = ops.scatter_nd_update(v_pool, slots, v.transpose(0, 2, 1, 3).reshape(b * c, kv_heads, head_dim))
    out = attend(q, k_pool, v_pool, tables, positions, lens, scale)  # [B, H, C, d]
    out = out.transpose(0, 2, 1, 3).reshape(b, c, heads * head_dim)
    h = x + ops.dense(out, wo, bo)
    return h + F.swiglu(norm(h, ln2, eps), gate, up, down, bg, bu, bd)


@functools.lru_cache(maxsize=None)
def compiled_layer_step(kind: str, attention: DecodeAttention):
    """One jitted function per (layer kind, attention implementation) for the whole process: a
    new jitted function per request would recompile and keep its graphs alive."""
    norm = kernels().rms_norm
    if kind == "mla":
        attend = attention.mla

        def step(x, cos, sin, slots, pool_a, pool_b, tables, positions, lens, scale, *args):
            return _mla_layer_step(attend, norm, x, cos, sin, slots, pool_a, pool_b, tables, positions, lens, scale,
                                   *args)
    else:
        attend = attention.gqa

        def step(x, cos, sin, slots, pool_a, pool_b, tables, positions, lens, scale, *args):
            return _gqa_layer_step(attend, norm, x, cos, sin, slots, pool_a, pool_b, tables, positions, lens, scale,
                                   *args)
    return ms.jit(step, dynamic=1 if attention.dynamic_shapes else 0)


@ms.jit
def _pick_row(hidden, row):
    """hidden [B, C, D] → [B, 1, D] at one row index (the same for every sequence)."""
    return ops.gather(hidden, row, 1)


# -- the model over the pool ----------------------------------------------------------------------
class PagedModel:
    """Runs a ``ModelRunner``'s weights over a ``KVPool``; stateless apart from the pool contents."""

    def __init__(self, runner, pool: KVPool, decode_attention: DecodeAttention = GATHER, prefill_chunk: int = 512):
        verify_in_place()
        self.runner = runner
        self.pool = pool
        self.config = config = runner.config
        self.decode_attention = decode_attention
        self.prefill_chunk = max(16, int(prefill_chunk))
        self.max_positions = int(config.max_position_embeddings)
        self.full_table_width = pool.blocks_for(self.max_positions)
        eps = float(config.rms_norm_eps)
        self._layers = []
        for index, weights in enumerate(runner.layer_weights):
            if config.is_mla(index):
                heads, nope, rope, v_dim, rank = dims = mla_dims(config, index)
                names, scale = F.MLA_LAYER_WEIGHTS, 1.0 / math.sqrt(nope + rope)
            else:
                dims = (config.num_attention_heads, config.num_key_value_heads, config.head_dim)
                names, scale = F.GQA_LAYER_WEIGHTS, 1.0 / math.sqrt(config.head_dim)
            kind = "mla" if config.is_mla(index) else "gqa"
            args = (*dims, eps, *(weights.get(name) for name in names))
            self._layers.append((kind, pool.tensors[index], scale_tensor(scale), args))
        cos, sin, mla_cos, mla_sin = runner.rope(self.max_positions)
        kinds = {kind for kind, *_ in self._layers}
        tables = {"gqa": (cos, sin), "mla": (mla_cos, mla_sin)}  # MLA layers rotate with their own table
        self._rope = {kind: tables[kind] for kind in kinds}

    def _run_layers(self, ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, tables: np.ndarray,
                    seq_lens: np.ndarray, attention: DecodeAttention):
        """Embed → every layer (writing the pool) → final hidden states; the paging inputs are
        built once per call and shared by all layers."""
        x = self.runner.embed(Tensor(ids, ms.int32))
        rope = {kind: (Tensor(cos[positions]), Tensor(sin[positions])) for kind, (cos, sin) in self._rope.items()}
        shared = (Tensor(slots, ms.int32),)
        paging = (Tensor(tables, ms.int32), Tensor(positions, ms.int32), Tensor(seq_lens, ms.int32))
        for kind, pools, scale, args in self._layers:
            step = compiled_layer_step(kind, attention)
            x = step(x, *rope[kind], *shared, *pools, *paging, scale, *args)
        return x

    def _slots(self, block_ids: list[int], positions: np.ndarray) -> np.ndarray:
        size = self.pool.block_size
        return np.stack([np.asarray(block_ids, np.int64)[positions // size], positions % size], -1)

    def prefill(self, tokens: list[int], block_ids: list[int]) -> np.ndarray:
        """Cache ``tokens`` (a whole sequence, from position 0) into ``block_ids``; logits [V] of
        the last token.  Long prompts run in chunks that attend to the chunks before them."""
        total = len(tokens)
        assert 0 < total <= len(block_ids) * self.pool.block_size
        hidden, last = None, 0
        for start in range(0, total, self.prefill_chunk):
            piece = tokens[start:start + self.prefill_chunk]
            length = len(piece)
            padded = bucket_chunk(length, self.prefill_chunk)
            ids = np.zeros((1, padded), np.int32)
            ids[0, :length] = piece
            positions = (start + np.arange(padded, dtype=np.int64)).reshape(1, padded)
            positions = np.minimum(positions, self.max_positions - 1)  # padding rows: any valid RoPE row
            slots = np.zeros((padded, 2), np.int64)  # padding rows → the null block
            slots[:length] = self._slots(block_ids, positions[0, :length])
            tables = self._tables([block_ids], 1, self.pool.blocks_for(start + length), GATHER)
            hidden = self._run_layers(ids, positions, slots, tables, np.asarray([start + length], np.int32), GATHER)
            last = length - 1
        return self._logits(hidden, last)[0]

    def decode(self, tokens: list[int], positions: list[int], block_tables: list[list[int]]) -> np.ndarray:
        """One new token per sequence: ``tokens[i]`` at ``positions[i]``, whose blocks (already
        covering that position) are ``block_tables[i]``.  Returns logits [B, V]."""
        batch = len(tokens)
        padded = bucket_batch(batch)
        ids = np.zeros((padded, 1), np.int32)
        ids[:batch, 0] = tokens
        pos = np.zeros((padded, 1), np.int64)
        pos[:batch, 0] = positions
        slots = np.zeros((padded, 2), np.int64)
        for row, (table, position) in enumerate(zip(block_tables, positions)):
            slots[row] = (table[position // self.pool.block_size], position % self.pool.block_size)
        needed = max(self.pool.blocks_for(p + 1) for p in positions)
        tables = self._tables(block_tables, padded, needed, self.decode_attention)
        seq_lens = np.zeros(padded, np.int32)
        seq_lens[:batch] = np.asarray(positions) + 1
        hidden = self._run_layers(ids, pos, slots, tables, seq_lens, self.decode_attention)
        return self._logits(hidden, 0)[:batch]

    def _tables(self, block_tables: list[list[int]], rows: int, needed: int, attention: DecodeAttention) -> np.ndarray:
        """[rows, width] int32 block tables, unused entries on the null block."""
        width = needed if attention.dynamic_shapes else self.full_table_width
        tables = np.full((rows, width), NULL_BLOCK, np.int32)
        for row, table in enumerate(block_tables):
            used = min(width, len(table))
            tables[row, :used] = table[:used]
        return tables

    def _logits(self, hidden, row: int) -> np.ndarray:
        """Logits [B, V] at one row: the head runs on that row only, never on a whole chunk."""
        return self.runner.head_logits(_pick_row(hidden, Tensor([row], ms.int32))).asnumpy()[:, 0]
