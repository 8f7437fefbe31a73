"""The paged KV pool: fixed-size blocks of cache entries shared by every running sequence.

One block id addresses ``block_size`` token slots in *every* layer's pool at once (as in vLLM), so a
sequence needs one block table, not one per layer.  Per layer the pool holds exactly what that
layer caches per token:

* MLA layer: the latent ``c`` [r] and the RoPE'd shared key ``k_pe`` [dr] — ``r + dr`` values;
* GQA layer (the layers a hybrid model keeps, or an unconverted model): K and V [KV, d] each.

Block 0 is the *null block*: never handed out, it absorbs the writes of padding rows (batches and
prefill chunks are padded to a few fixed shapes so compiled graphs are reused) and backs the
unused tail of padded block tables.  It is part of the budget like any other block.

Storage is fp32 numpy on the host, wrapped zero-copy by MindSpore tensors (``Tensor.from_numpy``):
the compiled layer step writes new entries in place (``scatter_nd_update``) and reads them back
through the block tables, and the host sees the same memory without a copy.  ``verify_in_place``
checks at start-up that this MindSpore build really writes through (on Ascend the pool would live
in device memory instead: that path is ``mindyouzhi.ops.ascend``, not this class).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from mindyouzhi.errors import UserError
from mindyouzhi.models.config import ModelConfig

NULL_BLOCK = 0
DTYPE_BYTES = 4  # fp32 on CPU


@dataclass(frozen=True)
class LayerCacheLayout:
    """What one layer caches per token: two tensors of the given per-token shapes."""

    kind: str  # "mla" or "gqa"
    first: tuple[int, ...]  # latent [r] or K [KV, d]
    second: tuple[int, ...]  # k_pe [dr] or V [KV, d]

    @property
    def values_per_token(self) -> int:
        return math.prod(self.first) + math.prod(self.second)


def cache_layouts(config: ModelConfig) -> list[LayerCacheLayout]:
    layouts = []
    for layer in range(config.num_hidden_layers):
        if config.is_mla(layer):
            layouts.append(LayerCacheLayout("mla", (int(config.mla.kv_lora_rank[layer]),),
                                            (config.mla_rope_width(layer),)))
        else:
            kv = (config.num_key_value_heads, config.head_dim)
            layouts.append(LayerCacheLayout("gqa", kv, kv))
        assert layouts[-1].values_per_token == config.kv_values_per_token(layer)
    return layouts


def kv_bytes_per_token(config: ModelConfig, dtype_bytes: int = DTYPE_BYTES) -> int:
    """Cache bytes one token costs across all layers."""
    return sum(layout.values_per_token for layout in cache_layouts(config)) * dtype_bytes


class PoolExhausted(Exception):
    """No free block left (the scheduler queues or preempts; never surfaces to a user)."""


class BlockAllocator:
    """Free list of block ids 1..N-1 (block 0 is the null block)."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        # A stack: the most recently freed (cache-warm) block is reused first.
        self._free = list(range(num_blocks - 1, NULL_BLOCK, -1))

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise PoolExhausted(f"{count} blocks requested, {len(self._free)} free")
        taken = self._free[len(self._free) - count:]
        del self._free[len(self._free) - count:]
        return taken[::-1]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class KVPool:
    """Per-layer block pools plus the allocator; sized from a byte budget or a block count."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int = 16):
        if block_size < 1:
            raise UserError(f"block size {block_size}: must be at least 1")
        if num_blocks < 2:
            raise UserError(f"KV pool of {num_blocks} block(s): need at least 2 (one is the null block)")
        self.config = config
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.layouts = cache_layouts(config)
        self.arrays: list[tuple[np.ndarray, np.ndarray]] = []
        self.tensors: list[tuple[Tensor, Tensor]] = []
        for layout in self.layouts:
            # np.zeros maps untouched pages lazily: resident memory grows as blocks are used.
            pair = tuple(np.zeros((num_blocks, block_size) + shape, np.float32)
                         for shape in (layout.first, layout.second))
            self.arrays.append(pair)
            self.tensors.append(tuple(Tensor.from_numpy(array) for array in pair))
        self.allocator = BlockAllocator(num_blocks)

    @classmethod
    def from_budget(cls, config: ModelConfig, budget_bytes: int, block_size: int = 16) -> "KVPool":
        """As many blocks as ``budget_bytes`` holds (the null block included in the budget)."""
        per_block = kv_bytes_per_token(config) * block_size
        num_blocks = int(budget_bytes) // per_block
        if num_blocks < 2:
            raise UserError(f"--kv-memory {budget_bytes} bytes holds {num_blocks} block(s) of {block_size} tokens "
                            f"({per_block} bytes each); need at least 2")
        return cls(config, num_blocks, block_size)

    @property
    def bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.config)

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    @property
    def total_bytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.arrays)

    @property
    def usable_tokens(self) -> int:
        return self.allocator.usable_blocks * self.block_size

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def describe(self) -> dict:
        return {"blocks": self.num_blocks, "block_size": self.block_size, "usable_tokens": self.usable_tokens,
                "bytes_per_token": self.bytes_per_token, "total_bytes": self.total_bytes}


@functools.lru_cache(maxsize=None)
def verify_in_place() -> None:
    """Fail loudly if compiled graphs do not write through to numpy-backed tensors."""
    host = np.zeros((2, 3), np.float32)
    _write_probe(Tensor.from_numpy(host), Tensor(np.array([[1]], np.int32)), Tensor(np.ones((1, 3), np.float32)))
    if not np.array_equal(host[1], np.ones(3, np.float32)):
        raise RuntimeError("this MindSpore build does not update numpy-backed tensors in place inside ms.jit; "
                           "the paged KV pool needs that (MindSpore 2.10 on CPU does)")


@ms.jit
def _write_probe(pool, index, value):
    return ops.scatter_nd_update(pool, index, value)
