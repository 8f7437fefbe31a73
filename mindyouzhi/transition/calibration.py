"""Calibration: seeded token windows, layer-by-layer hidden-state streaming, input Gram matrices.

Every PCA of the conversion is a second moment of a linear function of a layer's normed input x,
so one augmented Gram matrix ``G = Σ_t [x_t;1][x_t;1]ᵀ`` (float64) per layer is all the
statistics we keep.  Hidden states are advanced one layer at a time, so peak memory is one layer's
weights + the calibration hidden states + the Gram matrices, never all activations of all layers.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import numpy as np

from mindyouzhi.errors import UserError
from mindyouzhi.models.config import ModelConfig
from mindyouzhi.models.decoder import RopeTables, layer_function
from mindyouzhi.models.layers import causal_mask, to_tensor
from mindyouzhi.textdata import DEFAULT_TEXT_FIELD, read_rows, token_stream


def sample_windows(tokens: np.ndarray, count: int, seq_len: int, seed: int, path, flag: str) -> np.ndarray:
    """``count`` distinct non-overlapping windows of ``seq_len`` tokens, chosen with ``seed``."""
    slots = len(tokens) // seq_len
    if slots < count:
        raise UserError(f"{flag} {path}: {len(tokens)} tokens, shorter than the requested "
                        f"{count} × {seq_len} = {count * seq_len} tokens")
    chosen = np.sort(np.random.default_rng(seed).choice(slots, size=count, replace=False))
    return np.stack([tokens[s * seq_len:(s + 1) * seq_len] for s in chosen]).astype(np.int32)


# How calibration windows are drawn (docs/conversion.md §4).  "rows": each window starts at the
# beginning of a row (a line of a text file, a record of .jsonl/.parquet) drawn at random, and the
# rows after it are joined with a blank line until the window is full; a row is used at most once
# (the sampling of TransMLA / SliceGPT).  "slots": non-overlapping windows at random offsets of
# the whole file's token stream.  Chosen on validation text, docs/BENCHMARKS.md ("calibration
# draw"): with the output-aware low rank, rows beat slots on each of three seeds (mean −4.5 %).
CALIB_SAMPLING = ("rows", "slots")
DEFAULT_CALIB_SAMPLING = "rows"
ROW_SEPARATOR = "\n\n"


class RowsExhausted(UserError):
    """The corpus has too few rows for the requested row-start windows."""


def row_windows(tokenizer, rows: list[str], count: int, seq_len: int, seed: int, path, flag: str) -> np.ndarray:
    """``count`` windows of ``seq_len`` tokens, each the start of a run of consecutive unused rows."""
    lengths: dict[int, int] = {}  # tokens per row, counted only for rows a window reaches

    def length(index: int) -> int:
        if index not in lengths:
            lengths[index] = len(tokenizer.encode(rows[index]))
        return lengths[index]

    unused = np.ones(len(rows), bool)
    rng = np.random.default_rng(seed)
    windows: list[list[int]] = []
    while len(windows) < count:
        free = np.flatnonzero(unused)
        if len(free) == 0:
            raise RowsExhausted(f"{flag} {path}: {len(rows)} rows give only {len(windows)} windows of {seq_len} tokens "
                                f"starting at a row, {count} requested (fewer --calib-tokens, or --calib-sampling slots)")
        start = end = int(rng.choice(free))
        ids: list[int] = []
        while len(ids) < seq_len and end < len(rows) and unused[end]:
            # extend by the rows the token counts say are needed, then tokenize the joined text once
            budget = 0
            while end < len(rows) and unused[end] and len(ids) + budget < seq_len:
                budget += length(end) + 1
                end += 1
            ids = tokenizer.encode(ROW_SEPARATOR.join(rows[start:end]))
        unused[start:end] = False
        if len(ids) >= seq_len:  # a run cut short by the end of the file or a used row is dropped
            windows.append(ids[:seq_len])
    return np.asarray(windows, np.int32)


def text_windows(tokenizer, path, total_tokens: int, seq_len: int, seed: int, flag: str,
                 text_field: str = DEFAULT_TEXT_FIELD, sampling: str = "slots",
                 tokens_flag: Optional[str] = None) -> np.ndarray:
    """``total_tokens // seq_len`` windows of ``path`` (the flag ``flag``); ``tokens_flag`` names the
    token budget in messages (default: ``--calib-tokens`` for ``--calib``, else ``--search-tokens``)."""
    tokens_flag = tokens_flag or ("--calib-tokens" if flag == "--calib" else "--search-tokens")
    if seq_len < 1:
        raise UserError(f"{tokens_flag.replace('-tokens', '-seq-len')} {seq_len}: must be at least 1")
    if total_tokens < seq_len:
        raise UserError(f"{tokens_flag} {total_tokens}: must be at least one window of {seq_len} tokens")
    if sampling not in CALIB_SAMPLING:
        raise UserError(f"--calib-sampling {sampling}: expected one of {', '.join(CALIB_SAMPLING)}")
    if sampling == "rows":
        return row_windows(tokenizer, read_rows(path, flag, text_field), total_tokens // seq_len, seq_len, seed, path, flag)
    tokens = token_stream(tokenizer, path, flag, text_field)
    return sample_windows(tokens, total_tokens // seq_len, seq_len, seed, path, flag)


def calibration_windows(tokenizer, path, total_tokens: int, seq_len: int, seed: int, sampling: Optional[str],
                        text_field: str = DEFAULT_TEXT_FIELD) -> tuple[np.ndarray, str]:
    """The calibration windows and how they were drawn.  ``sampling=None``: rows when the file has
    enough of them (a one-line corpus has not), else slots."""
    if sampling is not None:
        return text_windows(tokenizer, path, total_tokens, seq_len, seed, "--calib", text_field, sampling), sampling
    try:
        return text_windows(tokenizer, path, total_tokens, seq_len, seed, "--calib", text_field, DEFAULT_CALIB_SAMPLING), \
            DEFAULT_CALIB_SAMPLING
    except RowsExhausted:
        return text_windows(tokenizer, path, total_tokens, seq_len, seed, "--calib", text_field, "slots"), \
            "slots (too few rows for row-start windows)"


def rms_normed(hidden: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    h = np.asarray(hidden, np.float32).reshape(-1, hidden.shape[-1])
    variance = np.einsum("td,td->t", h, h) / np.float32(h.shape[1])  # one pass, no [N, D] temporaries
    out = h * (1.0 / np.sqrt(variance + np.float32(eps)))[:, None]
    out *= np.asarray(weight, np.float32)
    return out


def augmented_gram(normed: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Σ [x;1][x;1]ᵀ over the rows of ``normed`` [N, D], accumulated in float64.

    Each chunk's product runs in float32 (twice the BLAS speed of float64; measured 0.93 s vs 1.93 s
    for 32k × 576 on the 2-core VM) with ≤ 8192 terms per float32 sum, which keeps the relative
    error near 1e-5 — far below the sampling noise of the calibration set."""
    dim = normed.shape[1]
    gram = np.zeros((dim + 1, dim + 1))
    for start in range(0, normed.shape[0], chunk):
        x = np.asarray(normed[start:start + chunk], np.float32)
        gram[:dim, :dim] += x.T @ x
        column = x.sum(0, dtype=np.float64)
        gram[:dim, dim] += column
        gram[dim, :dim] += column
        gram[dim, dim] += x.shape[0]
    return gram


