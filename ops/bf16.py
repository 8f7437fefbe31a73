"""bf16 CPU kernels as MindSpore AOT custom ops: ``dense`` and causal prefill attention.

``dense``: ``y = x · wᵀ (+ b)`` with x and w rounded to bfloat16 — the arithmetic of a bf16
forward on an accelerator, at 2–2.5× the fp32 GEMM throughput of a CPU with AVX512-BF16.
``causal_attention``: ``softmax(q·kᵀ·scale, causal) · v`` with both products in bf16 over only the
keys each block of queries can see, the softmax in float32.  The kernels (``bf16.cc``) call oneDNN's ``gemm_bf16bf16f32`` from the ``libdnnl`` that ships inside the
MindSpore wheel (MindSpore's own CPU kernels use it), so nothing new is installed; it is compiled
with g++ on first use like the other CPU kernels (``build.py``).

Used by the conversion's calibration streams (``--forward-precision``); the conversion math itself
(Grams, eigendecompositions, the weights written) stays in float32/float64.  Inside ``ms.jit``
call the function returned by ``graph_dense()`` (it closes over the primitive, fetched outside the
graph).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from mindyouzhi.ops.build import KernelBuildError, cpu_flags, shared_library

SOURCE = Path(__file__).with_name("bf16.cc")
CXX_FLAGS = ("-std=c++17", "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
DNNL = "libdnnl.so.3"
# CPU features that execute bf16 dot products natively; without them oneDNN emulates bf16 and the
# kernel is no faster than float32.
NATIVE_BF16 = ("avx512_bf16", "amx_bf16")


def _dnnl_dir() -> Path:
    import mindspore

    directory = Path(mindspore.__file__).resolve().parent / "lib"
    if not (directory / DNNL).is_file():
        raise KernelBuildError(f"{directory / DNNL} not found: this MindSpore build does not ship oneDNN, "
                               "which the bf16 dense kernel calls (use --forward-precision fp32)")
    return directory


@functools.lru_cache(maxsize=None)
def kernel_library() -> Path:
    """Path of the compiled kernel library, building it on first use."""
    directory = _dnnl_dir()
    return shared_library(SOURCE, "bf16", CXX_FLAGS,
                          "the bf16 dense kernel is compiled on first use. Install a C++ compiler "
                          "(e.g. apt-get install g++), set CXX, or use --forward-precision fp32",
                          libraries=(f"-L{directory}", f"-l:{DNNL}", f"-Wl,-rpath,{directory}"))


@functools.lru_cache(maxsize=None)
def primitive():
    """The registered ``DenseBf16`` op: (x [..., K], w [N, K]) → [..., N]."""
    from mindspore import ops

    library = kernel_library()
    out_shape = lambda x, w: list(x[:-1]) + [w[0]]  # noqa: E731
    out_dtype = lambda x, w: x  # noqa: E731
    return ops.Custom(f"{library}:DenseBf16", out_shape=out_shape, out_dtype=out_dtype, func_type="aot")


@functools.lru_cache(maxsize=None)
def attention_primitive():
    """The registered ``CausalAttentionBf16`` op: (q [B,T,H,dk], k [B,T,G,dk], v [B,T,G,dv],
    cos [T,R/2], sin [T,R/2], scale [1]) → [B, T, H, dv]."""
    from mindspore import ops

    library = kernel_library()
    out_shape = lambda q, k, v, cos, sin, scale: [q[0], q[1], q[2], v[3]]  # noqa: E731
    out_dtype = lambda q, k, v, cos, sin, scale: q  # noqa: E731
    return ops.Custom(f"{library}:CausalAttentionBf16", out_shape=out_shape, out_dtype=out_dtype, func_type="aot")


@functools.lru_cache(maxsize=None)
def fused_primitives():
    """The registered ``NormDenseBf16`` (x [..., K], g [K], w [N, K] packed, eps [1]) → [..., N] and
    ``SwigluDownBf16`` (h [..., D], gate|up [..., 2F], w [D, F] packed) → [..., D]."""
    from mindspore import ops

    library = kernel_library()
    norm_dense = ops.Custom(f"{library}:NormDenseBf16", out_shape=lambda x, g, w, eps: list(x[:-1]) + [w[0]],
                            out_dtype=lambda x, g, w, eps: x, func_type="aot")
    swiglu_down = ops.Custom(f"{library}:SwigluDownBf16", out_shape=lambda h, gu, w: h, out_dtype=lambda h, gu, w: h,
                             func_type="aot")
    return norm_dense, swiglu_down


@functools.lru_cache(maxsize=None)
def dense_add_primitive():
    """The registered ``DenseAddBf16`` op: (x [..., K], w [N, K] packed, r [..., N]) → r + x·wᵀ."""
    from mindspore import ops

    return ops.Custom(f"{kernel_library()}:DenseAddBf16", out_shape=lambda x, w, r: r, out_dtype=lambda x, w, r: r,
                      func_type="aot")


def graph_dense_add() -> Callable:
    """``dense_add(x, w, residual)`` = ``residual + dense(x, w)`` for ``ms.jit`` graphs as one kernel
    call (``w`` [N, K] packed by ``bf16_bits``)."""
    return dense_add_primitive()


def graph_norm_dense() -> Callable:
    """``norm_dense(x, g, w, eps)`` = ``dense(rms_norm(x, g, eps), w)`` for ``ms.jit`` graphs as one
    kernel call: the norm in float32, its result and ``w`` (packed by ``bf16_bits``) in bf16."""
    import mindspore as ms
    from mindspore import ops

    op = fused_primitives()[0]

    def norm_dense(x, g, w, eps):  # eps: a float, or a float32 tensor [1] (no ops to build it)
        if isinstance(eps, float):
            eps = ops.ones(1, ms.float32) * eps
        return op(x, g, w, eps)

    return norm_dense


def graph_swiglu_down() -> Callable:
    """``swiglu_down(h, gate_up, w)`` = ``h + dense(silu(gate) · up, w)`` for ``ms.jit`` graphs as one
    kernel call (``gate_up`` = [..., 2F], gate first; ``w`` [D, F] packed)."""
    return fused_primitives()[1]


def graph_attend() -> Callable:
    """``attend(q, k, v, cos, sin, scale)`` → [B, T, H·dv] for ``ms.jit`` graphs (the contract of
    ``models.functional.gqa_attention_fused``): q [B,T,H,dk], k [B,T,G,dk], v [B,T,G,dv] before
    RoPE, which turns the last 2·cos.shape[-1] components; causal from position 0, no padding."""
    import mindspore as ms
    from mindspore import ops

    op = attention_primitive()

    def attend(q, k, v, cos, sin, scale):
        out = op(q, k, v, cos, sin, ops.ones(1, ms.float32) * scale)
        return out.reshape(out.shape[0], out.shape[1], out.shape[2] * out.shape[3])

    return attend


def causal_attention(q, k, v, cos, sin, scale: float):
    """``graph_attend()``'s function in PyNative."""
    return graph_attend()(q, k, v, cos, sin, scale)


