"""Lazy safetensors reading (memory-mapped, any of fp32/fp16/bf16) and sharded writing.

We parse the header ourselves instead of going through a framework so that (a) a truncated or
corrupt file is reported with its name and the expected size, (b) bf16 is widened to fp32 without
an extra dependency, and (c) one tensor at a time is materialised: conversion streams layer by
layer and never needs the whole checkpoint in memory.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from mindyouzhi.errors import UserError

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,  # widened to fp32 on read
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsFile:
    """One ``.safetensors`` file: header parsed eagerly, tensors read lazily through a memmap."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        try:
            with open(self.path, "rb") as handle:
                (header_len,) = struct.unpack("<Q", handle.read(8))
                if header_len <= 0 or 8 + header_len > size:
                    raise ValueError(f"header length {header_len} exceeds the file size {size}")
                header = json.loads(handle.read(header_len))
        except (struct.error, ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"{self.path}: not a valid safetensors file ({exc})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._entries = header
        self._data_start = 8 + header_len
        needed = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self._data_start + needed > size:
            raise UserError(
                f"{self.path}: truncated safetensors file: {size} bytes, the header needs "
                f"{self._data_start + needed}"
            )
        for name, entry in header.items():
            if entry.get("dtype") not in _DTYPES:
                raise UserError(f"{self.path}: tensor {name} has unsupported dtype {entry.get('dtype')}")
        self._mmap = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype_name(self, name: str) -> str:
        return self._entries[name]["dtype"]

    def get(self, name: str, dtype=np.float32) -> np.ndarray:
        """Return tensor ``name`` as a fresh array (floating tensors converted to ``dtype``)."""
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        raw = self._mmap[self._data_start + begin : self._data_start + end]
        kind = entry["dtype"]
        array = raw.view(_DTYPES[kind]).reshape(entry["shape"])
        if kind == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        if dtype is not None and np.issubdtype(array.dtype, np.floating):
            return np.array(array, dtype=dtype, copy=True)
        return np.array(array, copy=True)


class SafetensorsStore:
    """All safetensors files of a model directory (single file or sharded with an index)."""

    def __init__(self, model_dir: str | os.PathLike):
        self.model_dir = Path(model_dir)
        index = self.model_dir / "model.safetensors.index.json"
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise UserError(f"{index}: invalid safetensors index ({exc!r})") from None
            for name, shard in weight_map.items():
                if not (self.model_dir / shard).is_file():
                    raise UserError(f"{index}: shard {shard} (tensor {name}) not found")
                self._where[name] = shard
            for shard in sorted(set(weight_map.values())):
                self._files[shard] = SafetensorsFile(self.model_dir / shard)
            for name, shard in weight_map.items():
                if name not in self._files[shard]._entries:
                    raise UserError(f"{self.model_dir / shard}: tensor {name} listed in the index is missing")
        else:
            shards = sorted(self.model_dir.glob("*.safetensors"))
            if not shards:
                raise UserError(f"{self.model_dir}: no *.safetensors weights found")
            for shard in shards:
                handle = SafetensorsFile(shard)
                self._files[shard.name] = handle
                for name in handle.keys():
                    self._where[name] = shard.name

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._files[self._where[name]].shape(name)

    def get(self, name: str, dtype=np.float32) -> np.ndarray:
        if name not in self._where:
            raise UserError(f"{self.model_dir}: tensor {name} not found in the checkpoint")
        return self._files[self._where[name]].get(name, dtype)


class ShardedWriter:
    """Write tensors in shards of at most ``max_shard_bytes`` plus an index, as they are produced.

    Tensors are buffered only until a shard is full, so a streaming converter holds at most one
    shard of output at a time.
    """

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = 1 << 30, metadata: Mapping[str, str] | None = None):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = dict(metadata or {"format": "pt"})
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._total_bytes = 0

    def add(self, name: str, tensor: np.ndarray) -> None:
        tensor = np.ascontiguousarray(tensor)
        if self._pending and self._pending_bytes + tensor.nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += tensor.nbytes

    def add_all(self, tensors: Iterable[tuple[str, np.ndarray]]) -> None:
        for name, tensor in tensors:
            self.add(name, tensor)

    def _flush(self) -> None:
        from safetensors.numpy import save_file

        index = len(self._shards)
        save_file(self._pending, str(self.out_dir / f"shard-{index:05d}.safetensors"), metadata=self.metadata)
        self._shards.append(list(self._pending))
        self._total_bytes += self._pending_bytes
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Flush and name the shards; returns the written file names."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            os.replace(self.out_dir / "shard-00000.safetensors", self.out_dir / "model.safetensors")
            return ["model.safetensors"]
        names, weight_map = [], {}
        for index, tensor_names in enumerate(self._shards):
            final = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.out_dir / f"shard-{index:05d}.safetensors", self.out_dir / final)
            names.append(final)
            weight_map.update({name: final for name in tensor_names})
        index_doc = {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2))
        return names
