"""Closed-label classification by generation (``label-jsonl``): the answer is right when it *is* the label.

Records are ``gen-jsonl`` records whose gold is one label word or phrase (``"neutral"``), e.g. the
pipeline's held-out FPB split, where SFT teaches the model to answer with the label alone.  Strict
exact match counts ``Neutral`` or ``neutral.`` as wrong, which measures typography, not the
classification; lm-evaluation-harness scores such tasks with ``exact_match`` under
``ignore_case`` and ``ignore_punctuation``.  The primary metric, ``accuracy``, does the same on the
response's first non-empty line: surrounding whitespace, quotes and punctuation (ASCII and CJK)
removed, compared case-folded with the gold treated the same way.  Anything more than the label on
that line ("neutral sentiment", "positive or neutral") is wrong.  ``exact_match`` (the strict
comparison) and ``label_valid`` (the answer is one of the file's labels, right or wrong) are
reported beside it.
"""
from __future__ import annotations

import string
from pathlib import Path
from typing import Sequence

from .base import GenerationItem, TaskOptions, by_group, data_error, rate
from .jsonl import load_generation

_STRIP = string.whitespace + string.punctuation + "“”‘’「」『』《》（）【】，。、；：！？…·"


def normalise_label(text: str) -> str:
    """The first non-empty line without surrounding whitespace/quotes/punctuation, case-folded."""
    line = next((line for line in text.splitlines() if line.strip(_STRIP)), "")
    return line.strip(_STRIP).casefold()


def load_labels(data: Path, options: TaskOptions) -> list[GenerationItem]:
    items = load_generation(data, options)
    for item in items:
        if not isinstance(item.gold, str) or not normalise_label(item.gold) or "\n" in item.gold.strip():
            raise data_error(data, item.item_id, f"label-jsonl: the gold answer must be one label on one line, got {item.gold!r}")
    labels = sorted({normalise_label(item.gold) for item in items})
    # every item knows the label set of its file, so a row can say whether the answer was a label at all
    return [GenerationItem(item.item_id, item.group, item.prompt, {"label": item.gold, "labels": labels}, item.stop)
            for item in items]


def score_label(response: str, item: GenerationItem) -> dict:
    gold, labels = item.gold["label"], item.gold["labels"]
    answer = normalise_label(response)
    return {"gold": gold, "answer": answer, "correct": answer == normalise_label(gold),
            "exact": response.strip() == gold.strip(), "label_valid": answer in labels}


def aggregate_labels(rows: Sequence[dict]):
    groups = {name: {"n": len(members), "accuracy": rate(row["correct"] for row in members)}
              for name, members in by_group(rows).items()}
    metrics = {"accuracy": rate(row["correct"] for row in rows), "exact_match": rate(row["exact"] for row in rows),
               "label_valid": rate(row["label_valid"] for row in rows)}
    return metrics, groups, {}
