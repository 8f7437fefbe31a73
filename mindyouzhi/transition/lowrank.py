"""Stage 2: compress the full latent [K_nope ; V] of a stage-1 layer to ``kv_lora_rank`` dims.

Input is any full-latent MLA attention whose latent ``c = A [x;1]`` (``A = [W_kv_a | b]``, width
``n``) is read by per-head up-projections ``k_h = B_k,h c`` and ``v_h = B_v,h c`` (``kv_b_proj``).
With ``G`` the layer's augmented input Gram from the stage-1 model, ``Σ = A G Aᵀ`` is the latent
second moment.  Every method here keeps a rank-``r`` down-projection ``D`` (``r × n``) and the
least-squares up-projection ``U = Σ Dᵀ (D Σ Dᵀ)⁻¹``, and chooses ``D`` to minimise
``E (c − U D c)ᵀ M (c − U D c)`` for a method-specific metric ``M`` on the latent:
``D = W_rᵀ M^½`` with ``W_r`` the top eigenvectors of ``M^½ Σ M^½``.

* ``bkv`` — TransMLA: ``M`` scales the key block by ``1/α²`` with α = mean key column norm / mean
  value column norm, so neither block dominates the PCA.
* ``output`` — what the layer computes, not the latent: a key error matters through the scores
  ``q_h·k_h/√d`` (``M_K = Σ_h B_k,hᵀ E[q_h q_hᵀ] B_k,h / d``, the queries' second moment from the
  same Gram), a value error through ``W_o`` (``M_V = Σ_h B_v,hᵀ W_o,hᵀ W_o,h B_v,h``).  A score
  error δs moves the head's output by about δs times the spread of its projected values, so the
  key block is weighted by each head's ``E‖W_o,h (v_h − v̄_h)‖²`` times ``key_weight`` (chosen on
  validation text, see docs/BENCHMARKS.md).
* ``care`` — covariance-aware factorisation of the map x → per-head [k_h ; v_h] (SVD of the
  weights whitened by the input covariance, then unwhitened): ``M = kv_bᵀ kv_b``.

At full rank ``D`` is invertible, ``U = D⁻¹`` and the layer is reproduced exactly (tested).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from mindyouzhi.errors import UserError

from .rorope import augmented, descending_eigh

LOWRANK_METHODS = ("output", "bkv", "care")
DEFAULT_LOWRANK = "output"
DEFAULT_KEY_WEIGHT = 1.0


@dataclass(frozen=True)
class HeadGeometry:
    """How ``q_proj``/``kv_b_proj``/``o_proj`` rows split into heads."""

    num_heads: int
    qk_nope_dim: int  # per-head position-free query/key width (0 in the RoPE-everywhere exactness mode)
    qk_rope_dim: int
    v_head_dim: int


def _psd_sqrt(matrix: np.ndarray, floor: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
    """(M^½, M^-½) of a symmetric PSD matrix, eigenvalues floored relative to the largest."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    values = np.clip(values, values.max() * floor if values.max() > 0 else floor, None)
    root = np.sqrt(values)
    return (vectors * root) @ vectors.T, (vectors / root) @ vectors.T


def bkv_alpha(moment: np.ndarray, nope_latent: int) -> float:
    """TransMLA's balance: mean key column norm over mean value column norm (1 without both blocks)."""
    norms = np.sqrt(np.clip(np.diag(moment), 0, None))
    if 0 < nope_latent < len(norms) and norms[nope_latent:].mean() > 0:
        return float(norms[:nope_latent].mean() / norms[nope_latent:].mean())
    return 1.0


def _head_blocks(attn: dict, geometry: HeadGeometry):
    """Per head: (query rows [nope], key up-projection B_k,h, value up-projection B_v,h, W_o,h)."""
    q = augmented(attn["q_proj.weight"], attn.get("q_proj.bias"))
    kv_b = np.asarray(attn["kv_b_proj.weight"], np.float64)
    o = np.asarray(attn["o_proj.weight"], np.float64)
    nope, rope, v_dim = geometry.qk_nope_dim, geometry.qk_rope_dim, geometry.v_head_dim
    q_rows, kv_rows = nope + rope, nope + v_dim
    for h in range(geometry.num_heads):
        yield (q[h * q_rows:h * q_rows + nope], kv_b[h * kv_rows:h * kv_rows + nope],
               kv_b[h * kv_rows + nope:(h + 1) * kv_rows], o[:, h * v_dim:(h + 1) * v_dim])


