"""How the decode step reads the paged cache: the one interface the custom kernel plugs into.

A ``DecodeAttention`` supplies two graph-callable functions with the same signature,

    mla(q_latent, q_pe, latent_pool, k_pe_pool, block_tables, query_positions, seq_lens, scale) → [B, H, 1, r]
    gqa(q, k_pool, v_pool, block_tables, query_positions, seq_lens, scale)                   → [B, H, 1, d]

(queries [B, H, 1, ·]; ``query_positions`` [B, 1] and ``seq_lens`` [B] describe the same thing in
the two forms the implementations want).  ``gather`` is plain MindSpore ops (gather the blocks,
mask, softmax: ``mindyouzhi.ops.reference``), portable and the reference; ``custom`` is the AOT
CPU kernel (``mindyouzhi.ops.paged_attention``), which walks the block table without copying; on an
Ascend device ``custom``/``auto`` select the fused operators instead (``ops/dispatch.py``, not run).
Prefill chunks always use the plain-op form (many queries per sequence).  With a bf16 runner,
``custom`` also selects the fused decode steps of ``serve/paged_model`` (RoPE, cache write and this
kernel's attention in one call; ``ops/paged_attention.step_ops``).

Compiled-graph shapes differ by implementation.  The plain-op path's cost grows with the gathered
block-table width, so it runs on exactly the blocks needed, under a dynamic-shape graph (one
compilation serves every width).  The kernel's cost depends only on the true lengths, so it gets
a fixed full-context table width and a static graph (MindSpore's AOT custom ops do not run in
dynamic-shape graphs).  For the same reason a model with bf16 projections (AOT kernels too) runs the
plain-op path as ``GATHER_STATIC``: static graphs over power-of-two table widths.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

from mindyouzhi.errors import UserError
from mindyouzhi.ops import dispatch

CHOICES = ("auto", "custom", "gather")


@dataclass(frozen=True)
class DecodeAttention:
    name: str
    mla: Callable
    gqa: Callable
    dynamic_shapes: bool  # True: exact table widths, dynamic-shape graph; False: full-width tables
    bucketed: bool = False  # static shapes, table widths rounded up to a power of two (not full width)


_PLAIN = dispatch.cpu_kernels()
GATHER = DecodeAttention("gather", _PLAIN.decode_mla, _PLAIN.decode_gqa, dynamic_shapes=True)
# The plain ops in static-shape graphs, for graphs that hold AOT custom ops (the bf16 projections),
# which MindSpore cannot run in a dynamic-shape graph: a power-of-two table width keeps the gathered
# copy within 2x of the blocks needed and the number of compiled graphs logarithmic.
GATHER_STATIC = DecodeAttention("gather", _PLAIN.decode_mla, _PLAIN.decode_gqa, dynamic_shapes=False, bucketed=True)


def _fused_attention(fused) -> DecodeAttention:
    # The fused kernels take the full-context block table, like the CPU kernel: static shapes.
    return DecodeAttention("ascend", fused.decode_mla, fused.decode_gqa, dynamic_shapes=False)


def _kernel_attention() -> DecodeAttention:
    from mindyouzhi.ops import paged_attention

    kernels = paged_attention.custom_ops()
    mla_kernel, gqa_kernel = kernels.mla, kernels.gqa  # graph code cannot read tuple attributes

    def mla(q_latent, q_pe, latent_pool, k_pe_pool, block_tables, query_positions, seq_lens, scale):
        out = mla_kernel(q_latent.squeeze(2), q_pe.squeeze(2), latent_pool, k_pe_pool, block_tables, seq_lens, scale)
        return out.expand_dims(2)

    def gqa(q, k_pool, v_pool, block_tables, query_positions, seq_lens, scale):
        return gqa_kernel(q.squeeze(2), k_pool, v_pool, block_tables, seq_lens, scale).expand_dims(2)

    return DecodeAttention("custom", mla, gqa, dynamic_shapes=False)


_KERNEL: list[DecodeAttention] = []


def select_attention(choice: str = "auto") -> DecodeAttention:
    """``custom`` (error if the kernel cannot be built), ``gather``, or ``auto``: the kernel if it
    builds, else the plain ops with a one-line notice on stderr (never a silent fallback)."""
    if choice not in CHOICES:
        raise UserError(f"--attention {choice}: expected one of {', '.join(CHOICES)}")
    if choice == "gather":
        return GATHER
    device_kernels = dispatch.kernels()
    if device_kernels.fused:  # on the NPU "custom"/"auto" mean its fused operators (never run here)
        return _fused_attention(device_kernels)
    from mindyouzhi.ops.paged_attention import KernelBuildError

    try:
        if not _KERNEL:
            _KERNEL.append(_kernel_attention())
        return _KERNEL[0]
    except KernelBuildError as exc:
        if choice == "custom":
            raise
        print(f"note: using plain-op paged attention ({exc})", file=sys.stderr)
        return GATHER
