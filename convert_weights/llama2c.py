"""Import a legacy llama2.c checkpoint (``model.bin``) and tokenizer (``tok*.bin``).

Checkpoint (llama2.c "version 0", what ``run.c`` reads), little-endian:

* header, 7 × int32: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len —
  a negative vocab_size means the classifier is not shared and ``wcls`` follows at the end;
* fp32 tensors, in :func:`tensor_layout` order, each stacked over layers where per layer.

llama2.c applies RoPE to interleaved pairs (2i, 2i+1) of each head; HF Llama rotates halves
(i, i + head_dim/2).  The q/k rows are permuted per head (even rows first, then odd rows), which
is the same row shuffle as undoing llama.cpp's GGUF permutation.  The two RoPE tables in the file
are only checked against θ = 10000 (the value ``run.c`` and ``model.py`` use) and dropped.

Tokenizer: int32 max_token_length, then per token float32 score, int32 byte length, bytes.  It
is stored in the model dir as Hugging Face ``tokenizer.json`` + ``tokenizer_config.json`` +
``special_tokens_map.json`` (same ids as run.c; :mod:`.hf_tokenizer`), and as
``tokenizer_llama2c.json`` (format in :mod:`mindyouzhi.tokenizer`) for older mindyouzhi versions.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mindyouzhi.errors import UserError
from mindyouzhi.io_utils import check_output_dir
from mindyouzhi.tokenizer import LLAMA2C_FORMAT, LLAMA2C_FORMAT_VERSION, LLAMA2C_TOKENIZER_FILE, Llama2cTokenizer

from .hf_layout import LazyTensors, check_tensors, import_summary, interleaved_to_rotate_half, write_hf_model_dir
from .hf_tokenizer import llama2c_hf_files

HEADER = struct.Struct("<7i")
HEADER_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
# llama2.c's export.py versions 1+ start with this magic ("ak42") and a 256-byte header instead.
VERSIONED_EXPORT_MAGIC = 0x616B3432

ROPE_THETA = 10000.0
RMS_NORM_EPS = 1e-5
BOS_TOKEN_ID, EOS_TOKEN_ID, UNK_TOKEN_ID = 1, 2, 0  # hard-coded in run.c
BYTE_FALLBACK_OFFSET = 3  # run.c: byte b -> token id b + 3

# llama2.c tensor -> HF Llama parameter; "{}" = layer index of a stacked per-layer tensor.
WEIGHT_MAP = {
    "token_embedding": "model.embed_tokens.weight",
    "rms_att": "model.layers.{}.input_layernorm.weight",
    "wq": "model.layers.{}.self_attn.q_proj.weight",
    "wk": "model.layers.{}.self_attn.k_proj.weight",
    "wv": "model.layers.{}.self_attn.v_proj.weight",
    "wo": "model.layers.{}.self_attn.o_proj.weight",
    "rms_ffn": "model.layers.{}.post_attention_layernorm.weight",
    "w1": "model.layers.{}.mlp.gate_proj.weight",
    "w2": "model.layers.{}.mlp.down_proj.weight",
    "w3": "model.layers.{}.mlp.up_proj.weight",
    "rms_final": "model.norm.weight",
    "wcls": "lm_head.weight",
}
# q/k rows to reorder from interleaved to rotate-half RoPE pairs, with the header's head count.
PERMUTED_ROWS = {"wq": "n_heads", "wk": "n_kv_heads"}
ROPE_TABLES = ("freq_cis_real", "freq_cis_imag")


@dataclass(frozen=True)
class Llama2cHeader:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


def tensor_layout(header: Llama2cHeader) -> list[tuple[str, tuple[int, ...]]]:
    """The fp32 tensors after the header, in file order, with their shapes (layers first)."""
    h, layers = header, header.n_layers
    layout = [
        ("token_embedding", (h.vocab_size, h.dim)),
        ("rms_att", (layers, h.dim)),
        ("wq", (layers, h.dim, h.dim)),
        ("wk", (layers, h.kv_dim, h.dim)),
        ("wv", (layers, h.kv_dim, h.dim)),
        ("wo", (layers, h.dim, h.dim)),
        ("rms_ffn", (layers, h.dim)),
        ("w1", (layers, h.hidden_dim, h.dim)),
        ("w2", (layers, h.dim, h.hidden_dim)),
        ("w3", (layers, h.hidden_dim, h.dim)),
        ("rms_final", (h.dim,)),
        ("freq_cis_real", (h.seq_len, h.head_dim // 2)),
        ("freq_cis_imag", (h.seq_len, h.head_dim // 2)),
    ]
    if not h.shared_classifier:
        layout.append(("wcls", (h.vocab_size, h.dim)))
    return layout


def expected_file_size(header: Llama2cHeader) -> int:
    return HEADER.size + 4 * sum(int(np.prod(shape)) for _, shape in tensor_layout(header))


def read_header(path: Path) -> Llama2cHeader:
    with open(path, "rb") as handle:
        raw = handle.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise UserError(f"{path}: {len(raw)} bytes is too short for a llama2.c header ({HEADER.size} bytes)")
    values = dict(zip(HEADER_FIELDS, HEADER.unpack(raw)))
    if values["dim"] == VERSIONED_EXPORT_MAGIC:
        raise UserError(f"{path}: a versioned llama2.c export (magic 'ak42'); only the legacy format (version 0) is supported")
    described = ", ".join(f"{key}={value}" for key, value in values.items())
    vocab = values["vocab_size"]
    if any(values[key] <= 0 for key in HEADER_FIELDS if key != "vocab_size") or vocab == 0:
        raise UserError(f"{path}: not a llama2.c checkpoint, header has non-positive sizes ({described})")
    if values["dim"] % values["n_heads"] or values["n_heads"] % values["n_kv_heads"] or (values["dim"] // values["n_heads"]) % 2:
        raise UserError(
            f"{path}: inconsistent header ({described}): dim must split into n_heads even-sized heads "
            f"and n_heads must be a multiple of n_kv_heads"
        )
    return Llama2cHeader(**{**values, "vocab_size": abs(vocab)}, shared_classifier=vocab > 0)


def hf_config(header: Llama2cHeader) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": header.vocab_size,
        "hidden_size": header.dim,
        "intermediate_size": header.hidden_dim,
        "num_hidden_layers": header.n_layers,
        "num_attention_heads": header.n_heads,
        "num_key_value_heads": header.n_kv_heads,
        "head_dim": header.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": header.seq_len,
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_theta": ROPE_THETA,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": header.shared_classifier,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "torch_dtype": "float32",
    }


def read_llama2c_checkpoint(path: str | os.PathLike) -> tuple[dict, LazyTensors]:
    """HF config and lazy HF-named fp32 tensors of a legacy llama2.c checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: llama2.c checkpoint not found")
    header = read_header(path)
    expected, actual = expected_file_size(header), path.stat().st_size
    if actual != expected:
        problem = "truncated" if actual < expected else "longer than its header describes"
        raise UserError(
            f"{path}: file is {actual} bytes but its header (dim={header.dim}, hidden_dim={header.hidden_dim}, "
            f"n_layers={header.n_layers}, n_heads={header.n_heads}, n_kv_heads={header.n_kv_heads}, "
            f"vocab_size={header.vocab_size}, seq_len={header.seq_len}) implies {expected} bytes: {problem}"
        )
    floats = np.memmap(path, dtype="<f4", mode="r", offset=HEADER.size)
    arrays, offset = {}, 0
    for name, shape in tensor_layout(header):
        count = int(np.prod(shape))
        arrays[name] = floats[offset:offset + count].reshape(shape)
        offset += count
    _check_rope_tables(arrays, header, path)

    config = hf_config(header)
    loaders, shapes = {}, {}
    for name, hf_name in WEIGHT_MAP.items():
        if name not in arrays:
            continue  # wcls of a shared classifier
        stacked = arrays[name]
        heads = getattr(header, PERMUTED_ROWS[name]) if name in PERMUTED_ROWS else None
        if "{}" not in hf_name:
            loaders[hf_name] = lambda array=stacked: np.array(array, dtype=np.float32)
            shapes[hf_name] = stacked.shape
            continue
        for layer in range(header.n_layers):
            loaders[hf_name.format(layer)] = lambda array=stacked[layer], heads=heads: _layer_tensor(array, heads)
            shapes[hf_name.format(layer)] = stacked.shape[1:]
    tensors = LazyTensors(loaders, shapes)
    check_tensors(tensors.shapes, config, path)
    return config, tensors


