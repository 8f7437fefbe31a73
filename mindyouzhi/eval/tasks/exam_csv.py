"""C-Eval, FinEval and FinanceIQ: one CSV of single-answer questions per subject.

Layout: ``id,question,A,B,C,D,answer[,explanation]`` (FinanceIQ: ``,Question,A,B,C,D,Answer``, the
unnamed first column being a pandas index).  Header names are matched case-insensitively; the
option columns are the consecutive single letters from A.  A split lives in a directory
(``ceval/val``, ``fineval/test_20pct``) whose files are named ``{subject}_{split}.csv`` (FinanceIQ:
``{科目}.csv``); few-shot examples are the first k questions of the same subject in the sibling
``dev`` directory (or ``--fewshot-data``), as in the benchmarks' own few-shot protocol.

``--data`` may be a subject file, a split directory, or the benchmark's root folder as downloaded
(``ceval/`` with ``dev/ val/ test/``): the root resolves to the split that has answers — ``val``
for C-Eval and FinEval (their test answers are withheld), ``test`` for FinanceIQ — and says so on
stderr.
"""
from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Optional

from mindyouzhi.errors import UserError

from .base import LETTERS, ChoiceItem, TaskOptions, check_shot_count, data_error, read_text, require_path
from .lettered import CHINESE_CUE, LetteredQuestion, build_prompt, chinese_exam_header, to_choice_item
from .subjects import display_name

SPLIT_SUFFIXES = ("_test_selected", "_dev", "_val", "_test")


def subject_key(path: Path) -> str:
    stem = Path(path).stem
    for suffix in SPLIT_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def read_exam_csv(path: Path, group: Optional[str] = None) -> list[LetteredQuestion]:
    """Every question of one subject file, validated; a bad row raises naming its line."""
    path = Path(path)
    group = group or subject_key(path)
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    header = next(reader)
    names = [name.strip().lower() for name in header]
    column = {name: position for position, name in enumerate(names) if name}
    expected = "expected a header like id,question,A,B,C,D,answer"
    if "question" not in column:
        raise data_error(path, "line 1", f"no 'question' column in header {','.join(header)} ({expected})")
    letters = []
    for letter in LETTERS:
        if letter.lower() not in column:
            break
        letters.append(letter)
    if len(letters) < 2:
        raise data_error(path, "line 1", f"no option columns A, B, ... in header {','.join(header)} ({expected})")
    if "answer" not in column:
        raise data_error(path, "line 1", "no 'answer' column, so nothing to score against (C-Eval's test split has no answers: use val)")
    id_column = column.get("id", 0 if names[0] == "" else None)

    questions = []
    line_before = reader.line_num
    for row in reader:
        start_line = line_before + 1  # a quoted field may span lines: report where the row starts
        where = f"line {start_line}"
        line_before = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(header) or any(cell.strip() for cell in row[len(header):]):
            raise data_error(
                path, where,
                f"{len(row)} fields where the header has {len(header)} (an unquoted comma or a missing column?)",
            )
        row_id = row[id_column].strip() if id_column is not None else str(len(questions))
        where_id = f"{where} (id {row_id})"
        question = row[column["question"]].strip()
        if not question:
            raise data_error(path, where_id, "empty question")
        raw_answer = row[column["answer"]]
        answer = raw_answer.strip().upper()  # FinEval has an answer written "D "
        if answer not in letters:
            raise data_error(path, where_id, f"answer {raw_answer!r} is not one of {', '.join(letters)}")
        questions.append(
            LetteredQuestion(
                where=f"{path.name}:{start_line}",
                group=group,
                question=question,
                options=tuple((letter, row[column[letter.lower()]].strip()) for letter in letters),
                answer=frozenset(answer),
                multiple=False,
            )
        )
    if not questions:
        raise data_error(path, "", "no questions after the header")
    return questions


def resolve_split(path: Path, answer_split: str) -> Path:
    """``path`` itself, or for a benchmark root holding split directories, its ``answer_split``."""
    if path.is_file() or any(path.glob("*.csv")):
        return path
    splits = sorted(child.name for child in path.iterdir() if child.is_dir() and any(child.glob("*.csv")))
    if answer_split in splits:
        print(f"--data {path}: using the '{answer_split}' split (the one with answers)", file=sys.stderr)
        return path / answer_split
    if splits:
        raise UserError(f"--data {path}: has split directories {', '.join(splits)} but no '{answer_split}' split with "
                        f"answers; pass one, e.g. {path / splits[0]}")
    raise UserError(f"--data {path}: no .csv files and no split directories")


def _data_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(path.glob("*.csv"))


def _shot_files(data: Path, fewshot_data: Optional[Path]) -> dict[str, Path]:
    """Subject key → file of few-shot examples."""
    if fewshot_data is not None:
        source = require_path(fewshot_data, "--fewshot-data")
        if source.is_file():
            return {"*": source}
    else:
        split_dir = data.parent if data.is_file() else data
        source = split_dir.parent / "dev"
        if not source.is_dir():
            raise UserError(f"few-shot examples are read from the dev split next to --data, but {source} does not exist (pass --fewshot-data or --shots 0)")
    return {subject_key(file): file for file in sorted(source.glob("*.csv"))}


def _same_question(a: LetteredQuestion, b: LetteredQuestion) -> bool:
    return a.question == b.question and a.options == b.options


def load_exam(data: Path, options: TaskOptions, subject_names: dict, answer_split: str = "val") -> list[ChoiceItem]:
    data = resolve_split(require_path(data), answer_split)
    shot_files = _shot_files(data, options.fewshot_data) if options.shots > 0 else {}
    items = []
    for file in _data_files(data):
        key = subject_key(file)
        questions = read_exam_csv(file, key)[: options.limit]
        examples: list[LetteredQuestion] = []
        if options.shots > 0:
            shot_file = shot_files.get("*") or shot_files.get(key)
            if shot_file is None:
                raise UserError(f"no few-shot file for subject '{key}' ({file.name}) in the dev split (pass --fewshot-data or --shots 0)")
            examples = read_exam_csv(shot_file, key)
        header = chinese_exam_header(display_name(key, subject_names))
        for question in questions:
            shots = [example for example in examples if not _same_question(example, question)]
            check_shot_count(options.shots, len(shots), shot_files.get("*") or shot_files.get(key))
            context = build_prompt(header, shots[: options.shots], question, CHINESE_CUE)
            items.append(to_choice_item(question, context, CHINESE_CUE))
    return items
