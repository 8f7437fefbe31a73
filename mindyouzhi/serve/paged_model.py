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

A runner with ``precision="bf16"`` gets the bf16 layer steps (``_gqa_layer_step_bf16`` /
``_mla_layer_step_bf16``: norm + concatenated projections and the MLP as fused bf16 kernels) in
static-shape graphs only, and its decode step runs as one graph over all layers and the head
(``compiled_decode_model``).  With the custom decode attention, that graph's layers are the fused
steps (``_gqa_layer_step_fused`` / ``_mla_layer_step_fused``): RoPE, cache write and attention as
one kernel call that writes the pools in place, five kernel calls per layer in all.
"""
from __future__ import annotations

import functools
import math
import sys

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from mindyouzhi.models import functional as F
from mindyouzhi.models.decoder import mla_dims
from mindyouzhi.models.rope import apply_rotate_half
from mindyouzhi.ops.dispatch import kernels
from mindyouzhi.ops.paged_attention import pool_addresses, scale_tensor

from .attention import GATHER, GATHER_STATIC, DecodeAttention
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


# -- the same layer steps in bf16: the norms fused into the projections that read them ----------------
# ``kernels`` = (norm_dense, swiglu_down, dense, dense_add) of ``mindyouzhi.ops.bf16``.  MindSpore
# pays a fixed cost per operator on CPU that outweighs a decode batch's arithmetic, so the input
# norm and the Q/K/V (or Q/latent) projections are one kernel call over their concatenated
# matrices, RoPE turns queries and keys together, and the MLP is two calls (norm + gate|up, then
# SiLU·up + down + residual).  The arithmetic is the bf16 forward's: bf16 operands, float32 accumulation, norms and
# activations in float32.  Weights: see ``bf16_layer_weights``.
def _gqa_layer_step_bf16(kernels, attend, x, cos, sin, slots, k_pool, v_pool, tables, positions, lens, scale,
                         heads, kv_heads, head_dim, eps, *w):
    ln1, ln2, w_qkv, b_qkv, w_gu, b_gu, down, bd, wo, bo, q_norm, k_norm = w
    b, c, _ = x.shape
    qkv = _norm_project(kernels, x, ln1, w_qkv, b_qkv, eps)
    qk = qkv[..., :(heads + kv_heads) * head_dim].reshape(b, c, heads + kv_heads, head_dim)
    if q_norm is not None or k_norm is not None:
        q, k = qk[:, :, :heads], qk[:, :, heads:]
        q = q if q_norm is None else F.rms_norm(q, q_norm, eps)
        k = k if k_norm is None else F.rms_norm(k, k_norm, eps)
        qk = ops.concat([q, k], 2)
    qk = apply_rotate_half(qk, cos.expand_dims(2), sin.expand_dims(2))
    k_pool = ops.scatter_nd_update(k_pool, slots, qk[:, :, heads:].reshape(b * c, kv_heads, head_dim))
    v = qkv[..., (heads + kv_heads) * head_dim:].reshape(b * c, kv_heads, head_dim)
    v_pool = ops.scatter_nd_update(v_pool, slots, v)
    out = attend(qk[:, :, :heads].transpose(0, 2, 1, 3), k_pool, v_pool, tables, positions, lens, scale)
    h = x + kernels[2](out.transpose(0, 2, 1, 3).reshape(b, c, heads * head_dim), wo, bo)
    return _mlp_bf16(kernels, h, eps, ln2, w_gu, b_gu, down, bd)


def _mla_layer_step_bf16(kernels, attend, x, cos, sin, slots, latent_pool, k_pe_pool, tables, positions, lens, scale,
                         heads, nope, rope, v_dim, rank, eps, *w):
    ln1, ln2, w_qa, b_qa, w_gu, b_gu, down, bd, wb, wo, bo, latent_norm = w
    b, c, _ = x.shape
    qa = _norm_project(kernels, x, ln1, w_qa, b_qa, eps)
    width = heads * (nope + rope)
    q = qa[..., :width].reshape(b, c, heads, nope + rope).transpose(0, 2, 1, 3)
    q_pe = apply_rotate_half(q[..., nope:], cos.expand_dims(1), sin.expand_dims(1))
    latent = qa[..., width:width + rank]
    if latent_norm is not None:
        latent = F.rms_norm(latent, latent_norm, eps)
    k_pe = apply_rotate_half(qa[..., width + rank:], cos, sin)
    latent_pool = ops.scatter_nd_update(latent_pool, slots, latent.reshape(b * c, rank))
    k_pe_pool = ops.scatter_nd_update(k_pe_pool, slots, k_pe.reshape(b * c, rope))
    w_kv = wb.reshape(heads, nope + v_dim, rank)
    if nope > 0:
        q_latent = _absorb_query(q[..., :nope], w_kv[:, :nope])
    else:
        q_latent = ops.zeros((b, heads, c, rank), q_pe.dtype)
    out_latent = attend(q_latent, q_pe, latent_pool, k_pe_pool, tables, positions, lens, scale)
    h = x + kernels[2](_expand_output(out_latent, w_kv[:, nope:]), wo, bo)
    return _mlp_bf16(kernels, h, eps, ln2, w_gu, b_gu, down, bd)


# -- the bf16 decode steps with the attention half fused ---------------------------------------------
# One kernel call (``ops.paged_attention.step_ops``) from the projection output to the attention
# output: RoPE of queries and keys, the new entries written into the pools in place, paged attention
# (MLA: absorbed, W_UK and W_UV applied in the kernel).  Then the output projection and the residual
# are one call, and the MLP two: five operators per layer instead of ~30.  The pools must be inputs
# of the graph itself — the kernel checks it (``addresses``) — so nothing else may touch them here.
# Only for layers without q/k norms (GQA), in static-shape decode graphs.
def _gqa_layer_step_fused(kernels, step, x, cos, sin, slots, k_pool, v_pool, tables, positions, lens, scale,
                          addresses, heads, kv_heads, head_dim, eps, *w):
    ln1, ln2, w_qkv, b_qkv, w_gu, b_gu, down, bd, wo, bo, _, _ = w  # q_norm, k_norm: absent
    qkv = _norm_project(kernels, x, ln1, w_qkv, b_qkv, eps)
    out = step(qkv, cos, sin, slots, k_pool, v_pool, tables, positions, lens, scale, addresses)
    return _output_and_mlp(kernels, x, out, wo, bo, eps, ln2, w_gu, b_gu, down, bd)


def _mla_layer_step_fused(kernels, step, x, cos, sin, slots, latent_pool, k_pe_pool, tables, positions, lens, scale,
                          addresses, heads, nope, rope, v_dim, rank, eps, *w):
    ln1, ln2, w_qa, b_qa, w_gu, b_gu, down, bd, wb, wo, bo, latent_norm = w
    qa = _norm_project(kernels, x, ln1, w_qa, b_qa, eps)
    if latent_norm is None:
        out = step(qa, cos, sin, slots, latent_pool, k_pe_pool, tables, positions, lens, scale, wb, addresses)
    else:
        out = step(qa, cos, sin, slots, latent_pool, k_pe_pool, tables, positions, lens, scale, wb, addresses,
                   latent_norm, eps)
    return _output_and_mlp(kernels, x, out, wo, bo, eps, ln2, w_gu, b_gu, down, bd)


def _output_and_mlp(kernels, x, attention_out, wo, bo, eps, ln2, w_gu, b_gu, down, bd):
    h = kernels[3](attention_out, wo, x)
    if bo is not None:
        h = h + bo
    return _mlp_bf16(kernels, h, eps, ln2, w_gu, b_gu, down, bd)


def _norm_project(kernels, x, norm, w, b, eps):
    """RMSNorm then the concatenated projection ``w`` (+ its bias): one kernel call."""
    out = kernels[0](x, norm, w, eps)
    return out if b is None else out + b


def _mlp_bf16(kernels, h, eps, ln2, w_gu, b_gu, down, bd):
    out = kernels[1](h, _norm_project(kernels, h, ln2, w_gu, b_gu, eps), down)
    return out if bd is None else out + bd


def bf16_layer_weights(kind: str, weights: dict, heads: int) -> tuple:
    """A layer's weight arguments for the bf16 steps: matrices read by one kernel concatenated
    (rows of Q|K|V or Q|latent+k_pe, gate|up) and packed to bf16 bits once; biases concatenated
    alike (zeros where one is absent, None when all are); norms and the absorbed W_UK/W_UV float32
    (kv_b_proj as [heads, nope + v_dim, rank], the per-head layout the fused MLA step reads)."""
    from mindyouzhi.ops.bf16 import bf16_bits

    def host(name):
        value = weights.get(name)
        return None if value is None else value.asnumpy()

    def joined(names):
        matrices = [host(f"{name}.weight") for name in names]
        biases = [host(f"{name}.bias") for name in names]
        packed = Tensor(bf16_bits(np.concatenate(matrices)))
        if all(bias is None for bias in biases):
            return packed, None
        return packed, Tensor(np.concatenate([np.zeros(m.shape[0], np.float32) if bias is None else bias
                                              for m, bias in zip(matrices, biases)]).astype(np.float32))

    def packed(name):
        return Tensor(bf16_bits(host(name)))

    first = (weights["input_layernorm.weight"], weights["post_attention_layernorm.weight"])
    if kind == "mla":
        attention = joined(("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa"))
    else:
        attention = joined(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
    mlp = (*joined(("mlp.gate_proj", "mlp.up_proj")), packed("mlp.down_proj.weight"), weights.get("mlp.down_proj.bias"))
    output = (packed("self_attn.o_proj.weight"), weights.get("self_attn.o_proj.bias"))
    if kind == "mla":
        kv_b = host("self_attn.kv_b_proj.weight")
        return (*first, *attention, *mlp, Tensor(kv_b.reshape(heads, -1, kv_b.shape[1])), *output,
                weights.get("self_attn.kv_a_layernorm.weight"))
    return (*first, *attention, *mlp, *output, weights.get("self_attn.q_norm.weight"), weights.get("self_attn.k_norm.weight"))


@functools.lru_cache(maxsize=None)
def compiled_layer_step(kind: str, attention: DecodeAttention, precision: str = "fp32", absent: tuple = ()):
    """One jitted function per (layer kind, attention implementation, precision, absent optional
    weights) for the whole process: a new jitted function per request would recompile and keep its
    graphs alive.  ``absent`` — the positions of the weight arguments that are None (no bias, no
    latent norm) — is part of the key because MindSpore's jit reuses a function's compile-argument
    list across calls: one function called with a weight and then with None in its place fails
    (``IndexError`` in ``mindspore/graph/api.py``), e.g. a server that loads a ``--latent-norm`` model
    and then one without.  bf16 steps take ``bf16_layer_weights`` and need static shapes (AOT kernels)."""
    norm = kernels().rms_norm
    attend = attention.mla if kind == "mla" else attention.gqa
    if precision == "fp32":
        layer = _mla_layer_step if kind == "mla" else _gqa_layer_step

        def step(x, cos, sin, slots, pool_a, pool_b, tables, positions, lens, scale, *args):
            return layer(attend, norm, x, cos, sin, slots, pool_a, pool_b, tables, positions, lens, scale, *args)
    elif precision == "bf16":
        if attention.dynamic_shapes:
            raise ValueError("the bf16 layer steps are AOT kernels, which do not run in dynamic-shape graphs")
        fused = _bf16_kernels()
        layer = _mla_layer_step_bf16 if kind == "mla" else _gqa_layer_step_bf16

        def step(x, cos, sin, slots, pool_a, pool_b, tables, positions, lens, scale, *args):
            return layer(fused, attend, x, cos, sin, slots, pool_a, pool_b, tables, positions, lens, scale, *args)
    else:
        raise ValueError(f"layer precision {precision!r}: expected fp32 or bf16")
    return ms.jit(step, dynamic=1 if attention.dynamic_shapes else 0)


def _bf16_kernels() -> tuple:
    from mindyouzhi.ops import bf16

    return bf16.graph_norm_dense(), bf16.graph_swiglu_down(), bf16.graph_dense(), bf16.graph_dense_add()


@functools.lru_cache(maxsize=None)
def compiled_decode_model(layout: tuple, attention: DecodeAttention):
    """The whole bf16 decode step as one compiled graph: embedding → every layer (``layout``: per
    layer its kind, whether it runs the fused step, its number of weight arguments and which of
    them are None — see ``compiled_layer_step``) → final norm and LM head of the one new row.
    One launch per step instead of one per layer plus three (MindSpore's per-graph launch cost on
    CPU is of the order of a small layer's arithmetic); the graph is built per layout and batch
    bucket, once per process.  Each layer's pools are inputs of this graph, as the fused steps
    require, and nothing but its own step reads or writes them."""
    fused = _bf16_kernels()
    norm_dense = fused[0]
    gqa_step = mla_step = None  # graph code cannot read tuple attributes: unpacked here
    if any(step_fused for _, step_fused, _, _ in layout):
        from mindyouzhi.ops.paged_attention import step_ops

        gqa_step, mla_step = step_ops()

    def model(ids, embed_table, final_norm, head, eps, gqa_cos, gqa_sin, mla_cos, mla_sin, slots, tables, positions,
              lens, *flat):
        x = ops.gather(embed_table, ids, 0)
        at = 0
        for kind, step_fused, count, _ in layout:
            pool_a, pool_b, scale, addresses = flat[at:at + 4]
            args = flat[at + 4:at + 4 + count]
            at += 4 + count
            if kind == "mla" and step_fused:
                x = _mla_layer_step_fused(fused, mla_step, x, mla_cos, mla_sin, slots, pool_a, pool_b, tables,
                                          positions, lens, scale, addresses, *args)
            elif kind == "mla":
                x = _mla_layer_step_bf16(fused, attention.mla, x, mla_cos, mla_sin, slots, pool_a, pool_b, tables,
                                         positions, lens, scale, *args)
            elif step_fused:
                x = _gqa_layer_step_fused(fused, gqa_step, x, gqa_cos, gqa_sin, slots, pool_a, pool_b, tables,
                                          positions, lens, scale, addresses, *args)
            else:
                x = _gqa_layer_step_bf16(fused, attention.gqa, x, gqa_cos, gqa_sin, slots, pool_a, pool_b, tables,
                                         positions, lens, scale, *args)
        return norm_dense(x[:, 0], final_norm, head, eps)

    return ms.jit(model)


@functools.lru_cache(maxsize=None)
def _fused_steps_work() -> bool:
    """Whether the fused decode steps pass their probe; if not, says why on stderr (once) and the
    decode layers keep their separate operators."""
    from mindyouzhi.ops.paged_attention import step_unavailable

    reason = step_unavailable()
    if reason is not None:
        print(f"note: bf16 decode without the fused attention step ({reason})", file=sys.stderr)
    return reason is None


@ms.jit
def _pick_row(hidden, row):
    """hidden [B, C, D] → [B, 1, D] at one row index (the same for every sequence)."""
    return ops.gather(hidden, row, 1)


# -- the model over the pool ----------------------------------------------------------------------
class PagedModel:
    """Runs a ``ModelRunner``'s weights over a ``KVPool``; stateless apart from the pool contents."""

    def __init__(self, runner, pool: KVPool, decode_attention: DecodeAttention = GATHER, prefill_chunk: int = 512,
                 fused_decode: bool = True):
        """``fused_decode=False`` keeps the bf16 decode layers on separate operators (the path the
        fused steps are tested against); it changes nothing at fp32."""
        verify_in_place()
        self.runner = runner
        self.pool = pool
        self.config = config = runner.config
        # The runner's precision: bf16 runs every projection and the LM head through the bf16
        # kernels, in static-shape graphs only (the plain-op attention as GATHER_STATIC).
        self.precision = getattr(runner, "precision", "fp32")
        static = self.precision != "fp32"
        self.decode_attention = GATHER_STATIC if static and decode_attention.dynamic_shapes else decode_attention
        self.prefill_attention = GATHER_STATIC if static else GATHER
        self.prefill_chunk = max(16, int(prefill_chunk))
        self.max_positions = int(config.max_position_embeddings)
        self.full_table_width = pool.blocks_for(self.max_positions)
        eps = float(config.rms_norm_eps)
        self._layers = []
        eps_tensor = Tensor(np.asarray([eps], np.float32))
        if static and getattr(runner, "_bf16_step_weights", None) is None:  # packed once per runner
            runner._bf16_step_weights = [bf16_layer_weights("mla" if config.is_mla(i) else "gqa", weights,
                                                            config.num_attention_heads)
                                         for i, weights in enumerate(runner.layer_weights)]
        # The fused decode steps need the bf16 decode graph and the CPU attention kernel (on an
        # Ascend device the pools are not host memory), and a build that hands them the pools.
        self.fused_decode = fused_decode and static and self.decode_attention.name == "custom" and _fused_steps_work()
        for index, weights in enumerate(runner.layer_weights):
            if config.is_mla(index):
                heads, nope, rope, v_dim, rank = dims = mla_dims(config, index)
                names, scale = F.MLA_LAYER_WEIGHTS, 1.0 / math.sqrt(nope + rope)
            else:
                dims = (config.num_attention_heads, config.num_key_value_heads, config.head_dim)
                names, scale = F.GQA_LAYER_WEIGHTS, 1.0 / math.sqrt(config.head_dim)
            kind = "mla" if config.is_mla(index) else "gqa"
            if static:
                args = (*dims, eps_tensor, *runner._bf16_step_weights[index])  # eps as the kernels read it
            else:
                args = (*dims, eps, *(weights.get(name) for name in names))
            absent = tuple(position for position, arg in enumerate(args) if arg is None)
            # q/k norms (args[-2:] of a GQA layer) stay on the per-op path.
            step_fused = self.fused_decode and (kind == "mla" or (args[-2] is None and args[-1] is None))
            addresses = pool_addresses(*pool.arrays[index])
            self._layers.append((kind, pool.tensors[index], scale_tensor(scale), args, absent, step_fused, addresses))
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
        for kind, pools, scale, args, absent, _, _ in self._layers:
            step = compiled_layer_step(kind, attention, self.precision, absent)
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
            attention = self.prefill_attention
            tables = self._tables([block_ids], 1, self.pool.blocks_for(start + length), attention)
            hidden = self._run_layers(ids, positions, slots, tables, np.asarray([start + length], np.int32), attention)
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
        if self.precision == "bf16":
            return self._decode_whole(ids, pos, slots, tables, seq_lens)[:batch]
        hidden = self._run_layers(ids, pos, slots, tables, seq_lens, self.decode_attention)
        return self._logits(hidden, 0)[:batch]

    def _decode_whole(self, ids, positions, slots, tables, seq_lens) -> np.ndarray:
        """The bf16 decode step in one graph (``compiled_decode_model``) → logits [B, V]."""
        layout = tuple((kind, step_fused, len(args), absent)
                       for kind, _, _, args, absent, step_fused, _ in self._layers)
        model = compiled_decode_model(layout, self.decode_attention)
        rope = {kind: (Tensor(cos[positions]), Tensor(sin[positions])) for kind, (cos, sin) in self._rope.items()}
        gqa = rope.get("gqa", rope.get("mla"))
        mla = rope.get("mla", gqa)
        flat = [value for _, pools, scale, args, _, _, addresses in self._layers
                for value in (*pools, scale, addresses, *args)]
        logits = model(Tensor(ids, ms.int32), *self.runner.head_weights(), *gqa, *mla, Tensor(slots, ms.int32),
                       Tensor(tables, ms.int32), Tensor(positions, ms.int32), Tensor(seq_lens, ms.int32), *flat)
        return logits.asnumpy()

    def _tables(self, block_tables: list[list[int]], rows: int, needed: int, attention: DecodeAttention) -> np.ndarray:
        """[rows, width] int32 block tables, unused entries on the null block."""
        if attention.dynamic_shapes:
            width = needed
        elif attention.bucketed:
            width = min(self.full_table_width, 1 << max(0, (needed - 1).bit_length()))
        else:
            width = self.full_table_width
        tables = np.full((rows, width), NULL_BLOCK, np.int32)
        for row, table in enumerate(block_tables):
            used = min(width, len(table))
            tables[row, :used] = table[:used]
        return tables

    def _logits(self, hidden, row: int) -> np.ndarray:
        """Logits [B, V] at one row: the head runs on that row only, never on a whole chunk."""
        return self.runner.head_logits(_pick_row(hidden, Tensor([row], ms.int32))).asnumpy()[:, 0]
