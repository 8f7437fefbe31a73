"""Near-duplicate removal: character n-gram shingles, MinHash signatures, LSH buckets.

Candidates found through the LSH bands are confirmed with the exact Jaccard similarity of their
shingle sets, so the threshold means what it says and band collisions cost nothing but a check.
Hashes are CRC32-based and the permutations come from a seeded generator: the same input gives the
same decisions on every run (Python's ``hash`` is salted per process and is not used).
"""
from __future__ import annotations

import re
import zlib
from typing import Optional

import numpy as np

_PRIME = (1 << 31) - 1  # keeps (a·x + b) inside int64


def normalize(text: str) -> str:
    return re.sub(r"[\s\W_]+", "", text.lower())


def shingles(text: str, size: int = 3) -> set[int]:
    normalized = normalize(text)
    if len(normalized) <= size:
        return {zlib.crc32(normalized.encode("utf-8"))}
    return {zlib.crc32(normalized[i:i + size].encode("utf-8")) for i in range(len(normalized) - size + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class NearDuplicateFilter:
    def __init__(self, threshold: float = 0.7, num_perm: int = 64, bands: int = 16, ngram: int = 3, seed: int = 0):
        if num_perm % bands:
            raise ValueError("num_perm must be a multiple of bands")
        self.threshold = threshold
        self.ngram = ngram
        self.rows = num_perm // bands
        rng = np.random.default_rng(seed)
        self._a = rng.integers(1, _PRIME, size=num_perm, dtype=np.int64)
        self._b = rng.integers(0, _PRIME, size=num_perm, dtype=np.int64)
        self._buckets: list[dict] = [dict() for _ in range(bands)]
        self._sets: list[set] = []

    def signature(self, shingle_set: set[int]) -> np.ndarray:
        values = np.fromiter((value % _PRIME for value in shingle_set), dtype=np.int64, count=len(shingle_set))
        return ((self._a[:, None] * values[None, :] + self._b[:, None]) % _PRIME).min(axis=1)

    def check_and_add(self, text: str) -> Optional[int]:
        """Index of an earlier near-duplicate of ``text`` (then ``text`` is not added), else None."""
        shingle_set = shingles(text, self.ngram)
        signature = self.signature(shingle_set)
        keys = [signature[band * self.rows:(band + 1) * self.rows].tobytes() for band in range(len(self._buckets))]
        candidates = set()
        for bucket, key in zip(self._buckets, keys):
            candidates.update(bucket.get(key, ()))
        for index in sorted(candidates):
            if jaccard(shingle_set, self._sets[index]) >= self.threshold:
                return index
        index = len(self._sets)
        self._sets.append(shingle_set)
        for bucket, key in zip(self._buckets, keys):
            bucket.setdefault(key, []).append(index)
        return None
