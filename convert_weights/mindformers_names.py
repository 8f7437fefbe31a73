"""Hugging Face DeepSeek-V3 names → MindFormers (mcore, Megatron-style) DeepSeek-V3 names.

The target is the checkpoint ``TrainingDeepseekV3ForCausalLM`` (MindFormers 2.1.0, GRAPH training
path, ``use_legacy: False``) loads.  Its MLA comes in two classes
(``mindformers/parallel_core/training_graph/base_models/gpt/gpt_layer_specs.py``, switched by
``mla_qkv_concat``), and the export uses both:

* **split** (``mla_qkv_concat: False``; models without attention biases) — ``MLASelfAttention``:
  ``linear_q_proj`` / ``linear_kv_down_proj`` / ``kv_layernorm`` / ``linear_kv_up_proj`` /
  ``linear_proj``, every one built with ``bias=False`` (``multi_latent_attention.py``), the query
  projection split over the tensor-parallel ranks (``ColumnParallelLinear``).  These are the names
  MindFormers' own ``toolkit/weight_convert/deepseekv3/convert_deepseekv3_hf_weight.py`` writes
  (attention tensors copied unchanged, so the RoPE rows stay in DeepSeek's interleaved order);
  ``linear_q_proj`` (no ``q_lora_rank``) comes from the module, the converter only handles 1536.
* **concatenated** (``mla_qkv_concat: True``; models with q/k/v or o biases) —
  ``MLASelfAttentionConcatenated``: ``linear_qkv`` = rows of ``q_proj`` then
  ``kv_a_proj_with_mqa`` (split back as [q, latent, RoPE key] in ``get_query_key_value_tensors``),
  ``k_layernorm``, ``linear_kvb`` (= ``kv_b_proj``) and ``linear_proj``.  With ``add_qkv_bias``
  (the config's ``attention_bias`` maps to it) ``linear_qkv`` and ``linear_kvb`` carry biases:
  the query and latent biases go into ``linear_qkv.bias`` exactly.  ``linear_proj``'s bias
  (``add_bias_linear``) is *never applied* by MindFormers' MLA — it is built with
  ``skip_bias_add=True`` and the attention keeps only ``self.linear_proj(attn_out)[0]`` — so an
  ``o_proj`` bias goes into the value part of ``linear_kvb.bias`` instead: every softmax row sums
  to one, so a value bias ``b_v`` adds ``W_o b_v`` to the output, and ``b_v`` solves
  ``W_o b_v = b_o`` (least norm; refused when ``b_o`` is not in the range of ``W_o``).  The cost:
  ``linear_qkv`` is a ``SequenceParallelLinear`` (not split over tensor-parallel ranks).

Both layouts: the dense MLP's ``linear_fc1`` is gate and up *interleaved row by row* (row 2i =
gate_i, row 2i+1 = up_i: ``concat_linear_fc1`` of MindFormers' converter, undone by its reverse
script with ``idx[::2], idx[1::2]``), which 2.1.0's ``MLPInterleaved`` reads by reshaping the
output to (…, ffn, 2) (``use_interleaved_weight_layout_mlp: True``, set by the YAML).

Verified against MindFormers 2.1.0 itself (``bench/mindformers_check.py``,
``tests/test_train_mindformers.py``): its trainer builds the model from the exported YAML with
exactly these names and shapes, and its loader reads every value equal to the file.  Its
forward does not run on CPU (fused ``RmsNorm``, ``FlashAttention``), so the roles above are checked
by transformers' DeepSeek-V3 running the MindFormers tensors with MindFormers' bias semantics
(tests/test_train_mindformers.py).  MindFormers' *inference* path instead reads the Hugging Face
directory itself (``weight_mapping`` in ``mindformers/models/deepseek3/utils.py``), which has no
rule for ``self_attn.q_proj`` (no ``q_lora_rank``): hence these mcore names.

``{i}`` is the decoder layer index.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

import numpy as np

from mindyouzhi.errors import UserError

GLOBAL_NAMES = {
    "model.embed_tokens.weight": "embedding.word_embeddings.weight",
    "model.norm.weight": "decoder.final_layernorm.weight",
    "lm_head.weight": "output_layer.weight",
}

_COMMON_LAYER_NAMES = {
    "model.layers.{i}.input_layernorm.weight": "decoder.layers.{i}.input_layernorm.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "decoder.layers.{i}.self_attention.linear_proj.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "decoder.layers.{i}.pre_mlp_layernorm.weight",
    "model.layers.{i}.mlp.down_proj.weight": "decoder.layers.{i}.mlp.linear_fc2.weight",
}

# Split layout (mla_qkv_concat: False): one Hugging Face tensor → one MindFormers tensor.
LAYER_NAMES = {
    **_COMMON_LAYER_NAMES,
    "model.layers.{i}.self_attn.q_proj.weight": "decoder.layers.{i}.self_attention.linear_q_proj.weight",
    "model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight":
        "decoder.layers.{i}.self_attention.linear_kv_down_proj.weight",
    "model.layers.{i}.self_attn.kv_a_layernorm.weight": "decoder.layers.{i}.self_attention.kv_layernorm.weight",
    "model.layers.{i}.self_attn.kv_b_proj.weight": "decoder.layers.{i}.self_attention.linear_kv_up_proj.weight",
}

# Concatenated layout (mla_qkv_concat: True, attention_bias: True).
CONCAT_LAYER_NAMES = {
    **_COMMON_LAYER_NAMES,
    "model.layers.{i}.self_attn.kv_a_layernorm.weight": "decoder.layers.{i}.self_attention.k_layernorm.weight",
    "model.layers.{i}.self_attn.kv_b_proj.weight": "decoder.layers.{i}.self_attention.linear_kvb.weight",
}

# Target → its Hugging Face sources, in packing order (both layouts).
FUSED_LAYER_NAMES = {
    "decoder.layers.{i}.mlp.linear_fc1.weight": ("model.layers.{i}.mlp.gate_proj.weight",
                                                  "model.layers.{i}.mlp.up_proj.weight"),
}

CONCAT_FUSED_LAYER_NAMES = {
    **FUSED_LAYER_NAMES,
    "decoder.layers.{i}.self_attention.linear_qkv.weight": ("model.layers.{i}.self_attn.q_proj.weight",
                                                             "model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight"),
    "decoder.layers.{i}.self_attention.linear_qkv.bias": ("model.layers.{i}.self_attn.q_proj.bias",
                                                           "model.layers.{i}.self_attn.kv_a_proj_with_mqa.bias"),
    "decoder.layers.{i}.self_attention.linear_kvb.bias": ("model.layers.{i}.self_attn.o_proj.weight",
                                                           "model.layers.{i}.self_attn.o_proj.bias"),
}

# Largest relative residual ‖W_o b_v − b_o‖ / ‖b_o‖ accepted for the value bias (fp32 rounding is ~1e-7).
VALUE_BIAS_RTOL = 1e-5

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Layout:
    """Which of MindFormers' two MLA classes the export targets (module docstring)."""

    qkv_concat: bool = False
    num_heads: int = 0  # the concatenated layout's linear_kvb.bias is per head: [k_nope zeros, value bias]
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0

    @property
    def layer_names(self) -> Mapping[str, str]:
        return CONCAT_LAYER_NAMES if self.qkv_concat else LAYER_NAMES

    @property
    def fused_layer_names(self) -> Mapping[str, tuple[str, ...]]:
        return CONCAT_FUSED_LAYER_NAMES if self.qkv_concat else FUSED_LAYER_NAMES


