"""One architecture spec per model family, as data: which tensors a checkpoint holds, their shapes
as functions of the config, the optional parts and the config flags that switch them on — and,
for the families llama.cpp writes, how a GGUF file stores them (:class:`GGUFLayout`).

Everything that names or shapes a weight reads this module: the importers (``gguf_reader``,
``llama2c``, ``hf_layout``), the loader and the cells (``models/decoder.py``, ``functional.py``),
the converter's writer and the exporter.  Names are the Hugging Face Llama names (the families
below share that layout; a converted layer uses DeepSeek-V2/V3 attention names), written as
``string.Template`` templates with ``${layer}`` for the decoder layer index.  Shapes are tuples of
dimension names resolved by :func:`dimensions`.

Nothing is silently ignored: a flag that switches on a feature the family (or our math) does not
have, or a tensor in a checkpoint that no spec entry consumes, is a ``UserError`` naming it.  The
one exception is :data:`DERIVED_BUFFERS`, tensors some exporters save that are recomputed from the
config (listed with the reason).

This module must not import ``mindyouzhi.models`` (``models/config.py`` imports it): functions take
any object with the ``ModelConfig`` attributes they use.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from string import Template
from typing import Any, Iterable, Mapping, Optional

from mindyouzhi.errors import UserError

LAYER_PREFIX = "model.layers.${layer}."

# Optional parts.  A tensor tagged with a part exists exactly when the part is on.
QKV_BIAS = "qkv_bias"  # q/k/v projection biases (MLA: q_proj and kv_a_proj_with_mqa)
O_BIAS = "o_bias"
MLP_BIAS = "mlp_bias"  # gate/up/down projection biases
QK_NORM = "qk_norm"  # per-head RMSNorm on queries and keys (Qwen3)
LM_HEAD = "lm_head"  # an untied output projection
LATENT_NORM = "latent_norm"  # RMSNorm on the MLA latent (``convert --latent-norm``)


@dataclass(frozen=True)
class TensorSpec:
    template: str  # full name with ${layer} for per-layer tensors, else the global name
    shape: tuple[str, ...]  # dimension names, see ``dimensions``
    part: Optional[str] = None  # None: always present

    @property
    def local(self) -> str:
        """The name inside a layer (``self_attn.q_proj.weight``) or the global name."""
        return self.template[len(LAYER_PREFIX):] if self.template.startswith(LAYER_PREFIX) else self.template


def _layer(local: str, shape: tuple[str, ...], part: Optional[str] = None) -> TensorSpec:
    return TensorSpec(LAYER_PREFIX + local, shape, part)


GLOBAL_TENSORS = (
    TensorSpec("model.embed_tokens.weight", ("vocab", "hidden")),
    TensorSpec("model.norm.weight", ("hidden",)),
    TensorSpec("lm_head.weight", ("vocab", "hidden"), LM_HEAD),
)

# Shared by GQA and MLA layers: the conversion only rewrites attention.  The order of every layer
# table is the argument order of the jitted layer functions (``models/functional.py``).
_NORMS_AND_MLP = (
    _layer("input_layernorm.weight", ("hidden",)),
    _layer("post_attention_layernorm.weight", ("hidden",)),
    _layer("mlp.gate_proj.weight", ("intermediate", "hidden")),
    _layer("mlp.gate_proj.bias", ("intermediate",), MLP_BIAS),
    _layer("mlp.up_proj.weight", ("intermediate", "hidden")),
    _layer("mlp.up_proj.bias", ("intermediate",), MLP_BIAS),
    _layer("mlp.down_proj.weight", ("hidden", "intermediate")),
    _layer("mlp.down_proj.bias", ("hidden",), MLP_BIAS),
)

GQA_LAYER_TENSORS = _NORMS_AND_MLP + (
    _layer("self_attn.q_proj.weight", ("q_rows", "hidden")),
    _layer("self_attn.q_proj.bias", ("q_rows",), QKV_BIAS),
    _layer("self_attn.k_proj.weight", ("kv_rows", "hidden")),
    _layer("self_attn.k_proj.bias", ("kv_rows",), QKV_BIAS),
    _layer("self_attn.v_proj.weight", ("kv_rows", "hidden")),
    _layer("self_attn.v_proj.bias", ("kv_rows",), QKV_BIAS),
    _layer("self_attn.o_proj.weight", ("hidden", "q_rows")),
    _layer("self_attn.o_proj.bias", ("hidden",), O_BIAS),
    _layer("self_attn.q_norm.weight", ("head_dim",), QK_NORM),
    _layer("self_attn.k_norm.weight", ("head_dim",), QK_NORM),
)

# A converted layer: DeepSeek-V2/V3 attention names (q_lora_rank = None form).
MLA_LAYER_TENSORS = _NORMS_AND_MLP + (
    _layer("self_attn.q_proj.weight", ("mla_q_rows", "hidden")),
    _layer("self_attn.q_proj.bias", ("mla_q_rows",), QKV_BIAS),
    _layer("self_attn.kv_a_proj_with_mqa.weight", ("latent_rows", "hidden")),
    _layer("self_attn.kv_a_proj_with_mqa.bias", ("latent_rows",), QKV_BIAS),
    _layer("self_attn.kv_a_layernorm.weight", ("kv_lora_rank",), LATENT_NORM),
    _layer("self_attn.kv_b_proj.weight", ("kv_b_rows", "kv_lora_rank")),
    _layer("self_attn.o_proj.weight", ("hidden", "q_rows")),
    _layer("self_attn.o_proj.bias", ("hidden",), O_BIAS),
)

# Tensors some checkpoints carry that are recomputed from the config, so skipping them loses nothing.
DERIVED_BUFFERS = {
    re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"):
        "RoPE inverse frequencies (older transformers saved the buffer); recomputed from rope_theta/rope_scaling",
}


# Why a family with per-head QK norms converts to nothing exact (RoRoPE needs W_k to reach RoPE linearly).
QK_NORM_REASON = "applies a per-head QK RMSNorm between W_k and RoPE, so RoRoPE is not exact there"


@dataclass(frozen=True)
class GGUFLayout:
    """How llama.cpp's ``convert_hf_to_gguf.py`` stores a family in a GGUF file."""

    architecture: str  # its ``general.architecture``
    # q/k rows (and biases) permuted per head for llama.cpp's interleaved RoPE (``LlamaModel.permute``);
    # Qwen2's converter writes the HF rows as they are, since llama.cpp runs Qwen2 with NeoX (rotate-half) RoPE
    permuted_qk: bool
    # several families share one ``general.architecture`` (llama.cpp writes Mistral as "llama"):
    # a family with this set is chosen when ``general.name`` contains it (case-insensitive)
    name_contains: str = ""
    refused: str = ""  # non-empty: the import refuses the architecture, for this reason


