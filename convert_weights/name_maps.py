"""Explicit per-family weight-name tables (HF checkpoint name → our canonical name).

Our canonical names are the HF Llama names, so loading is "by name, no hidden conversion".  The
tables still exist per family because families differ in *which* tensors exist (biases, QK-norm),
and because they document at a glance what a checkpoint must contain.  ``{i}`` is the layer index.
Each entry: canonical template → (checkpoint template, required).
"""
from __future__ import annotations

_LLAMA_LAYER = {
    "model.layers.{i}.input_layernorm.weight": ("model.layers.{i}.input_layernorm.weight", True),
    "model.layers.{i}.self_attn.q_proj.weight": ("model.layers.{i}.self_attn.q_proj.weight", True),
    "model.layers.{i}.self_attn.k_proj.weight": ("model.layers.{i}.self_attn.k_proj.weight", True),
    "model.layers.{i}.self_attn.v_proj.weight": ("model.layers.{i}.self_attn.v_proj.weight", True),
    "model.layers.{i}.self_attn.o_proj.weight": ("model.layers.{i}.self_attn.o_proj.weight", True),
    "model.layers.{i}.post_attention_layernorm.weight": ("model.layers.{i}.post_attention_layernorm.weight", True),
    "model.layers.{i}.mlp.gate_proj.weight": ("model.layers.{i}.mlp.gate_proj.weight", True),
    "model.layers.{i}.mlp.up_proj.weight": ("model.layers.{i}.mlp.up_proj.weight", True),
    "model.layers.{i}.mlp.down_proj.weight": ("model.layers.{i}.mlp.down_proj.weight", True),
}
_QKV_BIAS = {
    f"model.layers.{{i}}.self_attn.{p}_proj.bias": (f"model.layers.{{i}}.self_attn.{p}_proj.bias", True)
    for p in ("q", "k", "v")
}
_O_BIAS = {"model.layers.{i}.self_attn.o_proj.bias": ("model.layers.{i}.self_attn.o_proj.bias", True)}
_QK_NORM = {
    "model.layers.{i}.self_attn.q_norm.weight": ("model.layers.{i}.self_attn.q_norm.weight", True),
    "model.layers.{i}.self_attn.k_norm.weight": ("model.layers.{i}.self_attn.k_norm.weight", True),
}
_GLOBAL = {
    "model.embed_tokens.weight": ("model.embed_tokens.weight", True),
    "model.norm.weight": ("model.norm.weight", True),
}
_LM_HEAD = {"lm_head.weight": ("lm_head.weight", True)}

# model_type → (global table, per-layer table). Biases depend on config flags: see ``layer_map``.
FAMILIES = {
    "llama": "Llama 2/3 (attention_bias optional on q/k/v/o)",
    "mistral": "Mistral (Llama layout)",
    "qwen2": "Qwen2 / Qwen2.5 (q/k/v biases)",
    "PanguEmbedded": "openPangu-Embedded (Llama layout, attention_bias on q/k/v/o)",
    "qwen3": "Qwen3 dense (per-head QK RMSNorm; evaluable, not convertible)",
}


def global_map(tie_word_embeddings: bool) -> dict[str, tuple[str, bool]]:
    table = dict(_GLOBAL)
    if not tie_word_embeddings:
        table.update(_LM_HEAD)
    return table


def layer_map(model_type: str, qkv_bias: bool, o_bias: bool, qk_norm: bool) -> dict[str, tuple[str, bool]]:
    """Per-layer name table for a GQA layer of this family (templates with ``{i}``)."""
    table = dict(_LLAMA_LAYER)
    if qkv_bias:
        table.update(_QKV_BIAS)
    if o_bias:
        table.update(_O_BIAS)
    if qk_norm:
        table.update(_QK_NORM)
    return table


# The MLA layer of a converted model uses DeepSeek-V2/V3 attention names.
MLA_ATTENTION = {
    "q_proj": "model.layers.{i}.self_attn.q_proj",
    "kv_a_proj_with_mqa": "model.layers.{i}.self_attn.kv_a_proj_with_mqa",
    "kv_a_layernorm": "model.layers.{i}.self_attn.kv_a_layernorm",
    "kv_b_proj": "model.layers.{i}.self_attn.kv_b_proj",
    "o_proj": "model.layers.{i}.self_attn.o_proj",
}
