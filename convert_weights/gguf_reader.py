"""Import a GGUF checkpoint (llama.cpp's format) as a Hugging Face model directory.

The family comes from ``general.architecture`` through the architecture spec
(:func:`architectures.gguf_family`): ``llama`` (Llama 2/3, SmolLM2; ``mistral`` when
``general.name`` says so, as llama.cpp writes Mistral models with the llama architecture) and
``qwen2`` (Qwen2 / Qwen2.5, q/k/v biases); ``qwen3`` is refused (per-head QK norms).  What the
conversion has to undo or rebuild:

* quantization — every tensor is dequantized to fp32 with ``gguf.quants.dequantize`` (all the
  types the installed ``gguf`` package implements, see :func:`supported_tensor_types`);
* names — :data:`WEIGHT_MAP`, an explicit GGUF → HF table;
* the RoPE row order — llama.cpp's converter permutes q/k rows (and biases) of Llama-architecture
  models so that RoPE rotates adjacent pairs (2i, 2i+1); HF rotates halves (i, i + head_dim/2).
  :func:`hf_layout.interleaved_to_rotate_half` puts the rows back, per head.  Qwen2 files keep the
  HF rows (llama.cpp runs Qwen2 with rotate-half RoPE): the family's ``GGUFLayout.permuted_qk``;
* the config — from the ``{arch}.*`` metadata (:data:`CONFIG_MAP`) and the tensor shapes
  (tied embeddings when ``output.weight`` is absent);
* the tokenizer — see :mod:`gguf_tokenizer`.

Tensors are dequantized lazily, one at a time, while the writer streams them to safetensors.
"""
from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from mindyouzhi.errors import UserError
from mindyouzhi.io_utils import check_output_dir

from .gguf_tokenizer import build_tokenizer_files
from . import architectures
from .hf_layout import LazyTensors, check_tensors, import_summary, interleaved_to_rotate_half, parameter_shapes, write_hf_model_dir

# GGUF tensor name -> HF Llama parameter name; "{}" is the layer index.
WEIGHT_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.attn_q.bias": "model.layers.{}.self_attn.q_proj.bias",
    "blk.{}.attn_k.bias": "model.layers.{}.self_attn.k_proj.bias",
    "blk.{}.attn_v.bias": "model.layers.{}.self_attn.v_proj.bias",
    "blk.{}.attn_output.bias": "model.layers.{}.self_attn.o_proj.bias",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
    "blk.{}.ffn_gate.bias": "model.layers.{}.mlp.gate_proj.bias",
    "blk.{}.ffn_up.bias": "model.layers.{}.mlp.up_proj.bias",
    "blk.{}.ffn_down.bias": "model.layers.{}.mlp.down_proj.bias",
}

# Rows llama.cpp permutes for interleaved RoPE (``GGUFLayout.permuted_qk`` families), and the
# config key giving the head count.
PERMUTED_ROWS = {
    "blk.{}.attn_q.weight": "num_attention_heads",
    "blk.{}.attn_q.bias": "num_attention_heads",
    "blk.{}.attn_k.weight": "num_key_value_heads",
    "blk.{}.attn_k.bias": "num_key_value_heads",
}

# Llama 3.1+ files store their RoPE frequency scaling as this tensor, not as metadata.
ROPE_FREQS_TENSOR = "rope_freqs.weight"

# "{arch}.<key>" metadata -> HF config key; None = required, else the llama.cpp default.
CONFIG_MAP: dict[str, tuple[str, Any]] = {
    "block_count": ("num_hidden_layers", None),
    "embedding_length": ("hidden_size", None),
    "feed_forward_length": ("intermediate_size", None),
    "attention.head_count": ("num_attention_heads", None),
    "attention.layer_norm_rms_epsilon": ("rms_norm_eps", None),
    "context_length": ("max_position_embeddings", None),
    "rope.freq_base": ("rope_theta", 10000.0),
}

_LAYER_INDEX = re.compile(r"^blk\.(\d+)\.")


