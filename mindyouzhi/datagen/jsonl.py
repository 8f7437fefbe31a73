"""Streaming JSONL input and atomic JSONL output shared by every ``mindyouzhi data`` command.

Input is read line by line in binary mode so that each record's byte offset is known: commands
that must revisit a record later (``data compress``) keep the offset instead of the text.  A line
that is not a JSON object, or that the command's validator rejects, is a ``UserError`` naming the
file and line — or, with ``--skip-bad``, is counted and listed in the report.  Nothing is dropped
without a trace.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional


from ..errors import UserError
from ..io_utils import remove_stale_temporaries
from ..progress import progress_bar

# A validator checks a record and returns whatever the command wants to keep from that check (the
# extracted text, the tags …) as ``Record.parsed``; it raises ValueError with a short reason and the
# reader adds the file and line number.
Validator = Callable[[dict], Any]


@dataclass
class Record:
    line_no: int  # 1-based, as editors show it
    offset: int  # byte offset of the line in the file
    length: int  # byte length of the line including its newline
    data: dict
    parsed: Any = None


@dataclass
class BadLines:
    """Lines skipped under ``--skip-bad``: every one is reported, with the reason."""

    entries: list = field(default_factory=list)

    def add(self, path: Path, line_no: int, reason: str) -> None:
        self.entries.append({"file": str(path), "line": line_no, "error": reason})

    def summary(self) -> dict:
        return {"count": len(self.entries), "lines": self.entries}


def progress(total: Optional[int], desc: str, enabled: bool, unit: str = "it"):
    """The product's progress bar, on when the command's ``show_progress`` says so."""
    return progress_bar(total, desc, unit, enabled=enabled)


def read_jsonl(path: str | os.PathLike, bad_lines: BadLines, skip_bad: bool,
               validate: Optional[Validator] = None, show_progress: bool = False,
               desc: str = "read") -> Iterator[Record]:
    """Yield the JSON objects of ``path`` one by one; blank lines are ignored (they hold no record)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: input file not found")
    offset = 0
    with open(path, "rb") as handle, progress(path.stat().st_size, desc, show_progress, "B") as bar:
        for line_no, raw in enumerate(handle, start=1):
            length = len(raw)
            bar.update(length)
            line_offset, offset = offset, offset + length
            if not raw.strip():
                continue
            try:
                data = parse_line(raw)
                parsed = validate(data) if validate is not None else None
            except ValueError as exc:
                if not skip_bad:
                    raise UserError(f"{path}:{line_no}: {exc} (pass --skip-bad to skip and report such lines)") from None
                bad_lines.add(path, line_no, str(exc))
                continue
            yield Record(line_no, line_offset, length, data, parsed)


def parse_line(raw: bytes) -> dict:
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    return data


def read_record_at(handle, offset: int) -> dict:
    """Re-read one record by its byte offset (the file was validated on the first pass)."""
    handle.seek(offset)
    return parse_line(handle.readline())


def check_output_file(path: str | os.PathLike, overwrite: bool, flag: str = "--out") -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"{flag} {path} already exists; pass --overwrite to replace it")
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory; expected a .jsonl file path")
    return path


class JsonlWriter:
    """Write records to ``<out>.tmp-…`` and rename to ``out`` only when the whole run succeeded."""

    def __init__(self, path: str | os.PathLike, overwrite: bool, flag: str = "--out"):
        self.path = check_output_file(path, overwrite, flag)
        self.count = 0
        self._handle = None
        self._tmp: Optional[str] = None

    def __enter__(self) -> "JsonlWriter":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.path)  # a killed run's NAME.tmp-* (nobody holds it)
        fd, self._tmp = tempfile.mkstemp(prefix=f"{self.path.name}.tmp-", dir=self.path.parent)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held while this run writes it
        self._handle = os.fdopen(fd, "w", encoding="utf-8", newline="\n")
        return self

    def write(self, record: Any) -> None:
        self._handle.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")))
        self._handle.write("\n")
        self.count += 1

    def write_raw_line(self, line: str) -> None:
        self._handle.write(line if line.endswith("\n") else line + "\n")
        self.count += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        self._handle.close()
        if exc_type is None:
            os.replace(self._tmp, self.path)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)
