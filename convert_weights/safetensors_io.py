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
    """One ``.safetensors`` file: header parsed eagerly, each tensor read on demand.

    Reads are plain ``readinto`` calls into a fresh buffer, not a memmap: a memmap's touched pages
    count as resident memory of the process for as long as it is open, so a streaming pass over a
    whole checkpoint would look (and, under memory pressure, behave) like holding all of it.  A
    read copy lives exactly as long as the caller keeps the array; the page cache stays the
    kernel's."""

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

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype_name(self, name: str) -> str:
        return self._entries[name]["dtype"]

    def get(self, name: str, dtype=np.float32) -> np.ndarray:
        """Return tensor ``name`` as a fresh array (floating tensors converted to ``dtype``)."""
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        raw = bytearray(end - begin)
        with open(self.path, "rb") as handle:
            handle.seek(self._data_start + begin)
            if handle.readinto(raw) != len(raw):
                raise UserError(f"{self.path}: tensor {name} is truncated (the file is shorter than its header says)")
        kind = entry["dtype"]
        array = np.frombuffer(raw, dtype=_DTYPES[kind]).reshape(entry["shape"])  # writable: owns ``raw``
        if kind == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        if dtype is not None and np.issubdtype(array.dtype, np.floating) and array.dtype != dtype:
            return array.astype(dtype)
        return array


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


_DTYPE_NAMES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
                np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
                np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}


class ShardedWriter:
    """Streaming safetensors writer: each tensor goes to disk as soon as it is added.

    A safetensors header lists every tensor before the data, so tensor bytes are first appended to
    a spill file per shard and the final file (header + data) is assembled by a streamed copy at
    ``close``.  Memory stays at one tensor whatever the model size; shards roll over at
    ``max_shard_bytes`` and get an HF ``model.safetensors.index.json``.
    """

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = 2 << 30, metadata: Mapping[str, str] | None = None):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {k: str(v) for k, v in (metadata or {"format": "pt"}).items()}
        self._shards: list[dict] = []  # per shard: {"spill": path, "entries": {name: (dtype, shape, begin, end)}, "size": n}
        self._handle = None
        self._total_bytes = 0

    def _open_shard(self) -> None:
        self._close_spill()
        spill = self.out_dir / f".shard-{len(self._shards):05d}.data"
        self._handle = open(spill, "wb")
        self._shards.append({"spill": spill, "entries": {}, "size": 0})

    def _close_spill(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def add(self, name: str, tensor: np.ndarray) -> None:
        tensor = np.ascontiguousarray(tensor)
        if tensor.dtype not in _DTYPE_NAMES:
            raise TypeError(f"tensor {name}: dtype {tensor.dtype} cannot be written to safetensors")
        if not self._shards or (self._shards[-1]["size"] and self._shards[-1]["size"] + tensor.nbytes > self.max_shard_bytes):
            self._open_shard()
        shard = self._shards[-1]
        if name in shard["entries"] or any(name in other["entries"] for other in self._shards):
            raise ValueError(f"tensor {name} written twice")
        begin = shard["size"]
        self._handle.write(tensor.tobytes())
        shard["size"] = begin + tensor.nbytes
        shard["entries"][name] = (_DTYPE_NAMES[tensor.dtype], list(tensor.shape), begin, shard["size"])
        self._total_bytes += tensor.nbytes

    def add_all(self, tensors: Iterable[tuple[str, np.ndarray]]) -> None:
        for name, tensor in tensors:
            self.add(name, tensor)

    def _assemble(self, shard: dict, target: Path) -> None:
        header = {name: {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
                  for name, (dtype, shape, begin, end) in shard["entries"].items()}
        header["__metadata__"] = self.metadata
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with open(target, "wb") as out, open(shard["spill"], "rb") as data:
            out.write(struct.pack("<Q", len(encoded)))
            out.write(encoded)
            while block := data.read(1 << 24):
                out.write(block)
        os.unlink(shard["spill"])

    def close(self) -> list[str]:
        """Assemble the shard files (and the index when there are several); returns their names."""
        if not self._shards:
            self._open_shard()
        self._close_spill()
        count = len(self._shards)
        names = ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        for shard, name in zip(self._shards, names):
            self._assemble(shard, self.out_dir / name)
        if count > 1:
            weight_map = {tensor: name for shard, name in zip(self._shards, names) for tensor in shard["entries"]}
            index_doc = {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2) + "\n")
        return names
