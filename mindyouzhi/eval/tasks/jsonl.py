"""Generic JSONL tasks: multiple choice (``mcq-jsonl``) and generation (``gen-jsonl``).

Both accept JSON Lines or one JSON array.

``mcq-jsonl`` record::

    {"question": "...", "choices": ["...", "..."] or {"A": "...", ...},
     "answer": 1 | "B" | "BD" | ["B", "D"], "subject": "optional group", "instruction": "optional header",
     "multiple": optional bool}

An integer answer is a 0-based index.  More than one answer letter (or ``"multiple": true``) makes
a multiple-answer question, scored by exact set.  The prompt uses the Chinese answer cue
(``答案：``) when the question contains Chinese characters, else ``Answer:``.

``gen-jsonl`` record: a prompt under ``prompt`` (or ``input``) and the gold answer under ``answer``
(or ``gold``, ``gold_answer``, ``output``); optional ``id``, ``group`` and ``stop`` (list of
strings where the response is cut; default a blank line).  A gold JSON object — or a string
holding one — is scored field by field (banking intent/slot data); any other gold by exact match.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mindyouzhi.errors import UserError

from .base import (
    LETTERS, ChoiceItem, GenerationItem, TaskOptions, check_shot_count, contains_cjk, data_error,
    json_objects, require_file,
)
from .lettered import CHINESE_CUE, ENGLISH_CUE, LetteredQuestion, build_prompt, to_choice_item

PROMPT_KEYS = ("prompt", "input")
GOLD_KEYS = ("answer", "gold", "gold_answer", "output")
DEFAULT_STOP = ("\n\n",)


def _options(path: Path, where: str, choices: Any) -> tuple[tuple[str, str], ...]:
    if isinstance(choices, list):
        if len(choices) > len(LETTERS):
            raise data_error(path, where, f"{len(choices)} choices; at most {len(LETTERS)} are supported")
        pairs = list(zip(LETTERS, choices))
    elif isinstance(choices, dict):
        pairs = sorted((str(letter).strip().upper(), text) for letter, text in choices.items())
        if any(len(letter) != 1 or letter not in LETTERS for letter, _ in pairs):
            raise data_error(path, where, f"'choices' keys must be letters A-J, got {sorted(choices)}")
    else:
        raise data_error(path, where, "'choices' must be a list of strings or a dict letter → text")
    if len(pairs) < 2:
        raise data_error(path, where, "'choices' needs at least two options")
    if any(not isinstance(text, (str, int, float)) or not str(text).strip() for _, text in pairs):
        raise data_error(path, where, "every choice must be a non-empty string")
    return tuple((letter, str(text).strip()) for letter, text in pairs)


def _answer_letters(path: Path, where: str, raw: Any, letters: list[str]) -> frozenset:
    values = raw if isinstance(raw, list) else [raw]
    chosen = []
    for value in values:
        if isinstance(value, bool):  # bool is an int in Python: never a valid index here
            value = None
        if isinstance(value, int):
            if not 0 <= value < len(letters):
                raise data_error(path, where, f"answer index {value} is outside 0..{len(letters) - 1}")
            chosen.append(letters[value])
        elif isinstance(value, str) and value.strip():
            chosen.extend("".join(value.replace(",", " ").split()).upper())
        else:
            raise data_error(path, where, f"answer {raw!r} is not an index, a letter or a list of letters")
    if any(letter not in letters for letter in chosen) or len(set(chosen)) != len(chosen):
        raise data_error(path, where, f"answer {raw!r} is not among the options {', '.join(letters)}")
    return frozenset(chosen)


def read_mcq(path: Path) -> list[tuple[LetteredQuestion, str]]:
    """(question, instruction header) per record, validated."""
    path = Path(path)
    questions = []
    for where, record in json_objects(path):
        question = record.get("question")
        if not isinstance(question, str) or not question.strip():
            raise data_error(path, where, "missing or empty 'question'")
        if "choices" not in record:
            raise data_error(path, where, "missing 'choices'")
        if "answer" not in record:
            raise data_error(path, where, "missing 'answer'")
        options = _options(path, where, record["choices"])
        answer = _answer_letters(path, where, record["answer"], [letter for letter, _ in options])
        multiple = bool(record.get("multiple", len(answer) > 1))
        if not multiple and len(answer) != 1:
            raise data_error(path, where, f"'multiple' is false but the answer has {len(answer)} letters")
        item_id = str(record["id"]) if "id" in record else f"{path.name}:{where}"
        questions.append(
            (
                LetteredQuestion(item_id, str(record.get("subject", "all")), question.strip(), options, answer, multiple),
                str(record.get("instruction", "")).strip(),
            )
        )
    if not questions:
        raise data_error(path, "", "no questions")
    return questions


def load_mcq(data: Path, options: TaskOptions) -> list[ChoiceItem]:
    questions = read_mcq(require_file(data))[: options.limit]
    examples: list[LetteredQuestion] = []
    if options.shots > 0:
        if options.fewshot_data is None:
            raise UserError("few-shot mcq-jsonl needs --fewshot-data FILE (same format)")
        examples = [question for question, _ in read_mcq(require_file(options.fewshot_data, "--fewshot-data"))]
    items = []
    for question, instruction in questions:
        cue = CHINESE_CUE if contains_cjk(question.question) else ENGLISH_CUE
        shots = [
            example for example in examples
            if example.group == question.group and (example.question, example.options) != (question.question, question.options)
        ]
        check_shot_count(options.shots, len(shots), f"{options.fewshot_data} (subject {question.group})")
        items.append(to_choice_item(question, build_prompt(instruction, shots[: options.shots], question, cue), cue))
    return items


def _gold(path: Path, where: str, record: dict) -> Any:
    key = next((key for key in GOLD_KEYS if key in record), None)
    if key is None:
        raise data_error(path, where, f"no gold answer: expected one of the keys {', '.join(GOLD_KEYS)}")
    gold = record[key]
    if isinstance(gold, str) and gold.strip().startswith("{"):
        try:
            parsed = json.loads(gold)
        except json.JSONDecodeError:
            return gold
        if isinstance(parsed, dict):
            return parsed
    if gold is None or gold == "" or gold == {}:
        raise data_error(path, where, f"empty gold answer under '{key}'")
    return gold


def gold_text(gold: Any) -> str:
    return gold if isinstance(gold, str) else json.dumps(gold, ensure_ascii=False)


def read_generation(path: Path) -> list[GenerationItem]:
    path = Path(path)
    items = []
    for where, record in json_objects(path):
        prompt_key = next((key for key in PROMPT_KEYS if isinstance(record.get(key), str)), None)
        if prompt_key is None or not record[prompt_key].strip():
            raise data_error(path, where, f"no prompt: expected a non-empty string under one of {', '.join(PROMPT_KEYS)}")
        stop = record.get("stop", list(DEFAULT_STOP))
        if not isinstance(stop, list) or not all(isinstance(entry, str) for entry in stop):
            raise data_error(path, where, "'stop' must be a list of strings")
        items.append(
            GenerationItem(
                item_id=str(record["id"]) if "id" in record else f"{path.name}:{where}",
                group=str(record.get("group", record.get("source", "all"))),
                prompt=record[prompt_key],
                gold=_gold(path, where, record),
                stop=tuple(stop),
            )
        )
    if not items:
        raise data_error(path, "", "no records")
    return items


def load_generation(data: Path, options: TaskOptions) -> list[GenerationItem]:
    items = read_generation(require_file(data))[: options.limit]
    if options.shots == 0:
        return items
    if options.fewshot_data is None:
        raise UserError("few-shot gen-jsonl needs --fewshot-data FILE (same format)")
    pool = read_generation(require_file(options.fewshot_data, "--fewshot-data"))
    shot_items = []
    for item in items:
        shots = [example for example in pool if example.prompt != item.prompt]
        check_shot_count(options.shots, len(shots), options.fewshot_data)
        # The record's prompt ends where its answer begins, so an example is prompt + answer.
        prefix = "".join(f"{shot.prompt}{gold_text(shot.gold)}\n\n" for shot in shots[: options.shots])
        shot_items.append(GenerationItem(item.item_id, item.group, prefix + item.prompt, item.gold, item.stop))
    return shot_items