@dataclass(frozen=True)
class Family:
    """One architecture family: what its ``config.json`` may switch on."""

    model_type: str
    description: str
    always: frozenset = frozenset()  # parts every model of the family has
    flags: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # bool config flag → parts it switches on
    flag_defaults: Mapping[str, bool] = field(default_factory=dict)  # value of a flag the config omits
    aliases: tuple[str, ...] = ()  # other model_type spellings of the family
    hf_class: str = ""  # the transformers class an importer names in ``architectures``
    gguf: Optional[GGUFLayout] = None  # None: no GGUF import for this family

    def parts(self, config: Mapping[str, Any], where: str) -> frozenset:
        """The optional parts a ``config.json`` dict switches on (``LM_HEAD`` included); refuses
        flags the family does not support."""
        check_flags(config, self, where)
        parts = set(self.always)
        for flag, switched in self.flags.items():
            if bool(config.get(flag, self.flag_defaults.get(flag, False))):
                parts.update(switched)
        if not config.get("tie_word_embeddings", False):
            parts.add(LM_HEAD)
        return frozenset(parts)


_ATTENTION_BIAS = {"attention_bias": (QKV_BIAS, O_BIAS)}
FAMILIES = {
    "llama": Family("llama", "Llama 2/3 (attention_bias on q/k/v/o, mlp_bias on gate/up/down: both optional)",
                    flags={**_ATTENTION_BIAS, "mlp_bias": (MLP_BIAS,)}, hf_class="LlamaForCausalLM",
                    gguf=GGUFLayout("llama", permuted_qk=True)),
    "mistral": Family("mistral", "Mistral (Llama layout, no biases)", hf_class="MistralForCausalLM",
                      gguf=GGUFLayout("llama", permuted_qk=True, name_contains="mistral")),
    "qwen2": Family("qwen2", "Qwen2 / Qwen2.5 (q/k/v biases)", always=frozenset({QKV_BIAS}), hf_class="Qwen2ForCausalLM",
                    gguf=GGUFLayout("qwen2", permuted_qk=False)),
    "PanguEmbedded": Family("PanguEmbedded", "openPangu-Embedded (Llama layout, q/k/v/o biases unless "
                            "attention_bias is false)", flags=_ATTENTION_BIAS, flag_defaults={"attention_bias": True},
                            aliases=("pangu_embedded", "openpangu"), hf_class="PanguEmbeddedForCausalLM"),
    "qwen3": Family("qwen3", "Qwen3 dense (per-head QK RMSNorm; attention_bias optional; evaluable, not convertible)",
                    always=frozenset({QK_NORM}), flags=_ATTENTION_BIAS, hf_class="Qwen3ForCausalLM",
                    gguf=GGUFLayout("qwen3", permuted_qk=False, refused=QK_NORM_REASON)),
}
_BY_SPELLING = {spelling: family for family in FAMILIES.values() for spelling in (family.model_type, *family.aliases)}