def output_metric(attn: dict, latent_rows: np.ndarray, gram: np.ndarray, geometry: HeadGeometry,
                  key_weight: float) -> np.ndarray:
    """``M = key_weight · Σ_h s_h B_k,hᵀ C_q,h B_k,h / d + Σ_h B_v,hᵀ W_o,hᵀ W_o,h B_v,h``."""
    n = latent_rows.shape[0]
    metric = np.zeros((n, n))
    count = gram[-1, -1]
    mean_x = gram[-1] / max(count, 1.0)  # augmented input mean (last entry 1)
    centred = gram / max(count, 1.0) - np.outer(mean_x, mean_x)
    scale = 1.0 / (geometry.qk_nope_dim + geometry.qk_rope_dim)
    latent_cov = latent_rows @ centred @ latent_rows.T  # the latent's covariance, shared by every head
    for q_nope, b_k, b_v, w_o in _head_blocks(attn, geometry):
        value_metric = b_v.T @ (w_o.T @ w_o) @ b_v
        # tr(V C Vᵀ) for V = W_o B_v L (x ↦ this head's value as seen by the residual stream)
        spread = float(np.sum(latent_cov * value_metric))
        metric += value_metric
        if len(q_nope):
            query_moment = q_nope @ gram @ q_nope.T / max(count, 1.0)
            metric += key_weight * spread * scale * (b_k.T @ query_moment @ b_k)
    return metric


def latent_metric(method: str, attn: dict, latent_rows: np.ndarray, moment: np.ndarray, gram: np.ndarray,
                  nope_latent: int, geometry: HeadGeometry, key_weight: float) -> tuple[np.ndarray, dict]:
    n = latent_rows.shape[0]
    if method == "bkv":
        alpha = bkv_alpha(moment, nope_latent)
        weights = np.ones(n)
        weights[:nope_latent] = 1.0 / alpha ** 2
        return np.diag(weights), {"alpha": alpha}
    if method == "care":
        kv_b = np.asarray(attn["kv_b_proj.weight"], np.float64)
        return kv_b.T @ kv_b, {}
    if method == "output":
        return output_metric(attn, latent_rows, gram, geometry, key_weight), {"key_weight": key_weight}
    raise UserError(f"--lowrank {method}: expected one of {', '.join(LOWRANK_METHODS)}")


def stage2_attention(attn: dict[str, np.ndarray], nope_latent: int, rope_width: int, gram: np.ndarray,
                     rank: Optional[int], geometry: HeadGeometry, method: str = DEFAULT_LOWRANK,
                     key_weight: float = DEFAULT_KEY_WEIGHT, hidden_states: Optional[np.ndarray] = None,
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
    metric, info = latent_metric(method, attn, latent_rows, moment, gram, nope_latent, geometry, key_weight)
    root, _ = _psd_sqrt(metric)
    values, basis = descending_eigh(root @ moment @ root)
    down = basis[:, :rank].T @ root
    # Least-squares up-projection: the best reconstruction of the full latent from the kept one.  When
    # the rank exceeds what calibration data reach (latent components that are zero on every input)
    # the kept moment is singular and a solver returns noise: then by SVD.
    kept_moment = down @ moment @ down.T
    if np.linalg.cond(kept_moment) < 1e12:
        up = np.linalg.solve(kept_moment.T, (moment @ down.T).T).T
    else:
        up = np.linalg.lstsq(kept_moment.T, (moment @ down.T).T, rcond=None)[0].T
    new_kv_a = np.concatenate([down @ latent_rows, pe_rows])
    out = dict(attn)
    out["kv_a_proj_with_mqa.weight"] = new_kv_a[:, :-1]
    if "kv_a_proj_with_mqa.bias" in attn:
        out["kv_a_proj_with_mqa.bias"] = new_kv_a[:, -1]
    out["kv_b_proj.weight"] = np.asarray(attn["kv_b_proj.weight"], np.float64) @ up
    total = float(np.clip(values, 0, None).sum())
    info.update({"method": method, "rank": rank, "full_rank": old_rank,
                 "energy_kept": float(np.clip(values[:rank], 0, None).sum() / total) if total > 0 else 1.0})
    if hidden_states is not None:
        out["kv_a_layernorm.weight"] = latent_norm_scale(hidden_states, new_kv_a[:rank], eps)
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