def supported_tensor_types() -> tuple[str, ...]:
    return tuple(sorted(_supported_tensor_types()))


@functools.lru_cache(maxsize=None)
def _supported_tensor_types() -> frozenset[str]:
    """Every GGML type ``gguf.quants.dequantize`` implements, found by dequantizing one block."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    supported = set()
    for qtype in GGMLQuantizationType:
        try:
            dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8), qtype)
        except NotImplementedError:
            continue
        supported.add(qtype.name)
    return frozenset(supported)


def map_tensor_name(gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor, via :data:`WEIGHT_MAP` (None if it has no entry)."""
    match = _LAYER_INDEX.match(gguf_name)
    if match is None:
        return WEIGHT_MAP.get(gguf_name)
    template = WEIGHT_MAP.get("blk.{}." + gguf_name[match.end():])
    return None if template is None else template.format(match.group(1))


@dataclass
class GGUFModel:
    path: Path
    architecture: str
    config: dict
    tensors: LazyTensors
    tokenizer_files: dict[str, str]


def read_gguf(path: str | os.PathLike) -> GGUFModel:
    """Parse ``path`` into an HF config, lazy fp32 tensors and tokenizer files."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: GGUF file not found")
    import gguf

    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as exc:  # gguf raises ValueError/struct.error/... on anything malformed
        raise UserError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    metadata = {name: field.contents() for name, field in reader.fields.items()}

    arch = metadata.get("general.architecture")
    family = architectures.gguf_family(arch, metadata.get("general.name"), path)
    if metadata.get(f"{arch}.expert_count"):
        raise UserError(f"{path}: mixture-of-experts {arch} models ({arch}.expert_count) are not supported")

    by_name = {tensor.name: tensor for tensor in reader.tensors}
    supported = _supported_tensor_types()
    for tensor in reader.tensors:
        if tensor.tensor_type.name not in supported:
            raise UserError(
                f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which the installed gguf package "
                f"cannot dequantize; supported: {', '.join(sorted(supported))}"
            )

    config = _hf_config(metadata, arch, family, by_name, path)
    tensors = _lazy_tensors(by_name, config, family.gguf.permuted_qk, path)
    check_tensors(tensors.shapes, config, path)
    tokenizer_files = build_tokenizer_files(metadata, path, model_max_length=config["max_position_embeddings"])
    return GGUFModel(path, arch, config, tensors, tokenizer_files)


def import_gguf(path: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> dict:
    """``mindyouzhi import --gguf``: write the HF model dir ``out``; return the summary dict."""
    check_output_dir(out, overwrite)  # refuse before spending time on the read
    model = read_gguf(path)
    written = write_hf_model_dir(out, model.config, model.tensors, model.tokenizer_files, overwrite=overwrite)
    return import_summary(written, model.config, "gguf", path)


# --------------------------------------------------------------------------------------------


def _logical_shape(tensor) -> tuple[int, ...]:
    # GGUF lists dimensions fastest-first (ne0 = columns); numpy wants them slowest-first.
    return tuple(int(dim) for dim in reversed(tensor.shape.tolist()))


def _dequantized(tensor) -> np.ndarray:
    from gguf.quants import dequantize

    array = dequantize(tensor.data, tensor.tensor_type)
    return np.ascontiguousarray(array, dtype=np.float32).reshape(_logical_shape(tensor))


def _float32_value(value: float) -> float:
    # Metadata floats are float32: write the shortest decimal that round-trips (1e-05, not
    # 9.999999747378752e-06), which is what the original config said.
    return float(str(np.float32(value)))


def _hf_config(metadata: Mapping[str, Any], arch: str, family: architectures.Family, by_name: Mapping[str, Any],
               path: Path) -> dict:
    hparams: dict[str, Any] = {}
    for key, (hf_key, default) in CONFIG_MAP.items():
        value = metadata.get(f"{arch}.{key}", default)
        if value is None:
            raise UserError(f"{path}: GGUF metadata {arch}.{key} is missing")
        hparams[hf_key] = value
    heads = int(hparams["num_attention_heads"])
    kv_heads = metadata.get(f"{arch}.attention.head_count_kv", heads)
    if not isinstance(kv_heads, int):
        raise UserError(f"{path}: per-layer {arch}.attention.head_count_kv is not supported (found {kv_heads!r})")
    hidden = int(hparams["hidden_size"])
    head_dim = int(metadata.get(f"{arch}.attention.key_length", hidden // heads))
    value_dim = int(metadata.get(f"{arch}.attention.value_length", head_dim))
    rope_dim = int(metadata.get(f"{arch}.rope.dimension_count", head_dim))
    if value_dim != head_dim:
        raise UserError(f"{path}: key length {head_dim} differs from value length {value_dim}; "
                        f"{family.model_type} needs them equal")
    if rope_dim != head_dim:
        raise UserError(f"{path}: RoPE over {rope_dim} of {head_dim} head dimensions (partial rotary) is not supported")
    if "token_embd.weight" not in by_name:
        raise UserError(f"{path}: tensor token_embd.weight is missing")

    config: dict[str, Any] = {
        "architectures": [family.hf_class],
        "model_type": family.model_type,
        "vocab_size": _logical_shape(by_name["token_embd.weight"])[0],
        "hidden_size": hidden,
        "intermediate_size": int(hparams["intermediate_size"]),
        "num_hidden_layers": int(hparams["num_hidden_layers"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(hparams["max_position_embeddings"]),
        "rms_norm_eps": _float32_value(hparams["rms_norm_eps"]),
        "rope_theta": _float32_value(hparams["rope_theta"]),
        # llama.cpp writes output.weight only when it differs from the embedding.
        "tie_word_embeddings": "output.weight" not in by_name,
        "torch_dtype": "float32",
    }
    # HF's bias flags cover all four attention / all three MLP projections at once.  A family
    # without the flag (Qwen2: q/k/v biases always, never o/MLP ones) gets none: its spec then
    # refuses any bias tensor it has no place for.
    bias_flags = {"attention_bias": ("attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias"),
                  "mlp_bias": ("ffn_gate.bias", "ffn_up.bias", "ffn_down.bias")}
    for flag, suffixes in bias_flags.items():
        if flag in family.flags:
            config[flag] = any(name.endswith(suffixes) for name in by_name)
    if family.model_type == "mistral":
        config["sliding_window"] = None  # llama.cpp runs a llama-architecture file with full causal attention
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "padding_token_id")):
        value = metadata.get(f"tokenizer.ggml.{gguf_key}")
        if value is not None:
            config[hf_key] = int(value)
    rope_scaling = _rope_scaling(metadata, arch, by_name, config, path)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _rope_scaling(metadata: Mapping[str, Any], arch: str, by_name: Mapping[str, Any], config: Mapping, path: Path) -> dict | None:
    kind = metadata.get(f"{arch}.rope.scaling.type", "none")
    factor = metadata.get(f"{arch}.rope.scaling.factor")
    original = metadata.get(f"{arch}.rope.scaling.original_context_length")
    if ROPE_FREQS_TENSOR in by_name:
        if kind not in ("none", "llama3"):
            raise UserError(f"{path}: both {ROPE_FREQS_TENSOR} and rope.scaling.type {kind!r}; cannot tell which applies")
        return _llama3_rope_scaling(_dequantized(by_name[ROPE_FREQS_TENSOR]), config, original, path)
    if kind == "none":
        return None
    unsupported_yarn = [key for key in metadata if key.startswith(f"{arch}.rope.scaling.yarn_") or key == f"{arch}.rope.scaling.attn_factor"]
    if kind == "linear" and factor:
        return {"rope_type": "linear", "factor": _float32_value(factor)}
    if kind == "yarn" and factor and original and not unsupported_yarn:
        return {"rope_type": "yarn", "factor": _float32_value(factor), "original_max_position_embeddings": int(original)}
    raise UserError(
        f"{path}: unsupported RoPE scaling {kind!r} (factor {factor}, original context {original}"
        f"{', with ' + ', '.join(unsupported_yarn) if unsupported_yarn else ''}); supported: linear, yarn with "
        f"factor and original context only, and Llama-3 {ROPE_FREQS_TENSOR}"
    )


def llama3_rope_factors(theta: float, head_dim: int, factor: float, low_freq_factor: float,
                        high_freq_factor: float, original_max_position_embeddings: int) -> np.ndarray:
    """The per-frequency divisors llama.cpp's converter stores in rope_freqs.weight for Llama 3."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    medium = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < high_freq_wavelen, 1.0, np.where(wavelen > low_freq_wavelen, factor, medium))


