"""Fidelity of a student (converted / trained) model to its teacher (the original): token-level KL.

Perplexity only sees the probability of the one observed token; two models with equal perplexity
can disagree everywhere else.  Here both models read the same token windows and, at every
position, we measure KL(teacher ‖ student) between their full next-token distributions and whether
their greedy (top-1) predictions agree, also broken down by position in the window — errors from a
compressed KV cache tend to grow with the distance attended over.

Data: a plain-text file is tokenized as one stream and cut into non-overlapping windows of
``seq_len`` tokens exactly as ``eval ppl`` does (same code, no special tokens, a trailing partial
window dropped), so ``teacher_ppl`` here equals ``eval ppl`` of the teacher at the same
``seq_len``; a ``.jsonl`` file gives one sequence per record's ``text`` (cut to ``seq_len``).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from mindyouzhi.errors import UserError

from . import DEFAULT_KL_SEQ_LEN as DEFAULT_SEQ_LEN
from .lm import LanguageModel, Tokenizer, progress
from .ppl import token_stream, windows
from .tasks.base import data_error, read_text, require_file

_ROW_CHUNK = 64  # rows converted to float64 at a time: [64, vocab] instead of [seq_len, vocab]


def default_bucket_edges(seq_len: int) -> list[int]:
    """0, 16, 64, 256, 1024, … below ``seq_len``: early positions are few but most sensitive."""
    edges, edge = [0], 16
    while edge < seq_len:
        edges.append(edge)
        edge *= 4
    return edges


def parse_bucket_edges(spec: str, seq_len: int) -> list[int]:
    try:
        inner = sorted({int(part) for part in spec.split(",") if part.strip()})
    except ValueError:
        raise UserError(f"--buckets {spec!r}: expected comma-separated positions such as 16,64,256") from None
    if any(edge <= 0 or edge >= seq_len for edge in inner):
        raise UserError(f"--buckets {spec!r}: every boundary must be between 1 and seq_len-1 ({seq_len - 1})")
    return [0] + inner


def read_sequences(path: Path, tokenizer: Tokenizer, seq_len: int, max_windows: Optional[int] = None) -> list[list[int]]:
    path = require_file(path)
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise UserError(f"--max-windows must be at least 1, got {max_windows}")
    if path.suffix != ".jsonl":
        return windows(token_stream(tokenizer, path), seq_len, max_windows, path).tolist()
    sequences: list[list[int]] = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise data_error(path, f"line {number}", f"invalid JSON ({exc.msg})") from None
        except RecursionError:
            raise data_error(path, f"line {number}", "JSON nested too deeply") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str) or not record["text"].strip():
            raise data_error(path, f"line {number}", "expected an object with a non-empty 'text' string")
        sequence = tokenizer.encode(record["text"])[:seq_len]
        if len(sequence) >= 2:  # a single token has no next-token prediction to compare
            sequences.append(sequence)
    sequences = sequences[:max_windows]
    if not sequences:
        raise data_error(path, "", "no record of at least 2 tokens")
    return sequences


def _check_same_tokenizer(teacher: LanguageModel, student: LanguageModel, probe: str) -> None:
    t_vocab, s_vocab = teacher.tokenizer.vocab_size, student.tokenizer.vocab_size
    if t_vocab != s_vocab or teacher.tokenizer.encode(probe) != student.tokenizer.encode(probe):
        raise UserError(
            f"--teacher and --student tokenize differently (vocab {t_vocab} vs {s_vocab}): KL needs the same tokenizer"
        )


def _token_kl(teacher_rows: np.ndarray, student_rows: np.ndarray) -> np.ndarray:
    """KL(p_t ‖ p_s) per row in float64; a token the teacher gives probability 0 contributes 0."""
    out = np.empty(teacher_rows.shape[0])
    for start in range(0, teacher_rows.shape[0], _ROW_CHUNK):
        lp_t = teacher_rows[start : start + _ROW_CHUNK].astype(np.float64)
        lp_s = student_rows[start : start + _ROW_CHUNK].astype(np.float64)
        p_t = np.exp(lp_t)
        with np.errstate(invalid="ignore"):
            out[start : start + _ROW_CHUNK] = np.sum(np.where(p_t > 0, p_t * (lp_t - lp_s), 0.0), axis=-1)
    return out


def compare_models(
    teacher: LanguageModel,
    student: LanguageModel,
    sequences: Sequence[Sequence[int]],
    batch_size: int = 1,
    bucket_edges: Optional[Sequence[int]] = None,
    show_progress: bool = True,
) -> dict:
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    longest = max(len(sequence) for sequence in sequences)
    for model, flag in ((teacher, "--teacher"), (student, "--student")):
        if longest > model.max_seq_len:
            raise UserError(f"--seq-len {longest} exceeds the {flag} model's max_seq_len {model.max_seq_len}")
    edges = list(bucket_edges) if bucket_edges is not None else default_bucket_edges(longest)
    kl_parts, agree_parts, position_parts, nll_t, nll_s = [], [], [], [], []
    started = time.perf_counter()
    bar = progress(len(sequences), "kl" if show_progress else None, "seq")
    try:
        for start in range(0, len(sequences), batch_size):
            batch = [list(sequence) for sequence in sequences[start : start + batch_size]]
            for ids, lp_t, lp_s in zip(batch, teacher.logprobs(batch), student.logprobs(batch)):
                if lp_t.shape != lp_s.shape:
                    raise UserError(f"teacher and student output shapes differ ({lp_t.shape} vs {lp_s.shape}): different vocabularies?")
                kl_parts.append(_token_kl(lp_t, lp_s))
                agree_parts.append(lp_t.argmax(-1) == lp_s.argmax(-1))
                position_parts.append(np.arange(len(ids)))
                targets = np.asarray(ids[1:])
                rows = np.arange(len(targets))
                nll_t.append(-lp_t[rows, targets].astype(np.float64))
                nll_s.append(-lp_s[rows, targets].astype(np.float64))
            bar.update(len(batch))
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    kl, agree, positions = np.concatenate(kl_parts), np.concatenate(agree_parts), np.concatenate(position_parts)
    buckets = []
    for low, high in zip(edges, edges[1:] + [max(longest, edges[-1] + 1)]):
        mask = (positions >= low) & (positions < high)
        if mask.any():
            buckets.append({
                "positions": f"{low}-{high - 1}",
                "tokens": int(mask.sum()),
                "kl_mean": float(kl[mask].mean()),
                "top1_agreement": float(agree[mask].mean()),
            })
    return {
        "windows": len(sequences),
        "tokens": int(kl.size),
        "kl_mean": float(kl.mean()),
        "kl_median": float(np.median(kl)),
        "kl_p99": float(np.percentile(kl, 99)),
        "top1_agreement": float(agree.mean()),
        "teacher_ppl": float(np.exp(np.concatenate(nll_t).mean())),
        "student_ppl": float(np.exp(np.concatenate(nll_s).mean())),
        "buckets": buckets,
        "stats": {"seconds": round(seconds, 3), "tokens_per_second": round(kl.size / seconds, 3) if seconds > 0 else None},
    }


def run_kl(
    teacher: LanguageModel,
    student: LanguageModel,
    data,
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_windows: Optional[int] = None,
    batch_size: int = 1,
    buckets: Optional[str] = None,
    show_progress: bool = True,
) -> dict:
    path = Path(data)
    sequences = read_sequences(path, teacher.tokenizer, seq_len, max_windows)
    probe = teacher.tokenizer.decode(sequences[0][:64])
    _check_same_tokenizer(teacher, student, probe)
    edges = parse_bucket_edges(buckets, seq_len) if buckets else None
    result = compare_models(teacher, student, sequences, batch_size, edges, show_progress=show_progress)
    return {"data": str(path), "seq_len": seq_len, **result}


def format_kl(result: dict) -> str:
    lines = [
        f"KL(teacher‖student) mean {result['kl_mean']:.6f} (median {result['kl_median']:.6f}, p99 {result['kl_p99']:.6f}), "
        f"top-1 agreement {result['top1_agreement']:.4f} over {result['tokens']} tokens in {result['windows']} windows",
        f"  ppl teacher {result['teacher_ppl']:.4f}, student {result['student_ppl']:.4f}",
        "  by position:",
    ]
    for bucket in result["buckets"]:
        lines.append(
            f"    {bucket['positions']:>11}  KL {bucket['kl_mean']:.6f}  top-1 {bucket['top1_agreement']:.4f}  (n={bucket['tokens']})"
        )
    return "\n".join(lines)
