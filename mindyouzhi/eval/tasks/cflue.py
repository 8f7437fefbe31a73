"""CFLUE knowledge assessment: single-answer, multiple-answer and true/false exam questions.

A JSON array (or JSONL) of records such as::

    {"名称": "证券从业资格", "task": "多项选择题", "question": "我国金融市场体系包括（）。",
     "choices": "{'A': '货币市场', 'B': '债券市场', 'C': '商品市场', 'D': '金融衍生品市场'}",
     "answer": "ABD", "analysis": "..."}

``choices`` is a Python dict literal in a string (read with ``ast.literal_eval``, never ``eval``);
``task`` is 单项选择题, 多项选择题 or 判断题 (options A 对 / B 错).  A multiple-answer question is
right only when the predicted letter set equals the gold set.  Accuracy is reported per question
type.  CFLUE ships no dev split: few-shot examples come from ``--fewshot-data`` (same format),
the first k of the same question type.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from mindyouzhi.errors import UserError

from .base import (
    LETTERS, ChoiceItem, TaskOptions, check_shot_count, data_error, json_objects, require_file, require_path,
)
from .lettered import CHINESE_CUE, LetteredQuestion, build_prompt, to_choice_item

SINGLE, MULTIPLE, TRUE_FALSE = "单项选择题", "多项选择题", "判断题"
QUESTION_KINDS = (SINGLE, MULTIPLE, TRUE_FALSE)


def parse_choices(path: Path, where: str, raw: Any) -> tuple[tuple[str, str], ...]:
    """``{'A': '...', 'B': '...'}`` (a dict or its Python-literal string) → ordered (letter, text)."""
    choices = raw
    if isinstance(raw, str):
        try:
            choices = ast.literal_eval(raw)
        except (ValueError, SyntaxError) as exc:
            raise data_error(path, where, f"'choices' is not a dict literal ({exc.__class__.__name__}: {raw[:60]!r})") from None
    if not isinstance(choices, dict) or len(choices) < 2:
        raise data_error(path, where, f"'choices' must map at least two letters to option texts, got {raw!r:.80}")
    letters = sorted(str(letter).strip().upper() for letter in choices)
    if any(len(letter) != 1 or letter not in LETTERS for letter in letters) or len(set(letters)) != len(letters):
        raise data_error(path, where, f"'choices' keys must be distinct letters A-J, got {sorted(choices)}")
    by_letter = {str(letter).strip().upper(): str(text).strip() for letter, text in choices.items()}
    return tuple((letter, by_letter[letter]) for letter in letters)


def read_cflue(path: Path) -> list[tuple[LetteredQuestion, str]]:
    """(question, exam name) for every record, validated."""
    path = Path(path)
    questions = []
    for where, record in json_objects(path):
        kind = record.get("task")
        if kind not in QUESTION_KINDS:
            raise data_error(path, where, f"'task' is {kind!r}, expected one of {', '.join(QUESTION_KINDS)}")
        question = record.get("question")
        if not isinstance(question, str) or not question.strip():
            raise data_error(path, where, "missing or empty 'question'")
        options = parse_choices(path, where, record.get("choices"))
        letters = [letter for letter, _ in options]
        raw_answer = record.get("answer")
        answer = "".join(str(raw_answer or "").split()).upper()
        if not answer or any(letter not in letters for letter in answer) or len(set(answer)) != len(answer):
            raise data_error(path, where, f"answer {raw_answer!r} is not a set of the options {', '.join(letters)}")
        if kind != MULTIPLE and len(answer) != 1:
            raise data_error(path, where, f"a {kind} needs exactly one answer letter, got {raw_answer!r}")
        exam = str(record.get("名称") or "金融").strip()
        questions.append(
            (
                LetteredQuestion(
                    where=f"{path.name}:{where}",
                    group=kind,
                    question=question.strip(),
                    options=options,
                    answer=frozenset(answer),
                    multiple=kind == MULTIPLE,
                ),
                exam,
            )
        )
    if not questions:
        raise data_error(path, "", "no questions")
    return questions


def cflue_header(exam: str, kind: str) -> str:
    ask = "请选出其中所有正确的答案。" if kind == MULTIPLE else "请选出其中的正确答案。"
    return f"以下是中国关于{exam}考试的{kind}，{ask}"


def knowledge_file(data: Path) -> Path:
    """The questions file: ``data`` itself, or the JSON inside a ``knowledge/`` folder (or a CFLUE
    checkout's ``data/`` folder holding one)."""
    data = require_path(data)
    for folder in (data, data / "knowledge"):
        if folder.is_dir():
            found = sorted(folder.glob("*.json")) + sorted(folder.glob("*.jsonl"))
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise UserError(f"--data {folder}: several question files ({', '.join(f.name for f in found)}); pass one")
    return require_file(data)


def load_cflue(data: Path, options: TaskOptions) -> list[ChoiceItem]:
    questions = read_cflue(knowledge_file(data))[: options.limit]
    examples: list[LetteredQuestion] = []
    if options.shots > 0:
        if options.fewshot_data is None:
            raise UserError("cflue has no dev split: pass --fewshot-data FILE (CFLUE format) or --shots 0")
        examples = [question for question, _ in read_cflue(require_file(options.fewshot_data, "--fewshot-data"))]
    items = []
    for question, exam in questions:
        same_kind = [
            example for example in examples
            if example.group == question.group and (example.question, example.options) != (question.question, question.options)
        ]
        check_shot_count(options.shots, len(same_kind), f"{options.fewshot_data} ({question.group})")
        context = build_prompt(cflue_header(exam, question.group), same_kind[: options.shots], question, CHINESE_CUE)
        items.append(to_choice_item(question, context, CHINESE_CUE))
    return items
