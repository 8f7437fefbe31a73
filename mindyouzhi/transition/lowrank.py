"""Stage 2: BKV balancing and joint PCA of [K_nope ; V] into a ``kv_lora_rank`` latent.

Input is any full-latent MLA attention whose latent is [position-free keys (``nope_latent``
dims) ; values].  With ``G`` the layer's augmented input Gram from the stage-1 model, the latent
second moment is ``H = A G Aᵀ`` for ``A = [W_kv_a | b]``.  BKV scales the key block by ``1/α``
with α = mean key column norm / mean value column norm so that neither block dominates the PCA;
the top ``rank`` eigenvectors ``R_r`` of the balanced moment give the new down-projection
``R_rᵀ S A`` and up-projection ``W_kv_b S⁻¹ R_r``.  At full rank ``R`` is orthogonal and the layer
is reproduced exactly.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from mindyouzhi.errors import UserError

from .rorope import augmented, descending_eigh


def max_rank(nope_latent_plus_values: int) -> int:
    return nope_latent_plus_values


def stage2_attention(attn: dict[str, np.ndarray], nope_latent: int, rope_width: int, gram: np.ndarray,
                     rank: Optional[int], hidden_states: Optional[np.ndarray] = None,
                     eps: float = 1e-6) -> tuple[dict[str, np.ndarray], dict]:
    """Truncate a full-latent MLA attention to ``rank`` (None = keep the full width).

    ``hidden_states`` (normed layer inputs of the stage-1 model, [N, D]) are needed only for the
    latent RMSNorm initialisation; with them a ``kv_a_layernorm.weight`` is added whose
    per-dimension scale makes the norm the identity on calibration data in the least-squares sense.
    """
    kv_a = augmented(attn["kv_a_proj_with_mqa.weight"], attn.get("kv_a_proj_with_mqa.bias"))
    old_rank = kv_a.shape[0] - rope_width
    rank = old_rank if rank is None else int(rank)
    if not 0 < rank <= old_rank:
        raise UserError(f"--kv-lora-rank {rank}: must be between 1 and {old_rank} (the full latent width) for this model")
    latent_rows, pe_rows = kv_a[:old_rank], kv_a[old_rank:]
    moment = latent_rows @ gram @ latent_rows.T
    norms = np.sqrt(np.clip(np.diag(moment), 0, None))
    alpha = 1.0
    if 0 < nope_latent < old_rank and norms[nope_latent:].mean() > 0:
        alpha = float(norms[:nope_latent].mean() / norms[nope_latent:].mean())
    scale = np.ones(old_rank)
    scale[:nope_latent] = 1.0 / alpha
    values, basis = descending_eigh(scale[:, None] * moment * scale[None, :])
    kept = basis[:, :rank]
    down = kept.T @ (scale[:, None] * latent_rows)
    up = np.asarray(attn["kv_b_proj.weight"], np.float64) @ ((1.0 / scale)[:, None] * kept)
    new_kv_a = np.concatenate([down, pe_rows])
    out = dict(attn)
    out["kv_a_proj_with_mqa.weight"] = new_kv_a[:, :-1]
    if "kv_a_proj_with_mqa.bias" in attn:
        out["kv_a_proj_with_mqa.bias"] = new_kv_a[:, -1]
    out["kv_b_proj.weight"] = up
    total = float(np.clip(values, 0, None).sum())
    info = {"alpha": alpha, "rank": rank, "full_rank": old_rank,
            "energy_kept": float(np.clip(values[:rank], 0, None).sum() / total) if total > 0 else 1.0}
    if hidden_states is not None:
        out["kv_a_layernorm.weight"] = latent_norm_scale(hidden_states, down, eps)
    return out, info


def latent_norm_scale(hidden_states: np.ndarray, down_aug: np.ndarray, eps: float) -> np.ndarray:
    """w minimising Σ_t ‖c_t − w ⊙ c_t / rms(c_t)‖² over calibration tokens (per dimension)."""
    numerator = np.zeros(down_aug.shape[0])
    denominator = np.zeros(down_aug.shape[0])
    for start in range(0, hidden_states.shape[0], 4096):
        x = np.asarray(hidden_states[start:start + 4096], np.float64)
        latent = x @ down_aug[:, :-1].T + down_aug[:, -1]
        inv_rms = 1.0 / np.sqrt((latent ** 2).mean(axis=1, keepdims=True) + eps)
        numerator += (latent ** 2 * inv_rms).sum(0)
        denominator += (latent ** 2 * inv_rms ** 2).sum(0)
    return numerator / np.maximum(denominator, 1e-30)
