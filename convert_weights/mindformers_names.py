"""Hugging Face DeepSeek-V3 names → MindFormers (mcore, Megatron-style) DeepSeek-V3 names.

The target is the checkpoint MindFormers' own ``toolkit/weight_convert/deepseekv3/
convert_deepseekv3_hf_weight.py`` writes and ``TrainingDeepseekV3ForCausalLM`` loads (MLA built
without qkv concatenation, ``mla_qkv_concat: False``).  Sources read (mindspore-lab/mindformers):

* ``toolkit/weight_convert/deepseekv3/convert_deepseekv3_hf_weight.py`` and
  ``reverse_mcore_deepseekv3_weight_to_hf.py`` — the names below, and that attention tensors are
  copied unchanged (no RoPE-row or k/v regrouping), so the RoPE rows stay in DeepSeek's
  interleaved order;
* ``concat_linear_fc1`` there — the dense MLP's ``linear_fc1`` is gate and up *interleaved row by
  row* ("discrete arrangement": row 2i = gate_i, row 2i+1 = up_i), which the reverse script
  undoes with ``idx[::2], idx[1::2]``;
* ``mindformers/parallel_core/training_graph/transformer/multi_latent_attention.py`` —
  ``MLASelfAttention`` names its query projection ``linear_q_proj`` when ``q_lora_rank`` is None
  (the converter only handles DeepSeek-V3's ``q_lora_rank=1536``, so this one name comes from the
  module, not from a converter), and builds q / kv-down / kv-up without bias.

Verified against MindFormers 2.1.0 itself (``bench/mindformers_check.py``,
``tests/test_train_mindformers.py``): its trainer builds ``TrainingDeepseekV3ForCausalLM`` from the
YAML ``export --format mindformers --recipe`` writes (``multi_latent_attention``, ``mla_qkv_concat:
False``, ``qk_layernorm: True``, no routed experts), and that model's parameter names and shapes
are exactly these, with ``linear_fc1`` [2·ffn, D]; MindFormers' own loader reads the export and
every loaded value equals the file.  Its training MLP is ``MLPInterleaved`` (2.1.0's default
``use_interleaved_weight_layout_mlp: True``, which the YAML sets explicitly): it reshapes
``linear_fc1``'s output to (…, ffn, 2) and takes the even rows as gate, the odd ones as up — the
layout written here (read in its source; its forward does not run on CPU because of the fused
``RmsNorm``, so neither this nor the RoPE pairing of its training graph is checked by a forward).  MindFormers' *inference* path instead reads the Hugging Face directory itself
(``weight_mapping`` in ``mindformers/models/deepseek3/utils.py``); that mapping has no rule for
``self_attn.q_proj`` (no ``q_lora_rank``), which is why this module writes mcore names.

``{i}`` is the decoder layer index.
"""
from __future__ import annotations

import re
from typing import Iterable, Iterator, Mapping

import numpy as np

GLOBAL_NAMES = {
    "model.embed_tokens.weight": "embedding.word_embeddings.weight",
    "model.norm.weight": "decoder.final_layernorm.weight",
    "lm_head.weight": "output_layer.weight",
}

LAYER_NAMES = {
    "model.layers.{i}.input_layernorm.weight": "decoder.layers.{i}.input_layernorm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "decoder.layers.{i}.self_attention.linear_q_proj.weight",
    "model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight":
        "decoder.layers.{i}.self_attention.linear_kv_down_proj.weight",
    "model.layers.{i}.self_attn.kv_a_layernorm.weight": "decoder.layers.{i}.self_attention.kv_layernorm.weight",
    "model.layers.{i}.self_attn.kv_b_proj.weight": "decoder.layers.{i}.self_attention.linear_kv_up_proj.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "decoder.layers.{i}.self_attention.linear_proj.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "decoder.layers.{i}.pre_mlp_layernorm.weight",
    "model.layers.{i}.mlp.down_proj.weight": "decoder.layers.{i}.mlp.linear_fc2.weight",
}

# Target → its Hugging Face sources, in packing order.
FUSED_LAYER_NAMES = {
    "decoder.layers.{i}.mlp.linear_fc1.weight": ("model.layers.{i}.mlp.gate_proj.weight",
                                                  "model.layers.{i}.mlp.up_proj.weight"),
}

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def pack_linear_fc1(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """[ffn, D] gate and up → [2·ffn, D] with rows gate_0, up_0, gate_1, up_1, …"""
    if gate.shape != up.shape:
        raise ValueError(f"gate {gate.shape} and up {up.shape} must have the same shape")
    return np.stack([gate, up], axis=1).reshape(2 * gate.shape[0], *gate.shape[1:])


def unpack_linear_fc1(fc1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`pack_linear_fc1`."""
    return fc1[0::2], fc1[1::2]


def mindformers_names(num_layers: int) -> set[str]:
    """Every tensor name of a dense MindFormers DeepSeek-V3 export with ``num_layers`` layers."""
    names = set(GLOBAL_NAMES.values())
    for layer in range(num_layers):
        names.update(t.format(i=layer) for t in LAYER_NAMES.values())
        names.update(t.format(i=layer) for t in FUSED_LAYER_NAMES)
    return names


def mindformers_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The shapes ``to_mindformers`` gives a stream with these DeepSeek-V3 shapes (fused rows stack)."""
    renamed: dict[str, tuple[int, ...]] = {}
    for name, array in to_mindformers((name, _ShapeOnly(shape)) for name, shape in shapes.items()):
        renamed[name] = array.shape
    return renamed


class _ShapeOnly:
    """Stands in for an array when only the renaming and the fused shapes are wanted."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)


def to_mindformers(tensors: Iterable[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
    """Rename a stream of DeepSeek-V3 tensors; fused targets are emitted once all parts arrived.

    Only the parts of one fused tensor are held back (one MLP's gate until its up arrives)."""
    sources = {src: target for target, parts in FUSED_LAYER_NAMES.items() for src in parts}
    pending: dict[str, dict[str, np.ndarray]] = {}
    for name, array in tensors:
        if name in GLOBAL_NAMES:
            yield GLOBAL_NAMES[name], array
            continue
        match = _LAYER.match(name)
        template = f"model.layers.{{i}}.{match.group(2)}" if match else None
        if template in LAYER_NAMES:
            yield LAYER_NAMES[template].format(i=match.group(1)), array
        elif template in sources:
            target = sources[template].format(i=match.group(1))
            parts = pending.setdefault(target, {})
            parts[template] = array
            wanted = FUSED_LAYER_NAMES[sources[template]]
            if all(part in parts for part in wanted):
                del pending[target]
                fused = [parts[part] for part in wanted]
                if isinstance(fused[0], _ShapeOnly):
                    yield target, _ShapeOnly((sum(p.shape[0] for p in fused), *fused[0].shape[1:]))
                else:
                    yield target, pack_linear_fc1(*fused)
        else:
            raise ValueError(f"tensor {name} has no MindFormers name in convert_weights/mindformers_names.py")
    if pending:
        raise ValueError(f"incomplete fused tensors: {sorted(pending)}")
