"""Our converted tensors → the Hugging Face DeepSeek-V3 checkpoint layout, one tensor at a time.

Names are already DeepSeek's (``q_proj``, ``kv_a_proj_with_mqa``, ``kv_a_layernorm``,
``kv_b_proj``, ``o_proj``; MLP and norms as in HF Llama, which DeepSeek's dense MLP shares).
What changes is the RoPE row order: our RoPE slice pairs rows (p, p + r/2) (rotate-half), DeepSeek
checkpoints pair (2p, 2p + 1) (``rope_interleave: true``; transformers' interleaved rotation takes
``x[0::2]`` / ``x[1::2]`` as the two halves).  Row ``2p`` of the exported slice is therefore our row
``p`` and row ``2p + 1`` our row ``p + r/2`` — the same pairs at the same frequency, so scores are
unchanged; queries and keys must be permuted identically.

With ``plan.norm_scale = s ≠ 1`` (source ``rms_norm_eps`` ≠ 1e-6, see ``plan.py``) everything that
writes the residual stream (embeddings, ``o_proj``, ``down_proj``) and the latent rows of
``kv_a_proj_with_mqa`` are multiplied by ``s`` so that RMSNorms with ε = 1e-6 reproduce the source
norms exactly; norm weights, ``q_proj``, the RoPE key rows, ``kv_b_proj`` and ``lm_head`` are not.

A model converted without ``--latent-norm`` gets a ``kv_a_layernorm`` that is exactly the
identity (latent rows scaled by a tiny σ, weight ``sqrt(ε)/σ``; ``plan.latent_scale``).
A source with query biases gets ``q_a_proj`` / ``q_a_layernorm`` / ``q_b_proj`` instead of
``q_proj`` (``plan.query``; the construction is explained in ``plan.py``).
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from mindyouzhi.convert_weights import architectures
from mindyouzhi.convert_weights.safetensors_io import SafetensorsStore
from mindyouzhi.models.decoder import layer_prefix
from mindyouzhi.models.rope import rotate_half_to_interleaved_rows

from .plan import DEEPSEEK_NORM_EPS, ExportPlan, latent_scale

# Per-layer tensors copied as they are (local names; identical in our layout and DeepSeek's).
_COPIED = (
    "input_layernorm.weight",
    "self_attn.kv_b_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
)
# Per-layer tensors that write the residual stream: scaled by plan.norm_scale.
_RESIDUAL_WRITERS = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


def deepseek_v3_shapes(plan: ExportPlan) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor ``deepseek_v3_tensors`` yields, in the same order: the source's
    spec shapes (``convert_weights/architectures.py``), with the query factorised when
    ``plan.query`` is set and the biases DeepSeek-V3 ties to ``attention_bias``."""
    config = plan.config
    hidden, vocab = config.hidden_size, config.vocab_size
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for layer in range(plan.num_layers):
        source = architectures.layer_shapes(config, layer)
        attn = layer_prefix(layer) + "self_attn."
        q_rows = source["self_attn.q_proj.weight"][0]
        if plan.query is None:
            shapes[attn + "q_proj.weight"] = (q_rows, hidden)
        else:
            rank = plan.query.rank
            shapes.update({attn + "q_a_proj.weight": (rank, hidden), attn + "q_a_proj.bias": (rank,),
                           attn + "q_a_layernorm.weight": (rank,), attn + "q_b_proj.weight": (q_rows, rank)})
        latent = source["self_attn.kv_a_proj_with_mqa.weight"]
        shapes[attn + "kv_a_proj_with_mqa.weight"] = latent
        if plan.attention_bias:
            shapes[attn + "kv_a_proj_with_mqa.bias"] = (latent[0],)
            shapes[attn + "o_proj.bias"] = (hidden,)
        shapes[attn + "kv_a_layernorm.weight"] = (plan.kv_lora_rank,)
        shapes.update({layer_prefix(layer) + name: source[name] for name in _COPIED + _RESIDUAL_WRITERS})
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def deepseek_v3_tensors(plan: ExportPlan, store: SafetensorsStore) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (DeepSeek-V3 name, fp32 array) for every tensor of the export, in checkpoint order."""
    yield "model.embed_tokens.weight", _scaled(store.get("model.embed_tokens.weight"), plan.norm_scale)
    for layer in range(plan.num_layers):
        yield from _layer_tensors(plan, store, layer)
    yield "model.norm.weight", store.get("model.norm.weight")
    # Always an explicit lm_head: vLLM's DeepseekV2/V3ForCausalLM never ties it to the embedding,
    # so a tied source would otherwise load with an uninitialised head there.
    head = "model.embed_tokens.weight" if plan.config.tie_word_embeddings else "lm_head.weight"
    yield "lm_head.weight", store.get(head)


def _layer_tensors(plan: ExportPlan, store: SafetensorsStore, layer: int) -> Iterator[tuple[str, np.ndarray]]:
    prefix = layer_prefix(layer)
    attn = prefix + "self_attn."
    order = rotate_half_to_interleaved_rows(plan.rope_dim)

    norm_weight = store.get(prefix + "input_layernorm.weight")  # bounds x̂ for both pinned norms
    q = _interleaved_query(plan, store.get(attn + "q_proj.weight"), order)
    if plan.query is None:
        # A q_proj.bias, if present, is all zero (plan_export chose the q_a/q_b path otherwise).
        yield attn + "q_proj.weight", q
    else:
        q_bias = _bias_or_zeros(store, attn + "q_proj.bias", q.shape[0])
        yield from _factorised_query(plan, norm_weight, q,
                                     _interleaved_query(plan, q_bias, order), attn)

    kv_a = store.get(attn + "kv_a_proj_with_mqa.weight")
    kv_a_bias = _bias_or_zeros(store, attn + "kv_a_proj_with_mqa.bias", plan.kv_lora_rank + plan.rope_dim)
    if plan.linear_latent_norm:
        # No norm of our own: pin the engine's to the identity (plan.py, "linear latent norm").
        scale = latent_scale(norm_weight, kv_a[:plan.kv_lora_rank],
                             kv_a_bias[:plan.kv_lora_rank], DEEPSEEK_NORM_EPS)
        latent_norm = np.full(plan.kv_lora_rank, math.sqrt(DEEPSEEK_NORM_EPS) / scale, np.float32)
    else:
        scale, latent_norm = plan.norm_scale, store.get(attn + "kv_a_layernorm.weight")
    yield attn + "kv_a_proj_with_mqa.weight", _kv_a(plan, kv_a, order, scale)
    if plan.attention_bias:
        yield attn + "kv_a_proj_with_mqa.bias", _kv_a(plan, kv_a_bias, order, scale)
        o_bias = _bias_or_zeros(store, attn + "o_proj.bias", plan.config.hidden_size)
        yield attn + "o_proj.bias", _scaled(o_bias, plan.norm_scale)
    yield attn + "kv_a_layernorm.weight", latent_norm
    for name in _COPIED:
        yield prefix + name, store.get(prefix + name)
    for name in _RESIDUAL_WRITERS:
        yield prefix + name, _scaled(store.get(prefix + name), plan.norm_scale)


def _interleaved_query(plan: ExportPlan, rows: np.ndarray, order: np.ndarray) -> np.ndarray:
    """q_proj weight or bias with each head's RoPE rows in DeepSeek's interleaved order."""
    per_head = rows.reshape(plan.num_heads, plan.head_dim + plan.rope_dim, -1)
    per_head[:, plan.head_dim:] = per_head[:, plan.head_dim + order]
    return per_head.reshape(rows.shape)


def _factorised_query(plan: ExportPlan, norm_weight: np.ndarray, weight: np.ndarray, bias: np.ndarray,
                      attn: str) -> Iterator[tuple[str, np.ndarray]]:
    """``W x̂ + b`` as q_b_proj(q_a_layernorm(q_a_proj(x̂))) with a pinned norm (see plan.py)."""
    query = plan.query
    hidden, k = weight.shape[1], query.constant_channels
    alpha = query.input_scale(float(np.abs(norm_weight).max()))
    gain = query.norm_gain(DEEPSEEK_NORM_EPS)
    q_a = np.zeros((query.rank, hidden), np.float32)
    q_a[np.arange(hidden), np.arange(hidden)] = alpha
    q_a_bias = np.zeros(query.rank, np.float32)
    q_a_bias[hidden:] = 1.0
    q_b = np.empty((weight.shape[0], query.rank), np.float32)
    q_b[:, :hidden] = np.asarray(weight, np.float64) / (alpha * gain)
    q_b[:, hidden:] = (np.asarray(bias, np.float64) / (k * gain))[:, None]
    yield attn + "q_a_proj.weight", q_a
    yield attn + "q_a_proj.bias", q_a_bias
    yield attn + "q_a_layernorm.weight", np.ones(query.rank, np.float32)
    yield attn + "q_b_proj.weight", q_b


def _kv_a(plan: ExportPlan, rows: np.ndarray, order: np.ndarray, scale: float) -> np.ndarray:
    """kv_a_proj_with_mqa weight or bias: latent rows scaled, RoPE rows interleaved."""
    rank = plan.kv_lora_rank
    rows[rank:] = rows[rank + order]
    _scaled(rows[:rank], scale)  # in place, through the view
    return rows


def _scaled(array: np.ndarray, scale: float) -> np.ndarray:
    # In place and in float32: a float64 copy of a large embedding would double peak memory, and
    # the rounding of s itself only moves the effective epsilon by ~1e-7 relative.
    if scale != 1.0:
        array *= np.float32(scale)
    return array


def _bias_or_zeros(store: SafetensorsStore, name: str, size: int) -> np.ndarray:
    # attention_bias switches kv_a and o biases on together; the one the source lacks is zero.
    return store.get(name) if name in store else np.zeros(size, np.float32)
