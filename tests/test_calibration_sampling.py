"""Calibration windows: row-start sampling (the default for files) and its fallback to slots."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from mindyouzhi.errors import UserError
from mindyouzhi.textdata import read_rows
from mindyouzhi.transition.calibration import RowsExhausted, calibration_windows, row_windows, text_windows


class CharTokenizer:
    """One id per character: a window decodes back to exactly the text it was cut from."""

    @staticmethod
    def encode(text: str) -> list[int]:
        return [ord(c) for c in text]


def decode(ids) -> str:
    return "".join(chr(int(i)) for i in ids)


def numbered_rows(count: int, width: int = 30) -> list[str]:
    return [f"<{i:04d}>" + "x" * (width - 7) + "\n" for i in range(count)]


def test_every_window_starts_at_a_row_and_rows_are_never_shared():
    rows = numbered_rows(400)
    windows = row_windows(CharTokenizer(), rows, 20, 64, seed=3, path="rows.txt", flag="--calib")
    assert windows.shape == (20, 64) and windows.dtype == np.int32
    seen: set[int] = set()
    for window in windows:
        text = decode(window)
        first = re.match(r"<(\d{4})>", text)
        assert first, f"window does not start at a row: {text[:12]!r}"
        start = int(first.group(1))
        # the window is the consecutive rows from there, joined by a blank line
        expected = "\n\n".join(rows[start:start + 5])[:64]
        assert text == expected
        covered = {int(n) for n in re.findall(r"<(\d{4})>", text)}
        assert not covered & seen, "a row was used by two windows"
        seen |= covered


def test_row_sampling_is_seeded():
    rows = numbered_rows(300)
    a = row_windows(CharTokenizer(), rows, 10, 64, seed=1, path="r", flag="--calib")
    b = row_windows(CharTokenizer(), rows, 10, 64, seed=1, path="r", flag="--calib")
    c = row_windows(CharTokenizer(), rows, 10, 64, seed=2, path="r", flag="--calib")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_too_few_rows_is_refused_by_name_and_auto_falls_back_to_slots(tmp_path):
    path = tmp_path / "one_line.txt"
    path.write_text("word " * 5000 + "\n", encoding="utf-8")
    with pytest.raises(RowsExhausted, match=r"--calib .*one_line.txt: 1 rows give only 1 windows .* --calib-sampling slots"):
        text_windows(CharTokenizer(), path, 64 * 10, 64, 0, "--calib", sampling="rows")
    windows, how = calibration_windows(CharTokenizer(), path, 64 * 10, 64, 0, None)
    assert windows.shape == (10, 64) and how.startswith("slots")
    windows, how = calibration_windows(CharTokenizer(), path, 64 * 10, 64, 0, "slots")
    assert how == "slots"
    with pytest.raises(UserError, match="--calib-sampling bogus: expected one of rows, slots"):
        text_windows(CharTokenizer(), path, 640, 64, 0, "--calib", sampling="bogus")


def test_auto_uses_rows_when_the_file_has_them(tmp_path):
    path = tmp_path / "many.txt"
    path.write_text("".join(numbered_rows(200)) + " \n", encoding="utf-8")
    windows, how = calibration_windows(CharTokenizer(), path, 64 * 8, 64, 5, None)
    assert how == "rows"
    assert all(decode(w).startswith("<") for w in windows)


def test_read_rows_keeps_line_ends_drops_blank_lines_and_reads_records(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" = Title = \n \n First paragraph .\n\n Second .\n", encoding="utf-8")
    assert read_rows(text, "--calib") == [" = Title = \n", " First paragraph .\n", " Second .\n"]
    records = tmp_path / "r.jsonl"
    records.write_text("\n".join(json.dumps({"body": b}) for b in ["doc one", "", "doc two"]) + "\n", encoding="utf-8")
    assert read_rows(records, "--calib", "body") == ["doc one", "doc two"]
    with pytest.raises(UserError, match="--calib .*missing.txt: file not found"):
        read_rows(tmp_path / "missing.txt", "--calib")
