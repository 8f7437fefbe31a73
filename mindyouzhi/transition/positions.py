"""Stage 1: score the position-free key components with the rotation they lose, in expectation.

After RoRoPE only ``rope_dim`` key components keep RoPE; the others enter the latent without a
position.  TransMLA scores them as ``q·k``, i.e. as if every key sat at the query's own position.
In the source model a query at position t and a key at s = t − Δ meet through the relative
rotation: per frequency pair j (rotate-half coordinates ``re_j``, ``im_j``)
``q·R(−θ_jΔ)k`` with ``R(φ) = [[cos φ, −sin φ], [sin φ, cos φ]]``.  No fixed map reproduces that
for every Δ, but the fixed map closest on average under the head's own attention is its
expectation: with ``p_h(Δ)`` the attention mass head h puts at distance Δ (calibration windows,
source model),

    M_h,j = Σ_Δ p_h(Δ) R(−θ_jΔ) = [[c̄, s̄], [−s̄, c̄]],  c̄ = Σ p cos θ_jΔ,  s̄ = Σ p sin θ_jΔ.

``Mᵀ`` is folded into the head's position-free query rows (the layer shape, the latent and the KV
cache are unchanged).  Low frequencies keep M ≈ I (TransMLA's choice is right for them); high
frequencies, whose source contribution averages out over distances, get M ≈ 0 instead of a
constant bias; the score-aware stage 2 then spends no rank on them.  Choosing this on validation
text: docs/BENCHMARKS.md ("position-free components").  ``none`` keeps TransMLA's Δ = 0.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from mindyouzhi.errors import UserError
from mindyouzhi.models.config import ModelConfig
from mindyouzhi.models.rope import cos_sin, inverse_frequencies

NOPE_ROTATION = ("auto", "mean", "none")
DEFAULT_NOPE_ROTATION = "auto"  # convert's: resolved to mean or none by scoring both (search.choose_nope_rotation)
PLAN_NOPE_ROTATION = "mean"  # a ConversionPlan's or CandidateFactory's when not told (they take a resolved one)
# Calibration tokens whose attention gives the distance profile: the first windows drawn (a random
# subset), 4,096 tokens' worth — 16 windows of 256 — whatever their length.  The profile is a
# per-head mean over thousands of queries; 16 × 256 tokens cost about 0.1 s per layer on the 2-core
# machine (attention grows with the window length).
PROFILE_TOKENS = 4096


def check_nope_rotation(value: str) -> str:
    if value not in NOPE_ROTATION:
        raise UserError(f"--nope-rotation {value}: expected one of {', '.join(NOPE_ROTATION)}")
    return value


def _rotate_half(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def distance_profile(hidden: np.ndarray, layer: dict, config: ModelConfig,
                     windows: Optional[int] = None) -> np.ndarray:
    """[H, S]: the mean over queries of the attention probability each head puts at distance Δ.

    ``hidden`` are a layer's inputs (before its RMSNorm), [n, S, D]; the first ``windows`` windows
    are used (default: ``PROFILE_TOKENS``' worth).  Causal source attention with the source RoPE; every
    query's row sums to 1.
    """
    from .calibration import rms_normed

    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    windows = windows or max(1, PROFILE_TOKENS // hidden.shape[1])
    sample = np.asarray(hidden[:windows], np.float32)
    count, length = sample.shape[:2]
    inv_freq, factor = inverse_frequencies(config, length)
    cos, sin = cos_sin(inv_freq, np.arange(length), factor)
    rows, cols = np.tril_indices(length)
    future = np.triu(np.full((length, length), -np.inf, np.float32), 1)
    mass = np.zeros((heads, len(rows)))
    for window in sample:
        x = rms_normed(window, layer["input_layernorm.weight"], config.rms_norm_eps)
        q = x @ np.asarray(layer["self_attn.q_proj.weight"], np.float32).T
        k = x @ np.asarray(layer["self_attn.k_proj.weight"], np.float32).T
        if "self_attn.q_proj.bias" in layer:
            q = q + layer["self_attn.q_proj.bias"]
            k = k + layer["self_attn.k_proj.bias"]
        q = _rotate_half(q.reshape(length, heads, dim).transpose(1, 0, 2), cos, sin)
        k = _rotate_half(k.reshape(length, kv_heads, dim).transpose(1, 0, 2), cos, sin)
        k = np.repeat(k, heads // kv_heads, axis=0)
        scores = q @ k.transpose(0, 2, 1) / np.float32(np.sqrt(dim)) + future
        weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        weights /= weights.sum(axis=-1, keepdims=True)
        mass += weights[:, rows, cols]
    profile = np.stack([np.bincount(rows - cols, weights=m, minlength=length) for m in mass])
    return profile / (count * length)


def rotation_profile(config: ModelConfig, nope_rotation: str, rope_all: bool, hidden: np.ndarray,
                     layer: dict) -> Optional[np.ndarray]:
    """The profile a layer's statistics carry for ``--nope-rotation`` (None: TransMLA's Δ = 0 layer).
    ``auto`` is resolved to ``mean`` or ``none`` before any layer is converted (``search.choose_nope_rotation``)."""
    if nope_rotation not in ("mean", "none"):
        raise ValueError(f"nope_rotation {nope_rotation!r} must be resolved to mean or none first")
    return distance_profile(hidden, layer, config) if nope_rotation == "mean" and not rope_all else None


def expected_rotation(profile: np.ndarray, config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """(c̄, s̄), each [H, head_dim/2]: ``Σ_Δ p_h(Δ) cos/sin(θ_jΔ)`` times the RoPE attention factor²."""
    length = profile.shape[1]
    inv_freq, factor = inverse_frequencies(config, length)
    angles = np.arange(length)[:, None] * inv_freq.astype(np.float64)[None]
    scale = float(factor) ** 2  # the source scores carry the cos/sin factor once from q and once from k
    return scale * profile @ np.cos(angles), scale * profile @ np.sin(angles)


def nope_query_map(profile: Optional[np.ndarray], config: ModelConfig):
    """head → (c̄_h, s̄_h), or None (TransMLA's Δ = 0) without a profile."""
    if profile is None:
        return None
    cbar, sbar = expected_rotation(np.asarray(profile, np.float64), config)
    return lambda head: (cbar[head], sbar[head])
