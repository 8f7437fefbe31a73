"""What a task produces (items the scorer understands) and the file reading every format shares.

A task turns a data path into a list of items.  A ``ChoiceItem`` is scored by comparing the
log-likelihoods of its continuations (or, for lettered questions, by generating and extracting the
answer letters); a ``GenerationItem`` by greedy generation compared against a gold answer.  Items
carry an ``item_id`` naming the file and row they came from, so results can be traced back.

Every data error is a ``UserError`` whose message starts with the file and the row.
"""
from __future__ import annotations

import bz2
import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from mindyouzhi.errors import UserError

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class ChoiceItem:
    item_id: str
    group: str  # subject / category: accuracy is also reported per group
    context: str  # the whole prompt (instruction, few-shot examples, question) up to the answer slot
    choices: tuple[str, ...]  # the continuations compared after ``context``
    labels: tuple[str, ...]  # the answer each continuation stands for ("A", "ABD", "positive")
    gold: int  # index into ``choices``
    letters: tuple[str, ...] = ()  # option letters, for generation scoring; empty when answers are not letters
    # The same prompt with the text to classify replaced by a content-free input ("N/A"): the
    # label prior that ``--scoring calibrated`` subtracts (Zhao et al. 2021).
    calibration_context: Optional[str] = None


@dataclass(frozen=True)
class GenerationItem:
    item_id: str
    group: str
    prompt: str
    gold: Any  # a string (exact match) or a JSON object (exact match + per-field accuracy)
    stop: tuple[str, ...] = ("\n\n",)


Item = Union[ChoiceItem, GenerationItem]


@dataclass(frozen=True)
class TaskOptions:
    shots: int = 0
    limit: Optional[int] = None  # first N questions of each data file
    fewshot_data: Optional[Path] = None  # where few-shot examples come from when not the task's dev split


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "choice" or "generation"
    primary_metric: str
    default_shots: int
    load: Callable[[Path, TaskOptions], list]
    summary: str
    letter_answers: bool = False  # answers are option letters: ``--scoring generate`` is possible
    grouped_by: str = "subject"  # what ``ChoiceItem.group`` / ``GenerationItem.group`` means for this task
    # Generation tasks with their own scoring (IFEval, MATH-500, ...): ``score(response, item)`` → the
    # row's fields; ``aggregate(rows)`` → (metrics, groups, extra).  None: exact match / JSON fields.
    score: Optional[Callable[[str, "GenerationItem"], dict]] = None
    aggregate: Optional[Callable[[Sequence[dict]], tuple]] = None
    group_metric: Optional[str] = None  # the per-group value printed in the summary
    classification: bool = False  # label-word choices: ``--scoring calibrated`` applies


def rate(flags) -> float:
    """The share of true flags, rounded to 6 digits as every aggregate reports it (0.0 when empty)."""
    flags = list(flags)
    return round(sum(map(float, flags)) / len(flags), 6) if flags else 0.0


def by_group(rows: Sequence[dict]) -> dict[str, list[dict]]:
    """Rows per ``group``, groups in sorted order."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    return dict(sorted(groups.items()))


def data_error(path: Union[str, Path], where: str, message: str) -> UserError:
    location = f"{path}: {where}" if where else f"{path}"
    return UserError(f"{location}: {message}")


def require_path(path: Path, flag: str = "--data") -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{flag} {path}: no such file or directory")
    return path


def require_file(path: Path, flag: str = "--data") -> Path:
    path = require_path(path, flag)
    if not path.is_file():
        raise UserError(f"{flag} {path}: expected a file, found a directory")
    return path


def read_bytes(path: Path) -> bytes:
    """File contents, transparently decompressing bz2 / gzip (recognised by their magic bytes)."""
    raw = Path(path).read_bytes()
    try:
        if raw[:3] == b"BZh":
            return bz2.decompress(raw)
        if raw[:2] == b"\x1f\x8b":
            return gzip.decompress(raw)
    except (OSError, ValueError, EOFError) as exc:
        raise data_error(path, "", f"corrupt compressed file ({exc})") from None
    return raw


def read_text(path: Path, fallback_encoding: Optional[str] = None) -> str:
    """UTF-8 text without a BOM; ``fallback_encoding`` is tried when the bytes are not UTF-8.

    The fallback exists for legacy releases such as Financial PhraseBank (latin-1), whose copies in
    circulation are sometimes re-encoded as UTF-8: strict UTF-8 first is safe because latin-1 text
    with accented letters is almost never valid UTF-8.
    """
    raw = read_bytes(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if fallback_encoding is None:
            raise data_error(path, "", f"not UTF-8 text ({exc})") from None
        text = raw.decode(fallback_encoding)
    text = text.lstrip("\ufeff")
    if not text.strip():
        raise data_error(path, "", "empty file")
    return text


def read_json_records(path: Path) -> list[tuple[str, Any]]:
    """Records of a JSON array file or a JSONL file, each with its location ("line 7", "record 3")."""
    text = read_text(path)
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise data_error(path, f"line {exc.lineno}", f"invalid JSON ({exc.msg})") from None
        return [(f"record {index + 1}", record) for index, record in enumerate(records)]
    located = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            located.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise data_error(path, f"line {number}", f"invalid JSON ({exc.msg})") from None
    return located


def require_object(path: Path, where: str, record: Any) -> dict:
    if not isinstance(record, dict):
        raise data_error(path, where, f"expected a JSON object, found {type(record).__name__}")
    return record


def json_objects(path: Path) -> Iterator[tuple[str, dict]]:
    """(location, record) for every record of a JSON array / JSONL file, each checked to be an object."""
    for where, record in read_json_records(path):
        yield where, require_object(path, where, record)


def required_text(path: Path, where: str, record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise data_error(path, where, f"missing or empty '{key}'")
    return value


def balanced_shots(examples: Sequence, label_of: Callable[[Any], str], shots: int) -> list:
    """``shots`` examples taken round-robin over the labels, each label in file order.

    Taking the first k lines of a classification file often gives k examples of one label, which
    biases a small model towards it; round-robin keeps the selection deterministic and balanced.
    """
    by_label: dict[str, list] = {}
    for example in examples:
        by_label.setdefault(label_of(example), []).append(example)
    queues = [iter(group) for _, group in sorted(by_label.items())]
    chosen: list = []
    while len(chosen) < shots and queues:
        for queue in list(queues):
            example = next(queue, None)
            if example is None:
                queues.remove(queue)
            elif len(chosen) < shots:
                chosen.append(example)
    return chosen


def check_shot_count(shots: int, available: int, source: Union[str, Path]) -> None:
    if shots < 0:
        raise UserError(f"--shots must be >= 0, got {shots}")
    if shots > available:
        raise UserError(f"--shots {shots} but {source} has only {available} usable example(s)")


def iter_lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its line ending)."""
    for number, line in enumerate(text.splitlines(), start=1):
        yield number, line


def contains_cjk(text: str) -> bool:
    return any("\u4e00" <= char <= "\u9fff" or "\u3400" <= char <= "\u4dbf" for char in text)
