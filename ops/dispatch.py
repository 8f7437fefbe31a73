"""Which kernels run: MindSpore's fused Ascend operators on an NPU, their plain-op CPU twins
otherwise — decided here and nowhere else, from :func:`device_target`.

What is dispatched (the fused side was never run: no NPU was available, see docs/design.md):

==================  ====================================================  =====================================
role                Ascend (``ops/ascend.py``)                            CPU twin
==================  ====================================================  =====================================
``rms_norm``        ``ops.rms_norm``                                      ``models.functional.rms_norm``
``decode_mla``      ``ops.auto_generate.Mla`` (absorbed, paged)           ``reference.paged_mla_attend``
``decode_gqa``      ``ops.auto_generate.PagedAttention``                  ``reference.paged_gqa_attend``
==================  ====================================================  =====================================

``rms_norm`` is used by the training cells (``models/layers.RMSNorm``) and every layer step of the
serving engine (``serve/paged_model``); the decode kernels are the serving engine's
``DecodeAttention`` (``serve/attention.select_attention``).  On CPU the serving engine may further
swap the plain-op decode for the AOT C++ kernel (``paged_attention.py``); that choice stays in
``serve/attention.py`` because it is about a compiler, not a device.

``ascend.py`` also wraps ``rotary_position_embedding``, ``flash_attention_score`` and
``reshape_and_cache``; they are listed in :data:`NOT_DISPATCHED` because the cells' and the
engine's graphs keep their own RoPE, softmax attention and scatter writes (they carry our
per-layer frequency tables and the numpy-backed pool), so nothing calls those wrappers yet.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import mindspore as ms

ASCEND = "Ascend"
NOT_DISPATCHED = ("rotary_position_embedding", "flash_attention_score", "reshape_and_cache")


def device_target() -> str:
    """The one place the device target is read (tests monkeypatch this function)."""
    return ms.get_context("device_target")


@dataclass(frozen=True)
class Kernels:
    device: str
    rms_norm: Callable  # (x, weight, eps) → normed x
    decode_mla: Callable  # (q_latent, q_pe, latent_pool, k_pe_pool, tables, positions, seq_lens, scale) → [B, H, 1, r]
    decode_gqa: Callable  # (q, k_pool, v_pool, tables, positions, seq_lens, scale) → [B, H, 1, d]
    fused: dict  # role → the MindSpore operator it runs (empty for the CPU twins)


def kernels() -> Kernels:
    return _kernels(device_target())


def cpu_kernels() -> Kernels:
    """The plain-op twins whatever the device (the portable reference paths use them)."""
    return _kernels("CPU")


@functools.lru_cache(maxsize=None)
def _kernels(device: str) -> Kernels:
    if device == ASCEND:
        from . import ascend

        return Kernels(device, ascend.rms_norm, ascend.decode_mla, ascend.decode_gqa, dict(ascend.FUSED_OPERATORS))
    from mindyouzhi.models.functional import rms_norm

    from . import reference

    def decode_mla(q_latent, q_pe, latent_pool, k_pe_pool, block_tables, query_positions, seq_lens, scale):
        return reference.paged_mla_attend(q_latent, q_pe, latent_pool, k_pe_pool, block_tables, query_positions, scale)

    def decode_gqa(q, k_pool, v_pool, block_tables, query_positions, seq_lens, scale):
        return reference.paged_gqa_attend(q, k_pool, v_pool, block_tables, query_positions, scale)

    return Kernels(device, rms_norm, decode_mla, decode_gqa, {})