def _layer_tensor(array: np.ndarray, heads: int | None) -> np.ndarray:
    array = np.array(array, dtype=np.float32)
    return interleaved_to_rotate_half(array, heads) if heads else array


def _check_rope_tables(arrays: dict, header: Llama2cHeader, path: Path) -> None:
    inv_freq = 1.0 / ROPE_THETA ** (np.arange(0, header.head_dim, 2, dtype=np.float64) / header.head_dim)
    angles = np.arange(header.seq_len, dtype=np.float64)[:, None] * inv_freq[None, :]
    # The file's tables were computed in fp32, whose angle error grows with the position.
    for name, reference in (("freq_cis_real", np.cos(angles)), ("freq_cis_imag", np.sin(angles))):
        error = float(np.max(np.abs(np.asarray(arrays[name], dtype=np.float64) - reference)))
        if error > 1e-3:
            raise UserError(
                f"{path}: RoPE table {name} differs from θ={ROPE_THETA:g} by up to {error:.3g}; "
                f"only llama2.c's standard RoPE (θ={ROPE_THETA:g}) is supported"
            )


def read_llama2c_tokenizer(path: str | os.PathLike, vocab_size: int | None = None) -> dict:
    """Parse a llama2.c ``tok*.bin`` into our ``tokenizer_llama2c.json`` object."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: llama2.c tokenizer file not found")
    data = path.read_bytes()
    if len(data) < 4:
        raise UserError(f"{path}: too short for a llama2.c tokenizer (needs a 4-byte max_token_length)")
    (max_token_length,) = struct.unpack_from("<i", data, 0)
    offset, vocab, scores = 4, [], []
    while offset < len(data):
        if offset + 8 > len(data):
            raise UserError(f"{path}: truncated at token {len(vocab)} (byte {offset}): no room for its score and length")
        score, length = struct.unpack_from("<fi", data, offset)
        offset += 8
        if length < 0 or offset + length > len(data):
            raise UserError(f"{path}: token {len(vocab)} claims {length} bytes at byte {offset}; file truncated or not a llama2.c tokenizer")
        try:
            vocab.append(data[offset:offset + length].decode("utf-8"))
        except UnicodeDecodeError:
            raise UserError(f"{path}: token {len(vocab)} is not valid UTF-8 ({data[offset:offset + length]!r})") from None
        scores.append(float(score))
        offset += length
    if vocab_size is not None and len(vocab) != vocab_size:
        raise UserError(f"{path}: tokenizer has {len(vocab)} tokens but the checkpoint's vocab_size is {vocab_size}")
    longest = max((len(piece.encode("utf-8")) for piece in vocab), default=0)
    if longest > max_token_length:
        raise UserError(f"{path}: a token is {longest} bytes, longer than the header's max_token_length {max_token_length}")
    tokenizer = {
        "format": LLAMA2C_FORMAT,
        "version": LLAMA2C_FORMAT_VERSION,
        "vocab": vocab,
        "scores": scores,
        "max_token_length": max_token_length,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "unk_token_id": UNK_TOKEN_ID,
        "byte_fallback_offset": BYTE_FALLBACK_OFFSET,
    }
    Llama2cTokenizer(path, tokenizer)  # validates the byte tokens, ids and dummy-prefix token
    return tokenizer


def llama2c_tokenizer_files(path: str | os.PathLike, vocab_size: int | None, model_max_length: int | None) -> dict[str, str]:
    """Every tokenizer file an imported model dir carries, by name, for the ``tok*.bin`` at ``path``."""
    data = read_llama2c_tokenizer(path, vocab_size)
    files = llama2c_hf_files(Llama2cTokenizer(Path(path), data), model_max_length)
    files[LLAMA2C_TOKENIZER_FILE] = json.dumps(data, ensure_ascii=False) + "\n"
    return files


def import_llama2c(checkpoint: str | os.PathLike, tokenizer: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> dict:
    """``mindyouzhi import --llama2c BIN --tokenizer TOK``: write the HF model dir ``out``."""
    check_output_dir(out, overwrite)
    config, tensors = read_llama2c_checkpoint(checkpoint)
    files = llama2c_tokenizer_files(tokenizer, config["vocab_size"], config["max_position_embeddings"])
    written = write_hf_model_dir(out, config, tensors, files, overwrite=overwrite)
    return import_summary(written, config, "llama2c", checkpoint, tokenizer_source=tokenizer)