def layer_gram(hidden: np.ndarray, layer_weights: dict, eps: float, keep_normed: bool = False):
    normed = rms_normed(hidden, layer_weights["input_layernorm.weight"], eps)
    gram = augmented_gram(normed)
    return (gram, normed) if keep_normed else (gram, None)


# Tokens per layer call, by precision.  A compiled layer graph keeps its intermediates for the
# life of the process.  fp32 (plain-op attention, scores of every head included), measured on a
# SmolLM2 layer: 8 × 512 tokens per call +867 MB, 2 × 512 +168 MB, at the same speed.  bf16 (the
# fused attention kernel keeps no scores): 2,048 tokens cut the per-call overhead, f4/r96 SmolLM2
# conversion 97 s → 91 s at +0.05 GB peak (docs/BENCHMARKS.md).
LAYER_CALL_TOKENS = {"fp32": 1024, "bf16": 2048}


# The precision of the projections in the conversion's own forward passes — the calibration
# streams and the search's evaluations (docs/conversion.md §4).  "bf16": inputs rounded to
# bfloat16, float32 accumulation (the custom op ops/bf16 — the arithmetic of the peer's bf16
# run, 2–2.5× the fp32 GEMM speed on a CPU with AVX512-BF16); "fp32"; "auto": bf16 where the CPU
# has native bf16 dot products and the kernel builds, else fp32 with a notice.  Only the hidden
# states those passes carry change; Grams, PCAs and the written weights stay float64/float32.
FORWARD_PRECISIONS = ("auto", "bf16", "fp32")
DEFAULT_FORWARD_PRECISION = "auto"