def _llama3_rope_scaling(factors: np.ndarray, config: Mapping, original, path: Path) -> dict | None:
    """Recover HF's ``rope_type: llama3`` parameters from the stored factors.

    The file keeps only the resulting factors; every Llama 3.x release uses low/high frequency
    factors 1 and 4 over an original context of 8192, so we take those, the largest factor as
    ``factor``, and verify the result reproduces every stored value."""
    factors = factors.reshape(-1).astype(np.float64)
    if factors.shape != (config["head_dim"] // 2,):
        raise UserError(f"{path}: {ROPE_FREQS_TENSOR} has {factors.size} values, expected head_dim/2 = {config['head_dim'] // 2}")
    if np.all(factors == 1.0):
        return None
    scaling = {
        "rope_type": "llama3",
        "factor": _float32_value(factors.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": int(original or 8192),
    }
    expected = llama3_rope_factors(config["rope_theta"], config["head_dim"], **{k: v for k, v in scaling.items() if k != "rope_type"})
    if not np.allclose(expected, factors, rtol=1e-4, atol=0):
        raise UserError(
            f"{path}: {ROPE_FREQS_TENSOR} does not match Llama-3 RoPE scaling (factor {scaling['factor']}, "
            f"low/high frequency factors 1/4, original context {scaling['original_max_position_embeddings']})"
        )
    return scaling


def _lazy_tensors(by_name: Mapping[str, Any], config: Mapping, permuted_qk: bool, path: Path) -> LazyTensors:
    loaders: dict[str, Callable[[], np.ndarray]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    layers = config["num_hidden_layers"]
    for name, tensor in by_name.items():
        if name == ROPE_FREQS_TENSOR:
            continue  # consumed into config["rope_scaling"]
        hf_name = map_tensor_name(name)
        if hf_name is None:
            raise UserError(
                f"{path}: tensor {name} has no Hugging Face {config['model_type']} equivalent; "
                f"supported names: {', '.join(WEIGHT_MAP)}"
            )
        match = _LAYER_INDEX.match(name)
        if match is not None and int(match.group(1)) >= layers:
            raise UserError(f"{path}: tensor {name} is beyond the {layers} layers the metadata's block_count declares")
        template = name if match is None else "blk.{}." + name[match.end():]
        heads_key = PERMUTED_ROWS.get(template) if permuted_qk else None
        loaders[hf_name] = functools.partial(_load, tensor, config[heads_key] if heads_key else None)
        shapes[hf_name] = _logical_shape(tensor)

    # HF has one bias flag per block (Qwen2: q/k/v always): a file with only some biases gets zeros
    # for the others, which computes exactly what llama.cpp computes without them.
    biases = (architectures.QKV_BIAS, architectures.O_BIAS, architectures.MLP_BIAS)
    for name, shape in parameter_shapes(config, path).items():
        if name not in loaders and architectures.part_of(name) in biases:
            loaders[name] = functools.partial(np.zeros, shape, dtype=np.float32)
            shapes[name] = shape
    return LazyTensors(loaders, shapes)


def _load(tensor, permuted_heads: int | None) -> np.ndarray:
    array = _dequantized(tensor)
    return interleaved_to_rotate_half(array, permuted_heads) if permuted_heads else array
