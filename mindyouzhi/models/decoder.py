"""The hybrid decoder: every layer is GQA (source) or MLA (converted), one LM head.

Weights come from a ``SafetensorsStore`` (or a plain dict in tests) and are checked against the
shapes the config implies, so a wrong checkpoint fails with the tensor's name and both shapes.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import numpy as np
from mindspore import nn, ops

from mindyouzhi.convert_weights.name_maps import global_map, layer_map
from mindyouzhi.errors import UserError

from .attention import GQAAttention, MLAAttention
from .config import ModelConfig
from .layers import Embedding, Linear, RMSNorm, SwiGLU
from .rope import cos_sin, inverse_frequencies

WeightSource = Callable[[str], np.ndarray]


def expected_layer_shapes(config: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """Local tensor name → shape for one decoder layer of this config."""
    d, h, kv, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    shapes = {
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
        "mlp.gate_proj.weight": (config.intermediate_size, d),
        "mlp.up_proj.weight": (config.intermediate_size, d),
        "mlp.down_proj.weight": (d, config.intermediate_size),
    }
    if config.is_mla(layer):
        rank = int(config.mla.kv_lora_rank[layer])
        rope = config.mla_rope_width(layer)
        nope = 0 if config.mla.rope_all else hd
        shapes.update({
            "self_attn.q_proj.weight": (h * (nope + rope), d),
            "self_attn.kv_a_proj_with_mqa.weight": (rank + rope, d),
            "self_attn.kv_b_proj.weight": (h * (nope + hd), rank),
            "self_attn.o_proj.weight": (d, h * hd),
        })
        if config.qkv_bias:
            shapes["self_attn.q_proj.bias"] = (h * (nope + rope),)
            shapes["self_attn.kv_a_proj_with_mqa.bias"] = (rank + rope,)
        if config.o_bias:
            shapes["self_attn.o_proj.bias"] = (d,)
        if config.mla.latent_norm:
            shapes["self_attn.kv_a_layernorm.weight"] = (rank,)
        return shapes
    shapes.update({
        "self_attn.q_proj.weight": (h * hd, d),
        "self_attn.k_proj.weight": (kv * hd, d),
        "self_attn.v_proj.weight": (kv * hd, d),
        "self_attn.o_proj.weight": (d, h * hd),
    })
    if config.qkv_bias:
        shapes.update({"self_attn.q_proj.bias": (h * hd,), "self_attn.k_proj.bias": (kv * hd,), "self_attn.v_proj.bias": (kv * hd,)})
    if config.o_bias:
        shapes["self_attn.o_proj.bias"] = (d,)
    if config.qk_norm:
        shapes.update({"self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,)})
    return shapes


def expected_global_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    names = global_map(config.tie_word_embeddings)
    shapes = {"model.embed_tokens.weight": (config.vocab_size, config.hidden_size), "model.norm.weight": (config.hidden_size,)}
    if "lm_head.weight" in names:
        shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    return shapes


def mla_dims(config: ModelConfig, layer: int) -> tuple[int, int, int, int, int]:
    """(heads, nope_dim, rope_dim, v_dim, kv_lora_rank) of an MLA layer."""
    nope = 0 if config.mla.rope_all else config.head_dim
    return (config.num_attention_heads, nope, config.mla_rope_width(layer), config.head_dim,
            int(config.mla.kv_lora_rank[layer]))


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def read_layer_weights(source, config: ModelConfig, layer: int, where: str = "checkpoint") -> dict[str, np.ndarray]:
    """Fetch and shape-check one layer's tensors (local names) from a store or mapping."""
    if not config.is_mla(layer):
        # The family table decides which optional tensors must exist (documented per family).
        table = layer_map(config.model_type, config.qkv_bias, config.o_bias, config.qk_norm)
        assert {t.format(i=layer) for t in table} == {layer_prefix(layer) + k for k in expected_layer_shapes(config, layer)}
    return {name: _fetch(source, layer_prefix(layer) + name, shape, where)
            for name, shape in expected_layer_shapes(config, layer).items()}


def read_global_weights(source, config: ModelConfig, where: str = "checkpoint") -> dict[str, np.ndarray]:
    return {name: _fetch(source, name, shape, where) for name, shape in expected_global_shapes(config).items()}