# Flags that change the tensors or the math; a family not listing one must not see it switched on.
BOOLEAN_FLAGS = ("attention_bias", "mlp_bias")


def family(model_type: Any, where: str) -> Family:
    if model_type not in _BY_SPELLING:
        raise UserError(f"{where}: unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}")
    return _BY_SPELLING[model_type]


def gguf_family(architecture: Any, name: Any, where) -> Family:
    """The family of a GGUF file from its ``general.architecture`` and ``general.name``; refuses an
    architecture no family imports (or one whose family refuses it), naming the reason."""
    candidates = [fam for fam in FAMILIES.values() if fam.gguf is not None and fam.gguf.architecture == architecture]
    importable = sorted({fam.gguf.architecture for fam in FAMILIES.values() if fam.gguf and not fam.gguf.refused})
    if not candidates:
        raise UserError(f"{where}: unsupported GGUF architecture {architecture!r}; supported: {', '.join(importable)}")
    named = [fam for fam in candidates if fam.gguf.name_contains and fam.gguf.name_contains in str(name or "").lower()]
    chosen = named[0] if named else next(fam for fam in candidates if not fam.gguf.name_contains)
    if chosen.gguf.refused:
        raise UserError(f"{where}: GGUF architecture {architecture!r} ({chosen.description}) {chosen.gguf.refused}; "
                        f"import refused (supported: {', '.join(importable)})")
    return chosen


def check_flags(config: Mapping[str, Any], fam: Family, where: str) -> None:
    """Refuse a config switching on what this family (or our full-causal attention) lacks."""
    for flag in BOOLEAN_FLAGS:
        if flag in config and config[flag] is not None and not isinstance(config[flag], bool):
            raise UserError(f"{where}: flag {flag} must be true or false, got {config[flag]!r}")
        if config.get(flag) and flag not in fam.flags:
            supported = ", ".join(fam.flags) or "none"
            raise UserError(f"{where}: flag {flag}=true is not supported for model_type {fam.model_type} "
                            f"(its flags: {supported})")
    if config.get("use_sliding_window"):
        raise UserError(f"{where}: flag use_sliding_window=true is not supported (attention here is full causal)")
    kinds = set(config.get("layer_types") or ()) - {"full_attention"}
    if kinds:
        raise UserError(f"{where}: layer_types {sorted(kinds)} are not supported (only full_attention)")
    window = config.get("sliding_window")
    if fam.model_type == "mistral" and window is not None and window < config.get("max_position_embeddings", 0):
        raise UserError(f"{where}: flag sliding_window={window} (< max_position_embeddings "
                        f"{config.get('max_position_embeddings')}) is not supported (attention here is full causal)")