def resolve_forward_precision(choice: str) -> tuple[str, Optional[str]]:
    """(the precision the streams use, why ``auto`` fell back to fp32 — or None)."""
    if choice not in FORWARD_PRECISIONS:
        raise UserError(f"--forward-precision {choice}: expected one of {', '.join(FORWARD_PRECISIONS)}")
    if choice == "fp32":
        return "fp32", None
    from mindyouzhi.ops import bf16, dispatch

    if dispatch.device_target() != "CPU":
        reason = f"the bf16 dense kernel is a CPU kernel (device target {dispatch.device_target()})"
    else:
        reason = bf16.unavailable()
        if reason is None and choice == "auto" and not bf16.native_bf16():
            reason = "this CPU has no native bf16 dot products (avx512_bf16 / amx_bf16)"
    if reason is None:
        return "bf16", None
    if choice == "bf16":
        raise UserError(f"--forward-precision bf16: {reason}")
    return "fp32", reason


class LayerRunner:
    """Advance hidden states [n, T, D] through one decoder layer built from numpy weights (jitted).

    Windows go ``batch_size`` at a time, capped at ``LAYER_CALL_TOKENS[precision]`` tokens per call, and the
    last call is zero-padded to the same shape: one compiled graph per layer kind, of bounded size.
    ``precision`` is that of the projections ("fp32" or "bf16", see ``FORWARD_PRECISIONS``).
    """

    def __init__(self, seq_len: int, batch_size: int = 8, precision: str = "fp32"):
        self.seq_len = seq_len
        self.precision = precision
        self.batch_size = max(1, min(batch_size, LAYER_CALL_TOKENS[precision] // seq_len))
        self._mask = to_tensor(causal_mask(seq_len))
        self.layer_forwards = 0  # tokens·layers processed, for cost accounting

    def cell(self, config: ModelConfig, index: int, weights: dict):
        fn = layer_function(config, index, weights, self.precision)
        cos, sin, mcos, msin = (to_tensor(t) for t in RopeTables(config)(self.seq_len))
        mask = self._mask

        def run(hidden: np.ndarray) -> np.ndarray:
            out = np.empty_like(hidden)
            step = self.batch_size
            for start in range(0, hidden.shape[0], step):
                batch = np.asarray(hidden[start:start + step])
                real = batch.shape[0]
                if real < step:  # zero rows stay zero through RMSNorm; they are dropped below
                    batch = np.concatenate([batch, np.zeros((step - real,) + batch.shape[1:], batch.dtype)])
                out[start:start + real] = fn(to_tensor(batch), cos, sin, mcos, msin, mask).asnumpy()[:real]
            self.layer_forwards += hidden.shape[0]
            return out

        return run

    def run(self, config: ModelConfig, index: int, weights: dict, hidden: np.ndarray) -> np.ndarray:
        return self.cell(config, index, weights)(hidden)


class GramCache:
    """Per-layer Gram matrices and attention-distance profiles, kept in memory or spilled to
    ``directory`` (np.save, read by mmap)."""

    def __init__(self, directory: Optional[Path] = None):
        self.directory = Path(directory) if directory else None
        self._memory: dict[Union[int, str], np.ndarray] = {}  # layer → Gram, "profile_<layer>" → profile

    def __setitem__(self, layer, gram: np.ndarray) -> None:
        if self.directory is None:
            self._memory[layer] = gram
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".npy")
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, gram)
        os.replace(tmp, self._path(layer))

    def __getitem__(self, layer) -> np.ndarray:
        if self.directory is None:
            return self._memory[layer]
        return np.load(self._path(layer), mmap_mode="r")

    def __contains__(self, layer) -> bool:
        if self.directory is None:
            return layer in self._memory
        return self._path(layer).is_file()

    def _path(self, key) -> Path:
        return self.directory / (f"gram_{key:04d}.npy" if isinstance(key, int) else f"{key}.npy")

    # The attention-distance profile of each layer (positions.distance_profile) travels with its Gram.
    def set_profile(self, layer: int, profile: np.ndarray) -> None:
        self[f"profile_{layer}"] = profile

    def profile(self, layer: int) -> Optional[np.ndarray]:
        key = f"profile_{layer}"
        return np.asarray(self[key]) if key in self else None
