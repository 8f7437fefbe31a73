"""Lettered multiple-choice questions: the prompt layout and the answer candidates.

Shared by the exam CSVs (C-Eval, FinEval, FinanceIQ), CFLUE and the generic MCQ JSONL.  The layout
is C-Eval's answer-only few-shot format::

    以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。

    {question}
    A. {option}
    B. {option}
    答案：A

    {question}
    ...
    答案：

and the scored continuation is the answer letter.  A multiple-answer question ("ABD") is scored
over every non-empty subset of its letters written in alphabetical order, so the prediction is
one exact set and scoring is exact-set.  Those candidates are prefixes of one another ("A" of
"AB"), and a prefix's likelihood includes every longer answer starting with it, so the shortest
subset would nearly always win: each candidate is scored together with the newline that ends the
answer line in the prompt layout, which makes the candidate set prefix-free.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Sequence

from mindyouzhi.errors import UserError

from .base import ChoiceItem

MAX_MULTI_ANSWER_OPTIONS = 8  # 2^8 - 1 = 255 candidate answers per question at most
ANSWER_END = "\n"  # ends a multiple-answer candidate (see the module docstring)


@dataclass(frozen=True)
class AnswerCue:
    """The text that introduces the answer and what separates it from the letter.

    Chinese prompts write ``答案：A``; English ones ``Answer: A``, where a BPE tokenizer sees
    " A" (space + letter) as one token, so the space belongs to the continuation.
    """

    prefix: str
    letter_separator: str


CHINESE_CUE = AnswerCue("答案：", "")
ENGLISH_CUE = AnswerCue("Answer:", " ")


@dataclass(frozen=True)
class LetteredQuestion:
    where: str  # "file: line N", also the item id
    group: str
    question: str
    options: tuple[tuple[str, str], ...]  # (letter, text) in letter order
    answer: frozenset  # gold letters
    multiple: bool  # multiple-answer question: candidates are all letter subsets

    @property
    def letters(self) -> tuple[str, ...]:
        return tuple(letter for letter, _ in self.options)


def answer_string(letters) -> str:
    return "".join(sorted(letters))


def answer_candidates(letters: Sequence[str], multiple: bool) -> tuple[str, ...]:
    if not multiple:
        return tuple(letters)
    if len(letters) > MAX_MULTI_ANSWER_OPTIONS:
        raise UserError(
            f"a multiple-answer question has {len(letters)} options; at most {MAX_MULTI_ANSWER_OPTIONS} are supported"
        )
    ordered = sorted(letters)
    return tuple("".join(subset) for size in range(1, len(ordered) + 1) for subset in combinations(ordered, size))


def format_question(question: LetteredQuestion, cue: AnswerCue, with_answer: bool) -> str:
    lines = [question.question]
    lines += [f"{letter}. {text}" for letter, text in question.options]
    answer = cue.letter_separator + answer_string(question.answer) if with_answer else ""
    lines.append(cue.prefix + answer)
    return "\n".join(lines)


def build_prompt(header: str, shots: Sequence[LetteredQuestion], question: LetteredQuestion, cue: AnswerCue) -> str:
    blocks = [format_question(shot, cue, with_answer=True) for shot in shots]
    blocks.append(format_question(question, cue, with_answer=False))
    body = "\n\n".join(blocks)
    return f"{header}\n\n{body}" if header else body


def to_choice_item(question: LetteredQuestion, context: str, cue: AnswerCue) -> ChoiceItem:
    labels = answer_candidates(question.letters, question.multiple)
    gold_label = answer_string(question.answer)
    end = ANSWER_END if question.multiple else ""
    return ChoiceItem(
        item_id=question.where,
        group=question.group,
        context=context,
        choices=tuple(cue.letter_separator + label + end for label in labels),
        labels=labels,
        gold=labels.index(gold_label),
        letters=question.letters,
    )


def chinese_exam_header(subject: str, kind: str = "单项选择题") -> str:
    """The standard C-Eval / FinEval instruction line."""
    return f"以下是中国关于{subject}考试的{kind}，请选出其中的正确答案。"
