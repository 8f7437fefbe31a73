"""Safetensors reading (each tensor read on demand with plain reads, any of fp32/fp16/bf16) and
sharded writing.

We parse the header ourselves instead of going through a framework so that (a) a truncated or
corrupt file is reported as one line naming the file and the tensor, (b) bf16 is widened to fp32
without an extra dependency, (c) one tensor at a time is materialised: conversion streams
layer by layer and never needs the whole checkpoint in memory, and (d) a floating tensor holding
NaN or Inf is refused as it is read (every command loads weights through here), naming the tensor.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

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
# The safetensors package refuses headers above 100 MB; a larger length field is corruption, and
# reading it would allocate whatever the field claims.
MAX_HEADER_BYTES = 100 * 1000 * 1000


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_header(path: Path) -> tuple[dict, dict, int]:
    """(entries, metadata, data_start) of a safetensors file, every entry validated."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        if size < 8:
            raise UserError(f"{path}: not a safetensors file: {size} bytes, shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len == 0 or header_len > MAX_HEADER_BYTES:
            raise UserError(f"{path}: not a safetensors file: header length {header_len} is outside 1..{MAX_HEADER_BYTES}")
        if 8 + header_len > size:
            raise UserError(f"{path}: truncated safetensors file: header length {header_len} exceeds the file size {size}")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise UserError(f"{path}: not a safetensors file: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file: header is a JSON {type(header).__name__}, expected an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise UserError(f"{path}: __metadata__ must be a JSON object, got {type(metadata).__name__}")
    data_start = 8 + header_len
    data_size = size - data_start
    for name, entry in header.items():
        _check_entry(path, name, entry, data_size)
    spans = sorted((entry["data_offsets"][0], entry["data_offsets"][1], name) for name, entry in header.items())
    for (_, end, previous), (begin, _, name) in zip(spans, spans[1:]):
        if begin < end:
            raise UserError(f"{path}: tensor {name} overlaps tensor {previous} (bytes {begin}..{end} of the data section)")
    return header, metadata, data_start


def _check_entry(path: Path, name: str, entry, data_size: int) -> None:
    where = f"{path}: tensor {name}"
    if not isinstance(entry, dict):
        raise UserError(f"{where}: header entry is a JSON {type(entry).__name__}, expected an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise UserError(f"{where}: header entry has no {key!r}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _DTYPES:
        raise UserError(f"{where}: unsupported dtype {dtype!r}; supported: {', '.join(_DTYPES)}")
    if not isinstance(shape, list) or not all(_is_count(dim) for dim in shape):
        raise UserError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise UserError(f"{where}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
    expected = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
    if offsets[1] - offsets[0] != expected:
        raise UserError(f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, but shape {shape} "
                        f"of {dtype} needs {expected}")
    if offsets[1] > data_size:
        raise UserError(f"{where}: truncated safetensors file: the tensor ends at byte {offsets[1]} of the data "
                        f"section, which has {data_size}")


class SafetensorsFile:
    """One ``.safetensors`` file: header parsed and validated eagerly, each tensor read on demand.

    Reads are plain ``readinto`` calls into a fresh buffer, not a memmap: a memmap's touched pages
    count as resident memory of the process for as long as it is open, so a streaming pass over a
    whole checkpoint would look (and, under memory pressure, behave) like holding all of it.  A
    read copy lives exactly as long as the caller keeps the array; the page cache stays the
    kernel's."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._entries, self.metadata, self._data_start = _parse_header(self.path)

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
        # A float64 sum is finite exactly when every value is (barring absurd magnitudes, which
        # the exact test below then clears) and needs no array-sized temporary.
        if (np.issubdtype(array.dtype, np.floating) and not np.isfinite(array.sum(dtype=np.float64))
                and not np.isfinite(array).all()):
            bad = np.flatnonzero(~np.isfinite(array.reshape(-1)))
            raise UserError(f"{self.path}: tensor {name} has {len(bad)} non-finite value(s) (NaN or Inf; first at flat "
                            f"index {int(bad[0])}): the checkpoint is damaged")
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
            except (ValueError, UnicodeDecodeError, KeyError, TypeError) as exc:
                raise UserError(f"{index}: invalid safetensors index ({exc!r})") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise UserError(f"{index}: weight_map must be a JSON object of tensor name → shard file name")
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
            # As transformers does: model.safetensors when present (a training checkpoint keeps its
            # optimizer.safetensors next to it), otherwise every *.safetensors file.
            single = self.model_dir / "model.safetensors"
            shards = [single] if single.is_file() else sorted(self.model_dir.glob("*.safetensors"))
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


_DTYPE_NAMES = {np.dtype(numpy_type): name for name, numpy_type in _DTYPES.items() if name != "BF16"}


class ShardedWriter:
    """Safetensors writer for a layout declared up front: each header is written first, each tensor
    once, straight to its place in its shard.

    ``shapes`` (name → shape, in file order) and ``dtypes`` (name → dtype, float32 when absent)
    fix every offset before any data arrives, so ``add`` may come in any order and writes the
    tensor's bytes exactly once; memory stays at one tensor whatever the model size.  Shards roll
    over at ``max_shard_bytes`` and get an HF ``model.safetensors.index.json``.  Shards are written
    under temporary names and renamed by ``close`` once every declared tensor has arrived.
    """

    def __init__(self, out_dir: str | os.PathLike, shapes: Mapping[str, Sequence[int]], max_shard_bytes: int = 2 << 30,
                 metadata: Mapping[str, str] | None = None, dtypes: Optional[Mapping[str, object]] = None):
        self.out_dir = Path(out_dir)
        metadata = {k: str(v) for k, v in (metadata or {"format": "pt"}).items()}
        dtypes = dtypes or {}
        unknown = sorted(set(dtypes) - set(shapes))
        if unknown:
            raise ValueError(f"dtype given for undeclared tensor {unknown[0]}")
        self._layout: dict[str, tuple[int, tuple[int, ...], np.dtype, int]] = {}  # name → (shard, shape, dtype, offset)
        shard_sizes: list[int] = []
        shard_entries: list[dict] = []
        for name, shape in shapes.items():
            dtype = np.dtype(dtypes.get(name, np.float32))
            if dtype not in _DTYPE_NAMES:
                raise TypeError(f"tensor {name}: dtype {dtype} cannot be written to safetensors")
            shape = tuple(int(dim) for dim in shape)
            nbytes = math.prod(shape) * dtype.itemsize
            if not shard_sizes or (shard_sizes[-1] and shard_sizes[-1] + nbytes > max_shard_bytes):
                shard_sizes.append(0)
                shard_entries.append({})
            begin = shard_sizes[-1]
            shard_sizes[-1] += nbytes
            shard_entries[-1][name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape),
                                       "data_offsets": [begin, shard_sizes[-1]]}
            self._layout[name] = (len(shard_sizes) - 1, shape, dtype, begin)
        if not shard_sizes:
            shard_sizes, shard_entries = [0], [{}]
        count = len(shard_sizes)
        self.names = (["model.safetensors"] if count == 1
                      else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        self._total_bytes = sum(shard_sizes)
        self._weight_map = {tensor: self.names[shard] for tensor, (shard, *_) in self._layout.items()}
        self._pending = set(self._layout)
        self._handles = []
        self._data_start = []
        for name, entries, size in zip(self.names, shard_entries, shard_sizes):
            header = dict(entries)
            header["__metadata__"] = metadata
            encoded = json.dumps(header, separators=(",", ":")).encode()
            encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
            handle = open(self._temp(name), "wb")
            handle.write(struct.pack("<Q", len(encoded)) + encoded)
            handle.truncate(8 + len(encoded) + size)
            self._handles.append(handle)
            self._data_start.append(8 + len(encoded))

    def _temp(self, name: str) -> Path:
        return self.out_dir / f".{name}.partial"

    def add(self, name: str, tensor: np.ndarray) -> None:
        if name not in self._layout:
            raise ValueError(f"tensor {name} was not declared to the writer")
        if name not in self._pending:
            raise ValueError(f"tensor {name} written twice")
        shard, shape, dtype, begin = self._layout[name]
        array = np.ascontiguousarray(tensor, dtype=dtype)
        if array.shape != shape:
            raise ValueError(f"tensor {name} has shape {list(array.shape)}, declared {list(shape)}")
        handle = self._handles[shard]
        handle.seek(self._data_start[shard] + begin)
        handle.write(array.reshape(-1).view(np.uint8).data)
        self._pending.discard(name)

    def add_all(self, tensors: Iterable[tuple[str, np.ndarray]]) -> None:
        for name, tensor in tensors:
            self.add(name, tensor)

    def close(self) -> list[str]:
        """Publish the shard files (and the index when there are several); returns their names."""
        for handle in self._handles:
            handle.close()
        if self._pending:
            missing = sorted(self._pending)
            self.discard()
            raise ValueError(f"tensor {missing[0]} declared but never written ({len(missing)} missing)")
        for name in self.names:
            os.replace(self._temp(name), self.out_dir / name)
        if len(self.names) > 1:
            index_doc = {"metadata": {"total_size": self._total_bytes}, "weight_map": self._weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2) + "\n")
        return list(self.names)

    def discard(self) -> None:
        """Remove the partial shard files (after an error)."""
        for handle in self._handles:
            handle.close()
        for name in self.names:
            self._temp(name).unlink(missing_ok=True)
