"""FreqFold sizes and the RoPE slice's frequencies: which are legal for a model, and which RoPE pair each fold group feeds.

Conventions (docs/conversion.md §1–2): ``J = head_dim/2`` frequencies per head, ``P = rope_dim/2``
RoPE pairs, collapse ``c = head_dim/rope_dim``.  **Stride** ``s`` (1 ≤ s ≤ c): pair ``p`` of the MLA
RoPE slice rotates with the source frequency ``θ_{s·p}``, so the slice covers the *span* of the
first ``s·P`` frequencies (the fastest ones) and every slower frequency becomes position-free.
``s = c`` (TransMLA's) spreads the pairs over every frequency; ``s = 1`` gives them to the ``P``
fastest.  Either way one standard rotary table of width ``rope_dim`` serves all layers whatever
their fold (base ``θ^{s/c}``, docs/conversion.md §2).

A fold ``f`` groups ``f`` adjacent frequencies of the span into one PCA over ``n_kv·f`` features.
For ``f ≥ s`` (multiples of ``s`` dividing the span) each group keeps its top ``f/s`` components as
RoPE pairs, pair ``p = a·(f/s) + t``.  ``f = 1`` with ``s > 1`` is exact RoRoPE per frequency: only
every ``s``-th frequency contributes its top component (pair ``p = j/s``).  Frequencies beyond the
span form one group that keeps no pair.

Paper labels: the YouZhi figures label folds 1, 2, 4, 8 with 1 = "no folding".  We print our ``f``
next to ``f/s`` (the pairs one group keeps: at TransMLA's stride, the paper's label), and call
``f = 1 < s`` "exact".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from mindyouzhi.errors import UserError

DEFAULT_ROPE_STRIDE = "auto"  # convert's: each stride dividing c scored on the search windows (search.choose_position_layout)


def collapse(head_dim: int, rope_dim: int) -> int:
    if rope_dim <= 0 or rope_dim % 2 or rope_dim > head_dim or head_dim % rope_dim:
        raise UserError(f"--rope-dim {rope_dim}: must be an even divisor of head_dim {head_dim} "
                        f"(e.g. {', '.join(str(head_dim // k) for k in (1, 2, 4) if head_dim // k % 2 == 0)})")
    return head_dim // rope_dim


def rope_stride(head_dim: int, rope_dim: int, stride: Optional[int] = None, flag: str = "--rope-stride") -> int:
    """The stride ``s`` (None: TransMLA's ``c``), checked: 1 ≤ s ≤ c."""
    c = collapse(head_dim, rope_dim)
    if stride is None:
        return c
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= c:
        raise UserError(f"{flag} {stride}: expected an integer from 1 to head_dim/rope_dim = {c} "
                        f"(head_dim {head_dim}, rope_dim {rope_dim})")
    return stride


def legal_folds(head_dim: int, rope_dim: int, include_exact: bool = True, stride: Optional[int] = None) -> list[int]:
    """All legal f for this geometry, ascending (``1`` first when it is an extra candidate)."""
    s = rope_stride(head_dim, rope_dim, stride)
    span = s * rope_dim // 2
    folds = []
    f = s
    while f <= span:
        if span % f == 0:
            folds.append(f)
        f *= 2
    if include_exact and s > 1:
        folds.insert(0, 1)
    return folds


def check_fold(fold: int, head_dim: int, rope_dim: int, flag: str = "--freqfold", stride: Optional[int] = None) -> int:
    folds = legal_folds(head_dim, rope_dim, stride=stride)
    if fold not in folds:
        where = "" if stride in (None, collapse(head_dim, rope_dim)) else f" (RoPE stride {stride})"
        raise UserError(f"{flag} {fold}: illegal fold for head_dim {head_dim} and rope_dim {rope_dim}{where}; "
                        f"legal values: {', '.join(map(str, folds))}")
    return fold


def seed_fold(candidates: Sequence[int], stride: int) -> int:
    """The candidate nearest ``2·s`` on a log scale (the smaller of two equally near): two kept
    frequencies folded into each PCA group whatever the stride.  The position layouts are compared at
    this fold, and the uniform plans are scored outward from it (``search``)."""
    return min(candidates, key=lambda f: (abs(math.log2(f / (2 * stride))), f))


def paper_label(fold: int, head_dim: int, rope_dim: int, stride: Optional[int] = None) -> str:
    """``f/s``: the pairs one group keeps (= the kept frequencies folded into one PCA); "exact" for f = 1 < s."""
    s = rope_stride(head_dim, rope_dim, stride)
    return "exact" if fold == 1 and s > 1 else f"{fold // s}"


@dataclass(frozen=True)
class FoldGroup:
    frequencies: tuple[int, ...]  # source frequency indices j in this PCA group
    pairs: tuple[int, ...]  # RoPE pair index of the group's top components, in eigenvalue order


def fold_groups(head_dim: int, rope_dim: int, fold: int, num_kv_heads: int = 1, rope_all: bool = False,
                stride: Optional[int] = None) -> list[FoldGroup]:
    """Partition of the J frequencies into PCA groups and the RoPE pairs each group feeds.

    ``rope_all`` (exactness mode, ``fold == 1`` only): every component keeps RoPE at its own
    frequency; pair ``p = j·n_kv + t``.
    """
    half = head_dim // 2
    if rope_all:
        if fold != 1:
            raise UserError("RoPE on every component (exactness mode) needs --freqfold 1")
        return [FoldGroup((j,), tuple(j * num_kv_heads + t for t in range(num_kv_heads))) for j in range(half)]
    s = rope_stride(head_dim, rope_dim, stride)
    span = s * rope_dim // 2
    check_fold(fold, head_dim, rope_dim, stride=stride)
    if fold == 1:
        groups = [FoldGroup((j,), (j // s,) if j % s == 0 else ()) for j in range(span)]
    else:
        keep = fold // s
        groups = [FoldGroup(tuple(range(a * fold, (a + 1) * fold)), tuple(a * keep + t for t in range(keep)))
                  for a in range(span // fold)]
    if span < half:  # beyond the span: position-free
        groups.append(FoldGroup(tuple(range(span, half)), ()))
    return groups


def frequency_indices(head_dim: int, rope_dim: int, stride: Optional[int] = None) -> list[int]:
    """The source frequency index ``s·p`` each RoPE pair ``p`` rotates with."""
    s = rope_stride(head_dim, rope_dim, stride)
    return [s * p for p in range(rope_dim // 2)]