SPLIT = Layout()


def pack_linear_fc1(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """[ffn, D] gate and up → [2·ffn, D] with rows gate_0, up_0, gate_1, up_1, …"""
    if gate.shape != up.shape:
        raise ValueError(f"gate {gate.shape} and up {up.shape} must have the same shape")
    return np.stack([gate, up], axis=1).reshape(2 * gate.shape[0], *gate.shape[1:])


def unpack_linear_fc1(fc1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`pack_linear_fc1`."""
    return fc1[0::2], fc1[1::2]


def value_bias(o_weight: np.ndarray, o_bias: np.ndarray, layout: Layout, name: str) -> np.ndarray:
    """``linear_kvb.bias`` [heads·(nope + v)] whose value part reproduces ``o_proj``'s bias ``name``
    (module docstring): zero key part, ``b_v`` with ``W_o b_v = b_o`` (least norm) per head."""
    heads, nope, v = layout.num_heads, layout.qk_nope_head_dim, layout.v_head_dim
    bias = np.zeros((heads, nope + v), np.float32)
    target = np.asarray(o_bias, np.float64)
    if np.any(target):
        weight = np.asarray(o_weight, np.float64)  # [hidden, heads·v]
        try:  # least norm through the hidden × hidden normal equations (O(hidden³), not an SVD)
            solution = (weight.T @ np.linalg.solve(weight @ weight.T, target)).astype(np.float32)
        except np.linalg.LinAlgError:
            solution = None
        error = np.inf if solution is None else (np.linalg.norm(weight @ solution.astype(np.float64) - target)
                                                 / np.linalg.norm(target))
        if not error <= VALUE_BIAS_RTOL:
            raise UserError(f"{name}: MindFormers' MLA drops linear_proj's bias, and this bias is not W_o times a "
                            f"value bias (relative residual {error:.1e} > {VALUE_BIAS_RTOL:g}: o_proj.weight is "
                            f"rank-deficient); export with --format deepseek-v3 instead")
        bias[:, nope:] = solution.reshape(heads, v)
    return bias.reshape(-1)


def mindformers_names(num_layers: int, layout: Layout = SPLIT) -> set[str]:
    """Every tensor name of a dense MindFormers DeepSeek-V3 export with ``num_layers`` layers."""
    names = set(GLOBAL_NAMES.values())
    for layer in range(num_layers):
        names.update(t.format(i=layer) for t in layout.layer_names.values())
        names.update(t.format(i=layer) for t in layout.fused_layer_names)
    return names


def mindformers_shapes(shapes: Mapping[str, tuple[int, ...]], layout: Layout = SPLIT) -> dict[str, tuple[int, ...]]:
    """The shapes ``to_mindformers`` gives a stream with these DeepSeek-V3 shapes, in stream order."""
    return {name: array.shape
            for name, array in to_mindformers(((name, _ShapeOnly(shape)) for name, shape in shapes.items()), layout)}


class _ShapeOnly:
    """Stands in for an array when only the renaming and the fused shapes are wanted."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)


def _pack(target: str, parts: list, sources: list[str], layout: Layout):
    """The fused tensor ``target`` from its parts (named ``sources``, in FUSED order); shapes for
    ``_ShapeOnly`` parts."""
    shape_only = isinstance(parts[0], _ShapeOnly)
    if target.endswith("linear_kvb.bias"):
        rows = layout.num_heads * (layout.qk_nope_head_dim + layout.v_head_dim)
        return _ShapeOnly((rows,)) if shape_only else value_bias(*parts, layout, sources[-1])
    if shape_only:  # linear_fc1 and linear_qkv stack their parts' rows
        return _ShapeOnly((sum(p.shape[0] for p in parts), *parts[0].shape[1:]))
    if target.endswith("linear_fc1.weight"):
        return pack_linear_fc1(*parts)
    return np.concatenate(parts, axis=0)


def to_mindformers(tensors: Iterable[tuple[str, np.ndarray]], layout: Layout = SPLIT) -> Iterator[tuple[str, np.ndarray]]:
    """Rename a stream of DeepSeek-V3 tensors; fused targets are emitted once all parts arrived.

    Only the parts of fused tensors are held back (one layer's attention and MLP parts at most).
    A source may feed a renamed tensor and a fused one (``o_proj.weight``), or only fused ones
    (``q_proj.bias``, ``o_proj.bias``)."""
    renames, fused = layout.layer_names, layout.fused_layer_names
    consumers: dict[str, list[str]] = {}
    for target, parts in fused.items():
        for part in parts:
            consumers.setdefault(part, []).append(target)
    pending: dict[str, dict[str, np.ndarray]] = {}
    for name, array in tensors:
        if name in GLOBAL_NAMES:
            yield GLOBAL_NAMES[name], array
            continue
        match = _LAYER.match(name)
        template = f"model.layers.{{i}}.{match.group(2)}" if match else None
        if template not in renames and template not in consumers:
            raise ValueError(f"tensor {name} has no MindFormers name in convert_weights/mindformers_names.py")
        if template in renames:
            yield renames[template].format(i=match.group(1)), array
        for target_template in consumers.get(template, ()):
            target = target_template.format(i=match.group(1))
            parts = pending.setdefault(target, {})
            parts[template] = array
            wanted = fused[target_template]
            if all(part in parts for part in wanted):
                del pending[target]
                sources = [part.format(i=match.group(1)) for part in wanted]
                yield target, _pack(target, [parts[part] for part in wanted], sources, layout)
    if pending:
        raise ValueError(f"incomplete fused tensors: {sorted(pending)}")
