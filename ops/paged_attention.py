"""Paged decode attention as MindSpore AOT custom ops with a CPU kernel (``paged_attention.cc``).

The C++ source ships as package data and is compiled with g++ on first use (``build.py``: a
per-user cache keyed by source, flags, compiler and CPU).

``paged_mla_decode`` and ``paged_gqa_decode`` have exactly the contracts of
``reference.paged_mla_decode_reference`` / ``paged_gqa_decode_reference``.  Inside ``ms.jit`` use
the primitives of ``custom_ops()`` directly (fetched outside the graph), with ``scale`` a float32
tensor of shape [1].

``step_ops()`` are the fused decode steps (``PagedGqaStep`` / ``PagedMlaStep``): RoPE, the cache
write and the attention of one layer, from its projection output, in one call.  They write the
pools *in place* and check that the buffers they were given are the pools' own memory
(``pool_addresses``), so a pool must be a graph input of the graph that calls them, not the output
of another op (see the .cc header).  ``step_unavailable()`` probes the whole contract once.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
from mindspore import Tensor, ops

from mindyouzhi.ops.build import KernelBuildError, shared_library  # noqa: F401  (KernelBuildError: part of this API)

SOURCE = Path(__file__).with_name("paged_attention.cc")
CXX_FLAGS = ("-std=c++17", "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")


@functools.lru_cache(maxsize=None)
def kernel_library() -> Path:
    """Path of the compiled kernel library, building it on first use."""
    return shared_library(SOURCE, "paged_attention", CXX_FLAGS,
                          "the CPU paged-attention kernel is compiled on first use. Install a C++ compiler "
                          "(e.g. apt-get install g++), set CXX, or choose the plain-op path (--attention gather)")


class DecodeOps(NamedTuple):
    """The registered primitives: ``mla(q_latent, q_pe, latent_pool, k_pe_pool, tables, lens, scale)``
    and ``gqa(q, k_pool, v_pool, tables, lens, scale)``."""

    mla: object
    gqa: object


@functools.lru_cache(maxsize=None)
def custom_ops() -> DecodeOps:
    # Idle OpenMP workers must sleep, not spin: between two attention calls MindSpore's own thread
    # pool runs the matmuls on the same cores.  libgomp reads this once, when the library loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    library = kernel_library()
    same_as_first = lambda first, *rest: first  # noqa: E731  (output shape/dtype = the query's)
    mla = ops.Custom(f"{library}:PagedMlaDecode", out_shape=same_as_first, out_dtype=same_as_first, func_type="aot")
    gqa = ops.Custom(f"{library}:PagedGqaDecode", out_shape=same_as_first, out_dtype=same_as_first, func_type="aot")
    return DecodeOps(mla, gqa)


def load() -> None:
    """Build and register the ops now (raises ``KernelBuildError`` if that is impossible)."""
    custom_ops()


def available() -> bool:
    try:
        load()
    except KernelBuildError:
        return False
    return True


def scale_tensor(scale: float) -> Tensor:
    return Tensor(np.asarray([scale], dtype=np.float32))


def _as_scale(scale):
    return scale if isinstance(scale, Tensor) else scale_tensor(float(scale))


def paged_mla_decode(q_latent, q_pe, latent_pool, k_pe_pool, block_tables, seq_lens, scale):
    """Absorbed MLA decode over the paged latent cache → out_latent [B, H, r] (see the .cc header)."""
    return custom_ops().mla(q_latent, q_pe, latent_pool, k_pe_pool, block_tables, seq_lens, _as_scale(scale))


def paged_gqa_decode(q, k_pool, v_pool, block_tables, seq_lens, scale):
    """GQA decode over a paged K/V pool → [B, H, d]."""
    return custom_ops().gqa(q, k_pool, v_pool, block_tables, seq_lens, _as_scale(scale))


class StepOps(NamedTuple):
    """The registered fused decode-step primitives (shapes in the .cc header):
    ``gqa(qkv, cos, sin, slots, k_pool, v_pool, tables, positions, lens, scale, pool_addresses)`` → [B, C, H·d]
    and ``mla(qa, cos, sin, slots, latent_pool, k_pe_pool, tables, positions, lens, scale, w_kv,
    pool_addresses[, latent_norm, eps])`` → [B, C, H·dv] (with the two last inputs, the latent is
    RMS-normed before it is cached)."""

    gqa: object
    mla: object


def _gqa_step_shape(qkv, cos, sin, slots, k_pool, *rest):
    return [qkv[0], qkv[1], qkv[2] - 2 * k_pool[2] * k_pool[3]]


def _mla_step_shape(qa, cos, sin, slots, latent_pool, k_pe_pool, tables, positions, lens, scale, w_kv, *rest):
    heads, rank, rope = w_kv[0], latent_pool[2], k_pe_pool[2]
    nope = (qa[2] - rank - rope) // heads - rope
    return [qa[0], qa[1], heads * (w_kv[1] - nope)]


def _first(first, *rest):
    return first


@functools.lru_cache(maxsize=None)
def step_ops() -> StepOps:
    custom_ops()  # the library's OpenMP policy, as for the decode kernels
    library = kernel_library()
    gqa = ops.Custom(f"{library}:PagedGqaStep", out_shape=_gqa_step_shape, out_dtype=_first, func_type="aot")
    mla = ops.Custom(f"{library}:PagedMlaStep", out_shape=_mla_step_shape, out_dtype=_first, func_type="aot")
    return StepOps(gqa, mla)


def pool_addresses(first: np.ndarray, second: np.ndarray) -> Tensor:
    """The host addresses of a layer's two pool arrays, as the step kernels check them: int64 [2]."""
    return Tensor(np.asarray([first.ctypes.data, second.ctypes.data], np.int64))


