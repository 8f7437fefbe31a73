"""Paged decode attention as MindSpore AOT custom ops with a CPU kernel (``paged_attention.cc``).

The C++ source ships as package data and is compiled with g++ on first use (``build.py``: a
per-user cache keyed by source, flags, compiler and CPU).

``paged_mla_decode`` and ``paged_gqa_decode`` have exactly the contracts of
``reference.paged_mla_decode_reference`` / ``paged_gqa_decode_reference``.  Inside ``ms.jit`` use
the primitives of ``custom_ops()`` directly (fetched outside the graph), with ``scale`` a float32
tensor of shape [1].
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


