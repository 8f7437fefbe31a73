"""Incremental decoding with a contiguous KV cache (GQA: K/V; MLA: latent + k_pe, absorbed).

This is the single-sequence reference path (``generate``, exactness tests).  The paged, batched
engine lives in ``mindyouzhi.serve``; both use the same functional attention pieces.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import mindspore as ms
from mindspore import ops

from . import functional as F
from .decoder import mla_dims
from .layers import causal_mask, to_tensor


@dataclass
class LayerCache:
    """One layer's cache: (K, V) [B, KV, T, d] for GQA, (latent [B, T, r], k_pe [B, T, dr]) for MLA."""

    first: object = None
    second: object = None
    token_axis: int = 1

    def append(self, first, second):
        axis = self.token_axis
        self.first = first if self.first is None else ops.cat((self.first, first), axis)
        self.second = second if self.second is None else ops.cat((self.second, second), axis)

    def values_per_token(self) -> int:
        """Cached scalars per token and sequence (summed over heads): what the memory budget pays for."""
        if self.first is None:
            return 0
        per_token = lambda t: int(np.prod(t.shape[1:])) // int(t.shape[self.token_axis])  # noqa: E731
        return per_token(self.first) + per_token(self.second)

    def tokens(self) -> int:
        return 0 if self.first is None else int(self.first.shape[self.token_axis])


@dataclass
class DecodeState:
    caches: list = field(default_factory=list)
    length: int = 0


def attention_cached(runner, index: int, h, cache: LayerCache, tables, mask):
    """Attention of layer ``index`` for new tokens ``h`` after the cached prefix (extends ``cache``)."""
    config = runner.config
    w = runner.layer_weights[index]
    eps = float(config.rms_norm_eps)
    cos, sin, mcos, msin = tables
    if config.is_mla(index):
        heads, nope, rope, v_dim, rank = mla_dims(config, index)
        latent, k_pe = F.mla_project_latent(h, mcos, msin, rank, eps, w["self_attn.kv_a_proj_with_mqa.weight"],
                                            w.get("self_attn.kv_a_proj_with_mqa.bias"), w.get("self_attn.kv_a_layernorm.weight"))
        cache.token_axis = 1
        cache.append(latent, k_pe)
        q_nope, q_pe = F.mla_project_q(h, mcos, msin, heads, nope, rope, w["self_attn.q_proj.weight"], w.get("self_attn.q_proj.bias"))
        out = F.mla_attend_absorbed(q_nope, q_pe, cache.first, cache.second, mask, heads, nope, rope, v_dim, rank,
                                    w["self_attn.kv_b_proj.weight"])
    else:
        k, v = F.gqa_project_kv(h, cos, sin, config.num_key_value_heads, config.head_dim, eps, w["self_attn.k_proj.weight"],
                                w.get("self_attn.k_proj.bias"), w["self_attn.v_proj.weight"], w.get("self_attn.v_proj.bias"),
                                w.get("self_attn.k_norm.weight"))
        cache.token_axis = 2
        cache.append(k, v)
        q = F.gqa_project_q(h, cos, sin, config.num_attention_heads, config.head_dim, eps, w["self_attn.q_proj.weight"],
                            w.get("self_attn.q_proj.bias"), w.get("self_attn.q_norm.weight"))
        out = F.gqa_attend(q, cache.first, cache.second, mask, config.num_attention_heads, config.num_key_value_heads)
    return ops.dense(out, w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias"))


def forward_cached(runner, input_ids: np.ndarray, state: DecodeState) -> np.ndarray:
    """Run ``input_ids`` [B, T] after the cached prefix; extends ``state``; returns logits [B, T, V]."""
    config = runner.config
    ids = np.asarray(input_ids, dtype=np.int32)
    length = ids.shape[1]
    tables = tuple(to_tensor(t) for t in runner.rope(length, offset=state.length))
    total = state.length + length
    mask = to_tensor(causal_mask(total)[state.length:])  # [T, prefix + T]
    if not state.caches:
        state.caches = [LayerCache() for _ in range(config.num_hidden_layers)]
    eps = float(config.rms_norm_eps)
    x = runner.embed(to_tensor(ids, ms.int32))
    for index, w in enumerate(runner.layer_weights):
        h = F.rms_norm(x, w["input_layernorm.weight"], eps)
        x = x + attention_cached(runner, index, h, state.caches[index], tables, mask)
        x = x + F.swiglu(F.rms_norm(x, w["post_attention_layernorm.weight"], eps), w["mlp.gate_proj.weight"],
                         w["mlp.up_proj.weight"], w["mlp.down_proj.weight"], w.get("mlp.gate_proj.bias"),
                         w.get("mlp.up_proj.bias"), w.get("mlp.down_proj.bias"))
    state.length = total
    return runner.head_logits(x).asnumpy()


def generate(runner, prompt_ids: list[int], max_new_tokens: int, stop_ids: tuple[int, ...] = (),
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[int]:
    """Greedy (temperature 0) or sampled decoding; returns the new token ids only."""
    rng = np.random.default_rng(seed)
    state = DecodeState()
    logits = forward_cached(runner, np.asarray([prompt_ids]), state)[0, -1]
    produced: list[int] = []
    for _ in range(max_new_tokens):
        token = sample_token(logits, temperature, top_p, rng)
        produced.append(token)
        if token in stop_ids:
            break
        logits = forward_cached(runner, np.asarray([[token]]), state)[0, -1]
    return produced


def sample_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, top_p) + 1)]
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(len(probs), p=probs))
