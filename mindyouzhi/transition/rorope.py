"""Stage 1: merge the KV heads, RoRoPE with FreqFold, and express the layer as full-latent MLA.

Notation (docs/conversion.md §1–2): rows of ``W_k`` are (KV head g, coordinate i) with the
rotate-half pairing (re_j = i < J, im_j = i ≥ J).  For each fold group we take the uncentred
second moments of the group's re- and im-coordinates over calibration tokens, computed from the
layer's augmented input Gram matrix ``G = Σ [x;1][x;1]ᵀ`` (so no activations are stored), and
change basis within the group.  The result is an invertible ``L × L`` map ``R`` on the merged key
(L = n_kv·d_h; queries map by ``R⁻ᵀ``, so every score is unchanged) whose first ``rope_dim`` rows
(rotate-half order: re of pairs, then im of pairs) keep RoPE and whose other rows become
position-free.  With the default ``score`` basis R is *not* orthogonal: it diagonalises the key
and query moments together and orders components by score energy; ``--rorope key`` is TransMLA's
orthogonal key PCA (``_group_basis``).

The stage-1 layer is written as an MLA layer whose latent is ``[R_nope·k ; v]`` (width
``2L − rope_dim``): exactly the partial-RoPE model, and the input format of stage 2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from mindyouzhi.errors import UserError

from .folds import fold_groups


def rotate_queries(q_rows: np.ndarray, cbar: np.ndarray, sbar: np.ndarray) -> np.ndarray:
    """``Mᵀ q`` for one head's query rows [head_dim, …] (rotate-half order), M = [[c̄, s̄], [−s̄, c̄]] per pair."""
    half = q_rows.shape[0] // 2
    re, im = q_rows[:half], q_rows[half:]
    return np.concatenate([cbar[:, None] * re - sbar[:, None] * im, sbar[:, None] * re + cbar[:, None] * im])


@dataclass
class Stage1Result:
    attention: dict[str, np.ndarray]  # MLA attention tensors, local names ("q_proj.weight", …)
    nope_latent: int  # the first ``nope_latent`` latent dims carry position-free keys, the rest values
    rope_width: int
    rotation: np.ndarray  # R (L × L), float64


def augmented(weight: np.ndarray, bias) -> np.ndarray:
    """[W | b] in float64 (b = 0 when the projection has no bias)."""
    column = np.zeros((weight.shape[0], 1)) if bias is None else np.asarray(bias, np.float64)[:, None]
    return np.concatenate([np.asarray(weight, np.float64), column], axis=1)


def descending_eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    order = np.argsort(values)[::-1]
    return values[order], vectors[:, order]


RORO_METHODS = ("score", "key")
DEFAULT_RORO = "score"


