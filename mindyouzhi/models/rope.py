"""Rotary position embeddings: frequency tables (with HF ``rope_scaling`` semantics) and application.

Tables are computed on the host in float32 exactly the way the HF reference does (inverse
frequencies, then ``position * inv_freq`` in float32), so long-context logits agree to ~1e-5.
Two pairings are supported: *rotate-half* (HF Llama/Qwen: the pair of frequency j is (j, j + d/2))
and *interleaved* (Meta/GGUF/DeepSeek: the pair is (2j, 2j + 1)).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
from mindspore import ops

from .config import ModelConfig


def inverse_frequencies(config: ModelConfig, seq_len: Optional[int] = None) -> tuple[np.ndarray, float]:
    """Source-model inverse frequencies (``head_dim/2``, float32) and the cos/sin attention factor."""
    dim = config.head_dim
    base = config.rope_theta
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", "default")
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    attention_factor = 1.0
    if rope_type == "dynamic":
        seq_len = max(seq_len or 0, config.max_position_embeddings)
        factor = float(scaling["factor"])
        base = base * ((factor * seq_len / config.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = (np.float32(1.0) / (np.float32(base) ** exponents)).astype(np.float32)
    if rope_type == "linear":
        inv_freq = (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    elif rope_type == "llama3":
        inv_freq = _llama3(inv_freq, scaling, config)
    elif rope_type == "yarn":
        inv_freq, attention_factor = _yarn(config, scaling, base, dim)
    return inv_freq, attention_factor


def _llama3(inv_freq: np.ndarray, scaling: dict, config: ModelConfig) -> np.ndarray:
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling.get("original_max_position_embeddings", config.max_position_embeddings)
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(config: ModelConfig, scaling: dict, base: float, dim: int) -> tuple[np.ndarray, float]:
    factor = scaling.get("factor")
    original = scaling.get("original_max_position_embeddings") or config.max_position_embeddings
    if factor is None:
        factor = config.max_position_embeddings / original

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    keep = 1 - ramp
    return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32), float(attention_factor)


def cos_sin(inv_freq: np.ndarray, positions: np.ndarray, attention_factor: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables of shape ``positions.shape + (len(inv_freq),)`` (half width, float32)."""
    angles = positions.astype(np.float32)[..., None] * inv_freq.astype(np.float32)
    cos = (np.cos(angles) * np.float32(attention_factor)).astype(np.float32)
    sin = (np.sin(angles) * np.float32(attention_factor)).astype(np.float32)
    return cos, sin


def apply_rotate_half(x, cos, sin):
    """RoPE with HF pairing: ``x`` [..., T, d], ``cos``/``sin`` broadcastable to [..., T, d/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return ops.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)


def rotate_half_to_interleaved_rows(rows: int) -> np.ndarray:
    """Row permutation taking a rotate-half ordered block of ``rows`` to interleaved order."""
    half = rows // 2
    order = np.empty(rows, dtype=np.int64)
    order[0::2] = np.arange(half)
    order[1::2] = np.arange(half) + half
    return order
