"""The hybrid decoder: every layer is GQA (source) or MLA (converted), one LM head.

Weights come from a ``SafetensorsStore`` (or a plain dict in tests) and are checked against the
shapes the config implies, so a wrong checkpoint fails with the tensor's name and both shapes.
"""
from __future__ import annotations

import functools
from typing import Callable, Mapping, Optional

import numpy as np
from mindspore import nn

from mindyouzhi.convert_weights import architectures
from mindyouzhi.errors import UserError
from mindyouzhi.transition import folds

from .attention import GQAAttention, MLAAttention
from .config import ModelConfig
from .layers import Embedding, Linear, Projection, RMSNorm, SwiGLU
from .rope import cos_sin, inverse_frequencies

WeightSource = Callable[[str], np.ndarray]


def expected_layer_shapes(config: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """Local tensor name → shape for one decoder layer of this config (from the family spec)."""
    return architectures.layer_shapes(config, layer)


def expected_global_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    return architectures.global_shapes(config)


def expected_tensor_names(config: ModelConfig) -> set[str]:
    """Every tensor name of a checkpoint of this config."""
    names = set(expected_global_shapes(config))
    for layer in range(config.num_hidden_layers):
        names.update(layer_prefix(layer) + local for local in expected_layer_shapes(config, layer))
    return names


def mla_dims(config: ModelConfig, layer: int) -> tuple[int, int, int, int, int]:
    """(heads, nope_dim, rope_dim, v_dim, kv_lora_rank) of an MLA layer."""
    nope = 0 if config.mla.rope_all else config.head_dim
    return (config.num_attention_heads, nope, config.mla_rope_width(layer), config.head_dim,
            int(config.mla.kv_lora_rank[layer]))


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def read_layer_weights(source, config: ModelConfig, layer: int, where: str = "checkpoint") -> dict[str, np.ndarray]:
    """Fetch and shape-check one layer's tensors (local names) from a store or mapping."""
    return {name: _fetch(source, layer_prefix(layer) + name, shape, where)
            for name, shape in expected_layer_shapes(config, layer).items()}


def read_global_weights(source, config: ModelConfig, where: str = "checkpoint") -> dict[str, np.ndarray]:
    """The global tensors.  Every model load starts here, so this is also where the whole tensor
    set is checked against the spec (a store's header, no tensor data): a tensor the spec does
    not consume is refused instead of being silently dropped."""
    architectures.check_tensors({name: _shape(source, name) for name in source.keys()}, config, where)
    return {name: _fetch(source, name, shape, where) for name, shape in expected_global_shapes(config).items()}


def _shape(source, name: str) -> tuple[int, ...]:
    return tuple(source.shape(name)) if hasattr(source, "shape") else tuple(source[name].shape)


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
    """Embedding → hybrid decoder layers → final norm → LM head (tied or not).

    ``name_prefix`` is put before every parameter name (``"teacher."`` → ``teacher.model.layers.0.…``):
    two models in one graph (the GKD teacher next to the student) then have distinct names by
    construction, and MindSpore never renames either (it rewrites *all* names to attribute paths
    when it finds a duplicate, ``nn/cell.py: check_names_and_refresh_name``)."""

    def __init__(self, config: ModelConfig, source, where: str = "checkpoint", name_prefix: str = ""):
        super().__init__()
        self.config = config
        glob = read_global_weights(source, config, where)
        layers = [DecoderLayer(config, i, read_layer_weights(source, config, i, where)) for i in range(config.num_hidden_layers)]
        self.model = _Body(config, glob["model.embed_tokens.weight"], glob["model.norm.weight"], layers)
        self.tied = config.tie_word_embeddings
        if self.tied:
            self.tied_head = Projection()  # the embedding table as the head: its own MatMul
        else:
            self.lm_head = Linear(glob["lm_head.weight"])
        self.name_prefix = name_prefix
        if name_prefix:
            self.update_parameters_name(name_prefix)

    def head(self, hidden):
        hidden = self.model.norm(hidden)
        if self.tied:
            return self.tied_head(hidden, self.model.embed_tokens.weight)
        return self.lm_head(hidden)

    def hidden(self, input_ids, cos, sin, mla_cos, mla_sin, mask):
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mla_cos, mla_sin, mask)
        return x

    def construct(self, input_ids, cos, sin, mla_cos, mla_sin, mask):
        return self.head(self.hidden(input_ids, cos, sin, mla_cos, mla_sin, mask))


def mla_frequency_indices(config: ModelConfig) -> Optional[np.ndarray]:
    """Source-frequency index of every RoPE pair of the MLA RoPE slice: pair p rotates at the source
    frequency θ_{s·p}, s = ``mla.rope_stride`` (default head_dim / rope_dim: every c-th frequency of
    the original RoPE; 1: the rope_dim/2 fastest)."""
    if config.mla is None or all(f is None for f in config.mla.fold_plan):
        return None
    if config.mla.rope_all:
        return np.repeat(np.arange(config.head_dim // 2), config.num_key_value_heads)
    return np.asarray(folds.frequency_indices(config.head_dim, config.mla.rope_dim, config.mla.rope_stride))


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


# The precisions of ``layer_function``: fp32 (plain ops), or bf16 — the projections and the two
# products of the attention core with bf16 inputs and fp32 accumulation (the CPU kernels of
# ``mindyouzhi.ops.bf16``: forward only, causal windows from position 0, no gradient).
LAYER_PRECISIONS = ("fp32", "bf16")


@functools.lru_cache(maxsize=None)
def layer_graphs(precision: str):
    """(gqa_layer, mla_layer) jitted with the projections of ``precision``."""
    from . import functional as F

    if precision == "fp32":
        return F.gqa_layer, F.mla_layer
    if precision == "bf16":
        from mindyouzhi.ops.bf16 import graph_attend, graph_dense

        return F.layer_graphs(graph_dense(), graph_attend())
    raise ValueError(f"layer precision {precision!r}: expected one of {LAYER_PRECISIONS}")


def layer_function(config: ModelConfig, layer: int, weights: Mapping[str, np.ndarray], precision: str = "fp32"):
    """A callable (hidden, cos, sin, mla_cos, mla_sin, mask) → hidden for one layer, sharing one
    compiled graph with every other layer of the same shape (weights are graph arguments)."""
    from mindspore import Tensor

    from . import functional as F

    gqa_layer, mla_layer = layer_graphs(precision)

    eps = float(config.rms_norm_eps)

    def tensor(value, name: str):
        if value is None or isinstance(value, Tensor):
            return value  # Parameters of a built model are passed as they are: no copy
        if precision == "bf16" and name.endswith(("_proj.weight", "_mqa.weight")):
            from mindyouzhi.ops.bf16 import bf16_bits

            return Tensor(bf16_bits(value))  # projection matrices rounded once, not at every call
        return Tensor(np.ascontiguousarray(value, np.float32))

    if config.is_mla(layer):
        args = tuple(tensor(weights.get(k), k) for k in F.MLA_LAYER_WEIGHTS)
        dims = mla_dims(config, layer)

        def run(x, cos, sin, mla_cos, mla_sin, mask):
            return mla_layer(x, mla_cos, mla_sin, mask, *dims, eps, *args)
    else:
        args = tuple(tensor(weights.get(k), k) for k in F.GQA_LAYER_WEIGHTS)
        dims = (config.num_attention_heads, config.num_key_value_heads, config.head_dim)

        def run(x, cos, sin, mla_cos, mla_sin, mask):
            return gqa_layer(x, cos, sin, mask, *dims, eps, *args)
    return run