def graph_dense() -> Callable:
    """A drop-in for ``ops.dense(x, w, b)`` usable inside ``ms.jit`` (``w`` float32, or uint16
    from ``bf16_bits``)."""
    op = primitive()

    def dense(x, w, b=None):
        y = op(x, w)
        if b is not None:
            y = y + b
        return y

    return dense


def dense(x, w, b=None):
    """``ops.dense`` in bf16 (PyNative)."""
    return graph_dense()(x, w, b)


@functools.lru_cache(maxsize=None)
def _round_function():
    import ctypes

    function = ctypes.CDLL(str(kernel_library())).RoundToBf16
    function.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    return function


def bf16_bits(array: np.ndarray) -> np.ndarray:
    """``array`` rounded to bfloat16 by the kernel's own rounding, as uint16 bit patterns (the
    packed weight form ``dense`` accepts: rounded once instead of at every call)."""
    source = np.ascontiguousarray(array, np.float32)
    target = np.empty(source.shape, np.uint16)
    _round_function()(source.ctypes.data, source.size, target.ctypes.data)
    return target


def round_to_bf16(array: np.ndarray) -> np.ndarray:
    """``array`` rounded to bfloat16 by the kernel's own rounding, returned as float32."""
    return (bf16_bits(array).astype(np.uint32) << 16).view(np.float32)


def native_bf16() -> bool:
    return any(flag in cpu_flags().split() for flag in NATIVE_BF16)


@functools.lru_cache(maxsize=None)
def unavailable() -> Optional[str]:
    """Why the kernel cannot be used here (None if it can): not buildable, or failing a probe."""
    try:
        from mindspore import Tensor

        rng = np.random.default_rng(0)
        x, w = rng.standard_normal((3, 5, 40), dtype=np.float32), rng.standard_normal((7, 40), dtype=np.float32)
        got = dense(Tensor(x), Tensor(w)).asnumpy()
    except KernelBuildError as exc:
        return str(exc)
    except RuntimeError as exc:  # the kernel's return code (e.g. oneDNN without AVX512 support)
        return f"the bf16 dense kernel failed its probe: {str(exc).splitlines()[0]}"
    if not np.allclose(got, x @ w.T, rtol=0.05, atol=0.1):
        return "the bf16 dense kernel failed its probe: wrong result"
    return None
