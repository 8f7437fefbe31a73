"""Calibration and evaluation text from the formats users hold: plain text, JSON Lines, Parquet.

Every command that reads a text corpus as one token stream (``convert --calib/--search-data/
--eval-data``, ``eval ppl``, ``analyze``, training data) goes through :func:`read_text`:

* ``.jsonl`` — one JSON object per line; the string field ``text_field`` of each;
* ``.parquet`` — the string column ``text_field`` (needs pyarrow: ``pip install 'mindyouzhi[parquet]'``);
* anything else (``.txt``, ``wiki.valid.tokens``, ``wiki.test.raw``) — the whole file as UTF-8.

Records become one stream by :func:`join_records`.  Hugging Face's line-based datasets (the
``text`` builder, WikiText) store one *line* per row with its newline kept and a blank line as
an empty row, so their rows are concatenated back into the original file — the parquet export of
``wikitext-2-raw-v1`` test gives ``wiki.test.raw`` byte for byte.  Rows that are whole documents
(no trailing newline) are separated by a blank line.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from mindyouzhi.errors import UserError

DEFAULT_TEXT_FIELD = "text"
RECORD_SUFFIXES = (".jsonl", ".parquet")


def join_records(rows: Sequence[Optional[str]]) -> str:
    """One text stream from the text of each record (``None`` = a missing value, read as empty)."""
    rows = [row or "" for row in rows]
    filled = [row for row in rows if row]
    if filled and all(row.endswith("\n") for row in filled):
        # WikiText starts every line with a space, its blank lines included (" \n"): restoring
        # them exactly keeps the tokenization, and so the perplexity, equal to the raw file's.
        blank = " \n" if all(row.startswith(" ") for row in filled) else "\n"
        return "".join(row or blank for row in rows)
    return "\n\n".join(filled)


def _check_field(text_field: str) -> None:
    if not text_field:
        raise UserError("--text-field: must name a field/column, e.g. text")


def _jsonl_rows(path: Path, flag: str, text_field: str) -> list[str]:
    rows = []
    for number, line in enumerate(_utf8(path, flag).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{flag} {path}: line {number}: invalid JSON ({exc.msg})") from None
        except RecursionError:
            raise UserError(f"{flag} {path}: line {number}: JSON nested too deeply") from None
        value = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise UserError(f"{flag} {path}: line {number}: expected an object with a string field "
                            f"{text_field!r} (choose the field with --text-field)")
        rows.append(value)
    return rows


def _parquet_rows(path: Path, flag: str, text_field: str) -> list[Optional[str]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{flag} {path}: reading .parquet needs pyarrow: pip install 'mindyouzhi[parquet]'") from None
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{flag} {path}: not a readable Parquet file ({exc})") from None
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise UserError(f"{flag} {path}: no column {text_field!r} (columns: {', '.join(columns)}); "
                        "choose one with --text-field")
    column_type = parquet.schema_arrow.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise UserError(f"{flag} {path}: column {text_field!r} holds {column_type}, expected strings")
    return parquet.read(columns=[text_field]).column(text_field).to_pylist()


def _utf8(path: Path, flag: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{flag} {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if "\x00" in text:  # valid UTF-8, but no text corpus holds NUL bytes: a binary or damaged file
        raise UserError(f"{flag} {path}: binary data (NUL byte at character {text.index(chr(0))}), expected text")
    return text


def _records(path: str | Path, flag: str, text_field: str) -> tuple[Path, Optional[list[Optional[str]]]]:
    """The checked path, and its records for ``.jsonl``/``.parquet`` (None for plain text)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: file not found")
    suffix = path.suffix.lower()
    if suffix not in RECORD_SUFFIXES:
        return path, None
    _check_field(text_field)
    return path, (_jsonl_rows if suffix == ".jsonl" else _parquet_rows)(path, flag, text_field)


def read_text(path: str | Path, flag: str = "--data", text_field: str = DEFAULT_TEXT_FIELD) -> str:
    """The corpus at ``path`` as one string (see the module docstring for the formats)."""
    path, rows = _records(path, flag, text_field)
    if rows is None:
        return _utf8(path, flag)
    text = join_records(rows)
    if not text.strip():
        raise UserError(f"{flag} {path}: no text in field {text_field!r}")
    return text


def read_rows(path: str | Path, flag: str = "--data", text_field: str = DEFAULT_TEXT_FIELD) -> list[str]:
    """The corpus as its natural units, blank ones dropped: the lines of a text file (newline kept,
    as Hugging Face's line-based datasets store them), the records of ``.jsonl``/``.parquet``."""
    path, rows = _records(path, flag, text_field)
    if rows is None:
        rows = _utf8(path, flag).splitlines(keepends=True)
    return [row for row in rows if row and row.strip()]


def token_stream(tokenizer, path: str | Path, flag: str = "--data", text_field: str = DEFAULT_TEXT_FIELD) -> np.ndarray:
    """The corpus tokenized as one stream, without special tokens."""
    return np.asarray(tokenizer.encode(read_text(path, flag, text_field)), dtype=np.int32)