@functools.lru_cache(maxsize=None)
def step_unavailable():
    """Why the fused steps cannot serve here (None if they can): the kernel does not build, or a
    compiled graph does not hand it the pools' own memory (the write would be lost; the kernel
    refuses with code 6), or the probe's result is wrong."""
    import mindspore as ms

    try:
        gqa = step_ops().gqa
    except KernelBuildError as exc:
        return str(exc)

    @ms.jit
    def probe(qkv, cos, sin, slots, k_pool, v_pool, tables, positions, lens, scale, addresses):
        return gqa(qkv, cos, sin, slots, k_pool, v_pool, tables, positions, lens, scale, addresses)

    # One sequence, one KV head of width 2, one query head; blocks of 2 tokens.  Position 2 is
    # the first slot of block 2 (table [1, 2]); the key written there is the only one the query
    # scores differently from the zero cache, so the output mixes v = [1, 2] and the zero rows.
    k_host, v_host = np.zeros((3, 2, 1, 2), np.float32), np.zeros((3, 2, 1, 2), np.float32)
    qkv = np.asarray([[[1.0, 0.0, 4.0, 0.0, 1.0, 2.0]]], np.float32)
    ones, zeros = np.ones((1, 1, 1), np.float32), np.zeros((1, 1, 1), np.float32)
    try:
        out = probe(Tensor(qkv), Tensor(ones), Tensor(zeros), Tensor(np.asarray([[2, 0]], np.int32)),
                    Tensor.from_numpy(k_host), Tensor.from_numpy(v_host), Tensor(np.asarray([[1, 2]], np.int32)),
                    Tensor(np.asarray([[2]], np.int32)), Tensor(np.asarray([3], np.int32)), scale_tensor(1.0),
                    pool_addresses(k_host, v_host)).asnumpy()
    except RuntimeError as exc:  # the kernel's return code
        return f"the fused decode step failed its probe: {str(exc).splitlines()[0]}"
    weight = np.exp(4.0) / (np.exp(4.0) + 2.0)  # the new key scores 4, the two zero keys 0
    if not (np.array_equal(k_host[2, 0, 0], [4.0, 0.0]) and np.array_equal(v_host[2, 0, 0], [1.0, 2.0])
            and np.allclose(out[0, 0], [weight, 2 * weight], atol=1e-6)):
        return "the fused decode step failed its probe: wrong result"
    return None
