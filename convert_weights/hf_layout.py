"""Write a Hugging Face Llama-layout model directory: the common output of every importer.

The directory holds ``config.json``, fp32 ``*.safetensors`` (one ``model.safetensors``, or
numbered shards plus ``model.safetensors.index.json`` past ``max_shard_bytes``) and the
tokenizer files — exactly what ``transformers.LlamaForCausalLM.from_pretrained`` and our own HF
reader load.  Tensors may come from a lazy mapping: they are materialized one at a time and each
shard is written and released before the next is built, so peak memory is one shard, not the
model.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np

from mindyouzhi.convert_weights import architectures
from mindyouzhi.convert_weights.safetensors_io import ShardedWriter
from mindyouzhi.io_utils import atomic_output_dir, sha256_file

CONFIG_FILE = "config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
# transformers' own default shard size ("5GB").
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9

def parameter_shapes(config: Mapping, where: str | os.PathLike = "config.json") -> dict[str, tuple[int, ...]]:
    """Every parameter the family spec gives the HF ``config`` dict an importer writes, with its shape."""
    from mindyouzhi.models.config import ModelConfig

    return architectures.checkpoint_shapes(ModelConfig.from_dict(dict(config), str(where)))


def check_tensors(shapes: Mapping[str, tuple[int, ...]], config: Mapping, source: str | os.PathLike) -> None:
    """Refuse a checkpoint whose tensors are not exactly what ``config`` describes (family spec)."""
    from mindyouzhi.models.config import ModelConfig

    architectures.check_tensors(shapes, ModelConfig.from_dict(dict(config), str(source)), source)


def interleaved_to_rotate_half(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k rows (or biases) from interleaved RoPE pairs to HF's rotate-half pairs.

    Per head, interleaved RoPE (llama2.c, and llama.cpp's permuted GGUF rows) rotates rows
    (2i, 2i+1) together; HF Llama rotates (i, i + head_dim/2).  Taking each head's even rows then
    its odd rows maps one onto the other with the same frequency per pair, so attention scores
    are unchanged.  Works for weights (rows, cols) and biases (rows,).
    """
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of RoPE pairs")
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


class LazyTensors(Mapping[str, np.ndarray]):
    """Name -> array, computed on access; ``shapes`` are known up front for validation.

    Importers hand one to :func:`write_hf_model_dir` so that a tensor is read, dequantized or
    permuted only when the writer reaches it."""

    def __init__(self, loaders: dict[str, Callable[[], np.ndarray]], shapes: dict[str, tuple[int, ...]]):
        self._loaders = loaders
        self.shapes = shapes

    def __getitem__(self, name: str) -> np.ndarray:
        array = self._loaders[name]()
        if array.shape != self.shapes[name]:
            raise RuntimeError(f"loader for {name} produced shape {array.shape}, declared {self.shapes[name]}")
        return array

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)


@dataclass(frozen=True)
class WrittenModel:
    out_dir: Path
    params: int
    weight_files: tuple[str, ...]


def write_hf_model_dir(
    out_dir: str | os.PathLike,
    config: Mapping,
    tensors: Mapping[str, np.ndarray],
    tokenizer_files: Mapping[str, str | bytes],
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> WrittenModel:
    """Write ``config``, ``tensors`` (cast to fp32) and ``tokenizer_files`` to ``out_dir``.

    All-or-nothing: everything goes to a temporary sibling that replaces ``out_dir`` only when
    complete; an existing ``out_dir`` is refused unless ``overwrite``.
    """
    for name in tokenizer_files:
        if Path(name).name != name or name in (CONFIG_FILE, SINGLE_WEIGHTS_FILE, WEIGHTS_INDEX_FILE):
            raise ValueError(f"tokenizer file name {name!r} must be a plain file name that is not a model file")
    with atomic_output_dir(out_dir, overwrite) as tmp:
        params, weight_files = _write_safetensors(tmp, tensors, max_shard_bytes)
        (tmp / CONFIG_FILE).write_text(json.dumps(dict(config), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for name, content in tokenizer_files.items():
            if isinstance(content, bytes):
                (tmp / name).write_bytes(content)
            else:
                (tmp / name).write_text(content, encoding="utf-8")
    return WrittenModel(Path(out_dir), params, weight_files)


def _write_safetensors(directory: Path, tensors: Mapping[str, np.ndarray], max_shard_bytes: int) -> tuple[int, tuple[str, ...]]:
    # "format": "pt" makes transformers accept the files as a PyTorch checkpoint.
    shapes = tensors.shapes if isinstance(tensors, LazyTensors) else {name: tensors[name].shape for name in tensors}
    writer = ShardedWriter(directory, shapes, max_shard_bytes, metadata={"format": "pt"})
    params = 0
    for name in tensors:
        array = np.ascontiguousarray(tensors[name], dtype=np.float32)
        writer.add(name, array)
        params += array.size
    return params, tuple(writer.close())


def import_summary(
    written: WrittenModel,
    config: Mapping,
    source_format: str,
    source: str | os.PathLike,
    tokenizer_source: str | os.PathLike | None = None,
) -> dict:
    """The one JSON object ``mindyouzhi import/fetch --json`` prints (and the human summary's data)."""
    summary = {
        "out": str(written.out_dir),
        "format": source_format,
        "arch": config["model_type"],
        "layers": config["num_hidden_layers"],
        "heads": config["num_attention_heads"],
        "kv_heads": config["num_key_value_heads"],
        "head_dim": config["head_dim"],
        "vocab": config["vocab_size"],
        "params": written.params,
        "weight_files": list(written.weight_files),
        "source": str(source),
        "source_sha256": sha256_file(source),
    }
    if tokenizer_source is not None:
        summary["tokenizer_source"] = str(tokenizer_source)
        summary["tokenizer_sha256"] = sha256_file(tokenizer_source)
    return summary