def _fetch(source, name: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    if name not in source:
        raise UserError(f"{where}: tensor {name} is missing (expected shape {list(shape)})")
    tensor = source.get(name) if hasattr(source, "get") and not isinstance(source, Mapping) else source[name]
    if tuple(tensor.shape) != tuple(shape):
        raise UserError(f"{where}: tensor {name} has shape {list(tensor.shape)}, expected {list(shape)}")
    return np.asarray(tensor, dtype=np.float32)


def _local(weights: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


class DecoderLayer(nn.Cell):
    def __init__(self, config: ModelConfig, layer: int, weights: Mapping[str, np.ndarray]):
        super().__init__()
        eps = config.rms_norm_eps
        self.is_mla = config.is_mla(layer)
        self.input_layernorm = RMSNorm(weights["input_layernorm.weight"], eps)
        self.post_attention_layernorm = RMSNorm(weights["post_attention_layernorm.weight"], eps)
        attn = _local(weights, "self_attn.")
        if self.is_mla:
            self.self_attn = MLAAttention(attn, *mla_dims(config, layer), eps, config.mla.latent_norm)
        else:
            self.self_attn = GQAAttention(attn, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                                          eps, config.qk_norm)
        self.mlp = SwiGLU(_local(weights, "mlp."))

    def construct(self, x, cos, sin, mla_cos, mla_sin, mask):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mla_cos, mla_sin, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class _Body(nn.Cell):
    """Holds ``embed_tokens``, ``layers`` and ``norm`` so parameter names read ``model.…``."""

    def __init__(self, config: ModelConfig, embed: np.ndarray, norm: np.ndarray, layers: list[DecoderLayer]):
        super().__init__()
        self.embed_tokens = Embedding(embed)
        self.layers = nn.CellList(layers)
        self.norm = RMSNorm(norm, config.rms_norm_eps)


class CausalLM(nn.Cell):
    """Embedding → hybrid decoder layers → final norm → LM head (tied or not)."""

    def __init__(self, config: ModelConfig, source, where: str = "checkpoint"):
        super().__init__()
        self.config = config
        glob = read_global_weights(source, config, where)
        layers = [DecoderLayer(config, i, read_layer_weights(source, config, i, where)) for i in range(config.num_hidden_layers)]
        self.model = _Body(config, glob["model.embed_tokens.weight"], glob["model.norm.weight"], layers)
        self.tied = config.tie_word_embeddings
        if not self.tied:
            self.lm_head = Linear(glob["lm_head.weight"])

    def head(self, hidden):
        hidden = self.model.norm(hidden)
        if self.tied:
            return ops.matmul(hidden, self.model.embed_tokens.weight.swapaxes(0, 1))
        return self.lm_head(hidden)

    def hidden(self, input_ids, cos, sin, mla_cos, mla_sin, mask):
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mla_cos, mla_sin, mask)
        return x

    def construct(self, input_ids, cos, sin, mla_cos, mla_sin, mask):
        return self.head(self.hidden(input_ids, cos, sin, mla_cos, mla_sin, mask))


def mla_frequency_indices(config: ModelConfig) -> Optional[np.ndarray]:
    """Source-frequency index of every RoPE pair of the MLA RoPE slice (spec §2: pair p ↔ θ_{c·p})."""
    if config.mla is None or all(f is None for f in config.mla.fold_plan):
        return None
    if config.mla.rope_all:
        return np.repeat(np.arange(config.head_dim // 2), config.num_key_value_heads)
    collapse = config.head_dim // config.mla.rope_dim
    return np.arange(config.mla.rope_dim // 2) * collapse


def cell_weights(cell: nn.Cell, prefix: str) -> dict:
    """Parameters of ``cell`` by checkpoint name with ``prefix`` removed (no copies)."""
    return {name[len(prefix):]: param for name, param in cell.parameters_and_names() if name.startswith(prefix)}


class RopeTables:
    """cos/sin for the source RoPE and the MLA RoPE slice, cached per length."""

    def __init__(self, config: ModelConfig):
        self.config = config
        self._cache: dict[int, tuple[np.ndarray, ...]] = {}

    def __call__(self, length: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        key = offset + length
        if key not in self._cache:
            inv_freq, factor = inverse_frequencies(self.config, key)
            cos, sin = cos_sin(inv_freq, np.arange(key), factor)
            idx = mla_frequency_indices(self.config)
            if idx is None:  # the graph still needs a well-formed (unused) input
                mcos, msin = cos[:, :1], sin[:, :1]
            else:
                mcos, msin = cos[:, idx], sin[:, idx]
            self._cache[key] = (cos, sin, mcos, msin)
        return tuple(t[offset: offset + length] for t in self._cache[key])


def layer_function(config: ModelConfig, layer: int, weights: Mapping[str, np.ndarray]):
    """A callable (hidden, cos, sin, mla_cos, mla_sin, mask) → hidden for one layer, sharing one
    compiled graph with every other layer of the same shape (weights are graph arguments)."""
    from mindspore import Tensor

    from . import functional as F

    eps = float(config.rms_norm_eps)

    def tensor(value):
        if value is None or isinstance(value, Tensor):
            return value  # Parameters of a built model are passed as they are: no copy
        return Tensor(np.ascontiguousarray(value, np.float32))

    if config.is_mla(layer):
        args = tuple(tensor(weights.get(k)) for k in F.MLA_LAYER_WEIGHTS)
        dims = mla_dims(config, layer)

        def run(x, cos, sin, mla_cos, mla_sin, mask):
            return F.mla_layer(x, mla_cos, mla_sin, mask, *dims, eps, *args)
    else:
        args = tuple(tensor(weights.get(k)) for k in F.GQA_LAYER_WEIGHTS)
        dims = (config.num_attention_heads, config.num_key_value_heads, config.head_dim)

        def run(x, cos, sin, mla_cos, mla_sin, mask):
            return F.gqa_layer(x, cos, sin, mask, *dims, eps, *args)
    return run