def enabled_parts(config) -> frozenset:
    """Parts of a ``ModelConfig``-like object."""
    flags = {QKV_BIAS: config.qkv_bias, O_BIAS: config.o_bias, MLP_BIAS: config.mlp_bias, QK_NORM: config.qk_norm,
             LM_HEAD: not config.tie_word_embeddings}
    parts = {part for part, on in flags.items() if on}
    if getattr(config, "mla", None) is not None and config.mla.latent_norm:
        parts.add(LATENT_NORM)
    return frozenset(parts)


def dimensions(config, layer: Optional[int] = None) -> dict[str, int]:
    """Dimension name → size for ``config`` (and one layer, whose kind and rank may differ)."""
    d, h, kv, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    dims = {"vocab": config.vocab_size, "hidden": d, "intermediate": config.intermediate_size, "head_dim": hd,
            "q_rows": h * hd, "kv_rows": kv * hd}
    if layer is not None and config.is_mla(layer):
        rank = int(config.mla.kv_lora_rank[layer])
        rope = config.mla_rope_width(layer)
        nope = 0 if config.mla.rope_all else hd
        dims.update({"kv_lora_rank": rank, "mla_q_rows": h * (nope + rope), "latent_rows": rank + rope,
                     "kv_b_rows": h * (nope + hd)})
    return dims


def layer_table(config, layer: int) -> tuple[TensorSpec, ...]:
    return MLA_LAYER_TENSORS if config.is_mla(layer) else GQA_LAYER_TENSORS


def weight_order(kind: str) -> tuple[str, ...]:
    """Local names in the argument order of the jitted ``gqa``/``mla`` layer functions."""
    return tuple(spec.local for spec in (MLA_LAYER_TENSORS if kind == "mla" else GQA_LAYER_TENSORS))


def _shapes(table: Iterable[TensorSpec], parts: frozenset, dims: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    return {spec.local: tuple(dims[d] for d in spec.shape) for spec in table if spec.part is None or spec.part in parts}


def global_shapes(config) -> dict[str, tuple[int, ...]]:
    return _shapes(GLOBAL_TENSORS, enabled_parts(config), dimensions(config))


def layer_shapes(config, layer: int) -> dict[str, tuple[int, ...]]:
    """Local tensor name → shape for one decoder layer."""
    return _shapes(layer_table(config, layer), enabled_parts(config), dimensions(config, layer))


def checkpoint_shapes(config) -> dict[str, tuple[int, ...]]:
    """Full tensor name → shape for the whole model, in checkpoint order (globals, then layers)."""
    shapes = global_shapes(config)
    for layer in range(config.num_hidden_layers):
        prefix = Template(LAYER_PREFIX).substitute(layer=layer)
        shapes.update({prefix + local: shape for local, shape in layer_shapes(config, layer).items()})
    return shapes


def part_of(name: str) -> Optional[str]:
    """The optional part a full tensor name belongs to (None: always present, or unknown)."""
    local = re.sub(r"^model\.layers\.\d+\.", LAYER_PREFIX, name)
    for spec in GLOBAL_TENSORS + GQA_LAYER_TENSORS + MLA_LAYER_TENSORS:
        if spec.template == local:
            return spec.part
    return None


def is_derived_buffer(name: str) -> bool:
    return any(pattern.match(name) for pattern in DERIVED_BUFFERS)


def check_tensors(shapes: Mapping[str, Iterable[int]], config, where) -> None:
    """Refuse a checkpoint whose tensors are not exactly what ``config`` describes: the first
    missing tensor, then the first one no spec entry consumes, then the first wrong shape."""
    expected = checkpoint_shapes(config)
    missing = [name for name in expected if name not in shapes]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"{where}: tensor {missing[0]} is missing (expected shape {list(expected[missing[0]])}){more}")
    unexpected = [name for name in shapes if name not in expected and not is_derived_buffer(name)]
    if unexpected:
        part = part_of(unexpected[0])
        hint = f" (part {part!r} is off in config.json)" if part else ""
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise UserError(f"{where}: tensor {unexpected[0]} is not consumed by the {config.model_type} spec for this "
                        f"config{hint}{more}")
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise UserError(f"{where}: tensor {name} has shape {list(shapes[name])}, expected {list(shape)}")
