"""Stage 1: merge the KV heads, RoRoPE with FreqFold, and express the layer as full-latent MLA.

Notation (``transmla-notes.md`` §4, §12): rows of ``W_k`` are (KV head g, coordinate i) with the
rotate-half pairing (re_j = i < J, im_j = i ≥ J).  For each fold group we take the uncentred
second moment of the group's re- and im-coordinates over calibration tokens, computed from the
layer's augmented input Gram matrix ``G = Σ [x;1][x;1]ᵀ`` (so no activations are stored), and
rotate with its eigenvectors.  The result is an orthogonal ``L × L`` map ``R`` on the merged key
(L = n_kv·d_h) whose first ``rope_dim`` rows (rotate-half order: re of pairs, then im of pairs)
keep RoPE and whose other rows become position-free.

The stage-1 layer is written as an MLA layer whose latent is ``[R_nope·k ; v]`` (width
``2L − rope_dim``): exactly the partial-RoPE model, and the input format of stage 2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .folds import fold_groups


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


def rorope_rotation(k_aug: np.ndarray, gram: np.ndarray, num_kv_heads: int, head_dim: int, rope_dim: int, fold: int,
                    rope_all: bool = False) -> tuple[np.ndarray, int]:
    """The orthogonal map R (rows: RoPE re, RoPE im, then NoPE) and the RoPE width."""
    half = head_dim // 2
    latent = num_kv_heads * head_dim
    groups = fold_groups(head_dim, rope_dim, fold, num_kv_heads, rope_all)
    pairs = sum(len(g.pairs) for g in groups)
    rope_re = [None] * pairs
    rope_im = [None] * pairs
    nope = []
    for group in groups:
        re_rows = np.array([g * head_dim + j for g in range(num_kv_heads) for j in group.frequencies])
        im_rows = re_rows + half
        k_re, k_im = k_aug[re_rows], k_aug[im_rows]
        second_moment = k_re @ gram @ k_re.T + k_im @ gram @ k_im.T
        _, basis = descending_eigh(second_moment)
        for t in range(basis.shape[1]):
            re_row = np.zeros(latent)
            im_row = np.zeros(latent)
            re_row[re_rows] = basis[:, t]
            im_row[im_rows] = basis[:, t]
            if t < len(group.pairs):
                rope_re[group.pairs[t]], rope_im[group.pairs[t]] = re_row, im_row
            else:
                nope.extend((re_row, im_row))
    assert all(r is not None for r in rope_re), "every RoPE pair must be fed by exactly one component"
    rotation = np.stack(rope_re + rope_im + nope)
    return rotation, 2 * pairs


def stage1_attention(attn: dict[str, np.ndarray], gram: np.ndarray, num_heads: int, num_kv_heads: int, head_dim: int,
                     rope_dim: int, fold: int, rope_all: bool = False) -> Stage1Result:
    """Convert one GQA attention (local tensor names) into its full-latent MLA form."""
    groups = num_heads // num_kv_heads
    latent = num_kv_heads * head_dim
    has_bias = "q_proj.bias" in attn
    k_aug = augmented(attn["k_proj.weight"], attn.get("k_proj.bias"))
    v_aug = augmented(attn["v_proj.weight"], attn.get("v_proj.bias"))
    q_aug = augmented(attn["q_proj.weight"], attn.get("q_proj.bias"))
    rotation, rope_width = rorope_rotation(k_aug, gram, num_kv_heads, head_dim, rope_dim, fold, rope_all)
    rot_rope, rot_nope = rotation[:rope_width], rotation[rope_width:]
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
            q_rows.append(q_scale * q_h)
        q_rows.append(q_scale * (rot_rope[:, cols] @ q_h))
        k_up = np.zeros((nope_dim, nope_latent + latent))
        if nope_dim:
            k_up[:, :nope_latent] = rot_nope[:, cols].T
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