def _group_basis(key_moment: np.ndarray, query_moment: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(T, T⁻¹) for one fold group; rows of T are the components, most important first.

    ``key`` (TransMLA): T is the eigenbasis of the key second moment (orthogonal, T⁻¹ = Tᵀ), so the
    top components carry the most key energy.  ``score``: T simultaneously diagonalises the key
    moment H_k (to the identity) and the query moment H_q (to Λ): with S = H_k^½ and S H_q S = V Λ Vᵀ,
    T = Vᵀ S⁻¹ and T⁻¹ = S V.  Keys map to ``T k`` and queries to ``T⁻ᵀ q``, so every score is
    unchanged while RoPE is kept, and component t carries λ_t of the score energy E[(q·k)²] — the
    components that keep RoPE are the ones whose positional signal matters most to the scores.
    """
    values, vectors = np.linalg.eigh((key_moment + key_moment.T) / 2)
    if query_moment is None or values.max() <= 0:  # (keys that are zero on calibration data: any basis scores 0)
        _, basis = descending_eigh(key_moment)
        return basis.T, basis
    values = np.clip(values, values.max() * 1e-10, None)
    root = (vectors * np.sqrt(values)) @ vectors.T
    inverse_root = (vectors / np.sqrt(values)) @ vectors.T
    _, basis = descending_eigh(root @ query_moment @ root)
    return basis.T @ inverse_root, root @ basis


def rorope_rotation(k_aug: np.ndarray, gram: np.ndarray, num_kv_heads: int, head_dim: int, rope_dim: int, fold: int,
                    rope_all: bool = False, q_aug: Optional[np.ndarray] = None,
                    heads_per_group: int = 1, stride: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, int]:
    """The map T on the merged key (rows: RoPE re, RoPE im, then NoPE), its inverse, and the RoPE width.

    Without ``q_aug`` T is orthogonal (TransMLA's key PCA); with it (query rows of every head,
    ``heads_per_group`` query heads per KV head) each group's T is the score-energy basis.
    """
    half = head_dim // 2
    latent = num_kv_heads * head_dim
    groups = fold_groups(head_dim, rope_dim, fold, num_kv_heads, rope_all, None if rope_all else stride)
    pairs = sum(len(g.pairs) for g in groups)
    rope_re, rope_im = [None] * pairs, [None] * pairs
    nope = []
    for group in groups:
        re_rows = np.array([g * head_dim + j for g in range(num_kv_heads) for j in group.frequencies])
        im_rows = re_rows + half
        k_re, k_im = k_aug[re_rows], k_aug[im_rows]
        key_moment = k_re @ gram @ k_re.T + k_im @ gram @ k_im.T
        query_moment = None
        if q_aug is not None:
            # a query head of KV group g sees that group's coordinates only: the moment is block-diagonal
            query_moment = np.zeros_like(key_moment)
            width = len(group.frequencies)
            for g in range(num_kv_heads):
                block = slice(g * width, (g + 1) * width)
                for h in range(g * heads_per_group, (g + 1) * heads_per_group):
                    q_re = q_aug[h * head_dim + np.asarray(group.frequencies)]
                    q_im = q_aug[h * head_dim + half + np.asarray(group.frequencies)]
                    query_moment[block, block] += q_re @ gram @ q_re.T + q_im @ gram @ q_im.T
        forward, inverse = _group_basis(key_moment, query_moment)
        for t in range(forward.shape[0]):
            rows = []
            for index in (re_rows, im_rows):
                row, column = np.zeros(latent), np.zeros(latent)
                row[index], column[index] = forward[t], inverse[:, t]
                rows.append((row, column))
            if t < len(group.pairs):
                rope_re[group.pairs[t]], rope_im[group.pairs[t]] = rows
            else:
                nope.extend(rows)
    assert all(r is not None for r in rope_re), "every RoPE pair must be fed by exactly one component"
    ordered = rope_re + rope_im + nope
    return np.stack([r for r, _ in ordered]), np.stack([c for _, c in ordered], axis=1), 2 * pairs


def stage1_attention(attn: dict[str, np.ndarray], gram: np.ndarray, num_heads: int, num_kv_heads: int, head_dim: int,
                     rope_dim: int, fold: int, rope_all: bool = False, method: str = DEFAULT_RORO,
                     nope_queries: Optional[Callable[[int], tuple[np.ndarray, np.ndarray]]] = None,
                     stride: Optional[int] = None) -> Stage1Result:
    """Convert one GQA attention (local tensor names) into its full-latent MLA form.

    ``nope_queries`` (head → (c̄, s̄), see ``positions``) folds the expected relative rotation into
    the position-free query rows; without it they score the keys at Δ = 0 (TransMLA), and the layer
    is exactly the partial-RoPE model.  ``stride``: pair p keeps RoPE at θ_{s·p} (``folds``; None: TransMLA's)."""
    if method not in RORO_METHODS:
        raise UserError(f"--rorope {method}: expected one of {', '.join(RORO_METHODS)}")
    groups = num_heads // num_kv_heads
    latent = num_kv_heads * head_dim
    # q/k/v biases come together (one spec part); write both MLA biases if any exists (the others are zero)
    has_bias = any(f"{proj}.bias" in attn for proj in ("q_proj", "k_proj", "v_proj"))
    k_aug = augmented(attn["k_proj.weight"], attn.get("k_proj.bias"))
    v_aug = augmented(attn["v_proj.weight"], attn.get("v_proj.bias"))
    q_aug = augmented(attn["q_proj.weight"], attn.get("q_proj.bias"))
    rotation, inverse, rope_width = rorope_rotation(k_aug, gram, num_kv_heads, head_dim, rope_dim, fold, rope_all,
                                                    q_aug if method == "score" else None, groups, stride)
    rot_rope, rot_nope = rotation[:rope_width], rotation[rope_width:]
    inv_rope, inv_nope = inverse[:, :rope_width], inverse[:, rope_width:]
    nope_dim = 0 if rope_all else head_dim
    # MLA divides scores by sqrt(nope + rope); the source divides by sqrt(head_dim).
    q_scale = math.sqrt((nope_dim + rope_width) / head_dim)

    q_rows, kv_b_rows = [], []
    nope_latent = latent - rope_width
    for h in range(num_heads):
        g = h // groups
        cols = slice(g * head_dim, (g + 1) * head_dim)
        q_h = q_aug[h * head_dim:(h + 1) * head_dim]
        if nope_dim:
            q_rows.append(q_scale * (rotate_queries(q_h, *nope_queries(h)) if nope_queries else q_h))
        q_rows.append(q_scale * (inv_rope[cols].T @ q_h))
        k_up = np.zeros((nope_dim, nope_latent + latent))
        if nope_dim:
            k_up[:, :nope_latent] = inv_nope[cols]
        v_up = np.zeros((head_dim, nope_latent + latent))
        v_up[np.arange(head_dim), nope_latent + g * head_dim + np.arange(head_dim)] = 1.0
        kv_b_rows.extend((k_up, v_up))
    q_new = np.concatenate(q_rows)
    kv_a = np.concatenate([rot_nope @ k_aug, v_aug, rot_rope @ k_aug])
    out = {
        "q_proj.weight": q_new[:, :-1],
        "kv_a_proj_with_mqa.weight": kv_a[:, :-1],
        "kv_b_proj.weight": np.concatenate(kv_b_rows),
        "o_proj.weight": np.asarray(attn["o_proj.weight"], np.float64),
    }
    if has_bias:
        out["q_proj.bias"] = q_new[:, -1]
        out["kv_a_proj_with_mqa.bias"] = kv_a[:, -1]
    if "o_proj.bias" in attn:
        out["o_proj.bias"] = attn["o_proj.bias"]
    return Stage1Result(out, nope_latent, rope_width, rotation)
