"""FreqFold sizes: which are legal for a model, and which RoPE pair each fold group feeds.

Conventions (docs/conversion.md §1–2): ``J = head_dim/2`` frequencies per head, collapse ``c = head_dim/rope_dim``.
A fold ``f`` groups ``f`` adjacent frequencies into one PCA over ``n_kv·f`` features.  For ``f ≥ c``
(TransMLA's sizes: multiples of ``c`` dividing ``J``) each group keeps its top ``f/c`` components
as RoPE pairs, pair ``p = a·(f/c) + t``.  ``f = 1`` with ``c > 1`` is exact RoRoPE per frequency:
only every ``c``-th frequency contributes its top component (pair ``p = j/c``).  In every case
pair ``p`` rotates with the source frequency ``θ_{c·p}``, so one standard rotary table of width
``rope_dim`` serves all layers whatever their fold.

Paper labels: the YouZhi figures label folds 1, 2, 4, 8 with 1 = "no folding".  We print our ``f``
next to ``f/c`` (the number of frequencies merged per kept pair), and call ``f = 1`` "exact".
"""
from __future__ import annotations

from dataclasses import dataclass

from mindyouzhi.errors import UserError


def collapse(head_dim: int, rope_dim: int) -> int:
    if rope_dim <= 0 or rope_dim % 2 or rope_dim > head_dim or head_dim % rope_dim:
        raise UserError(f"--rope-dim {rope_dim}: must be an even divisor of head_dim {head_dim} "
                        f"(e.g. {', '.join(str(head_dim // k) for k in (1, 2, 4) if head_dim // k % 2 == 0)})")
    return head_dim // rope_dim


def legal_folds(head_dim: int, rope_dim: int, include_exact: bool = True) -> list[int]:
    """All legal f for this geometry, ascending (``1`` first when it is an extra candidate)."""
    c = collapse(head_dim, rope_dim)
    half = head_dim // 2
    folds = []
    f = c
    while f <= half:
        if half % f == 0:
            folds.append(f)
        f *= 2
    if include_exact and c > 1:
        folds.insert(0, 1)
    return folds


def check_fold(fold: int, head_dim: int, rope_dim: int, flag: str = "--freqfold") -> int:
    folds = legal_folds(head_dim, rope_dim)
    if fold not in folds:
        raise UserError(f"{flag} {fold}: illegal fold for head_dim {head_dim} and rope_dim {rope_dim}; "
                        f"legal values: {', '.join(map(str, folds))}")
    return fold


def paper_label(fold: int, head_dim: int, rope_dim: int) -> str:
    c = head_dim // rope_dim
    return "exact" if fold == 1 and c > 1 else f"{fold // c}"


@dataclass(frozen=True)
class FoldGroup:
    frequencies: tuple[int, ...]  # source frequency indices j in this PCA group
    pairs: tuple[int, ...]  # RoPE pair index of the group's top components, in eigenvalue order


def fold_groups(head_dim: int, rope_dim: int, fold: int, num_kv_heads: int = 1, rope_all: bool = False) -> list[FoldGroup]:
    """Partition of the J frequencies into PCA groups and the RoPE pairs each group feeds.

    ``rope_all`` (exactness mode, ``fold == 1`` only): every component keeps RoPE at its own
    frequency; pair ``p = j·n_kv + t``.
    """
    half = head_dim // 2
    if rope_all:
        if fold != 1:
            raise UserError("RoPE on every component (exactness mode) needs --freqfold 1")
        return [FoldGroup((j,), tuple(j * num_kv_heads + t for t in range(num_kv_heads))) for j in range(half)]
    c = collapse(head_dim, rope_dim)
    check_fold(fold, head_dim, rope_dim)
    if fold == 1:
        return [FoldGroup((j,), (j // c,) if j % c == 0 else ()) for j in range(half)]
    keep = fold // c
    return [FoldGroup(tuple(range(a * fold, (a + 1) * fold)), tuple(a * keep + t for t in range(keep)))
            for a in range(half // fold)]
