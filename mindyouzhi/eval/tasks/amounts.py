"""RMB amounts (``rmb-amounts``): an amount conversion is right when its *value* is right.

Records are ``gen-jsonl`` records (``prompt``, ``answer``, optional ``id``/``group``), e.g. the
held-out split the pipeline writes from ``data amounts generate``.  The gold answers follow the
style of their prompt — ``0.26``, ``RMB 82,108,000.70``, ``¥3348.14``, ``88706000.79元``,
``价税合计（大写）：捌佰伍拾贰万玖仟贰佰贰拾柒元贰角`` — which a model cannot guess, so exact match
(still reported) mostly measures the formatting convention.  The primary metric,
``amount_correct``, reads the gold's amount and its direction (an uppercase gold asks for 大写,
any other for Arabic digits) and takes the **first** amount of that kind in the response:

* uppercase: the first run of 大写 characters holding a digit must be a spelling the PBoC rules accept
  (:func:`mindyouzhi.datagen.amounts.to_lower`: 零 where required, 整 rules, traditional forms)
  of the gold's value — an invalid spelling is wrong even if a later one is right;
* Arabic: the first number, read whole (``¥``/``RMB`` and thousands separators allowed; a sign,
  a third decimal or a misplaced comma make it malformed), must equal the gold's value in cents.

An answer that echoes the prompt's amount in the prompt's own form contains no amount of the
asked kind and is wrong.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

from mindyouzhi.errors import UserError

from .base import GenerationItem, TaskOptions, by_group, data_error, rate
from .jsonl import load_generation


# An uppercase amount: a run of the characters the rules allow (traditional forms included) holding
# at least one digit, so a restated "…元整的大写是" does not count as the answer.
_UPPER = re.compile(r"(?:人民币)?[零壹贰貳叁肆伍陆陸柒捌玖拾佰仟万萬亿億元圓角分整正]*"
                    r"[零壹贰貳叁肆伍陆陸柒捌玖][零壹贰貳叁肆伍陆陸柒捌玖拾佰仟万萬亿億元圓角分整正]*")
# An Arabic number taken whole — sign, every digit, comma and decimal — so that "3348.149", "0.260"
# or "-0.26" are read as what they are (and refused by the parser), never as a prefix that matches.
_ARABIC = re.compile(r"(?:[¥￥]|人民币|RMB\s?)?-?\d[\d,]*(?:\.\d+)?")


def _read(text: str, upper: bool) -> Optional[int]:
    """Cents of the first amount of the asked kind in ``text`` (None: none, or the first is malformed)."""
    from mindyouzhi.datagen.amounts import parse_arabic, to_lower

    match = (_UPPER if upper else _ARABIC).search(text)
    if match is None:
        return None
    span = match.group()
    try:
        if upper:
            return to_lower(span)
        return parse_arabic(span.rstrip(",").replace("人民币", "").replace("RMB ", "RMB"))
    except UserError:
        return None


def gold_amount(gold: str) -> tuple[bool, int]:
    """(uppercase asked, cents) of a gold answer; ValueError when it holds no amount."""
    upper = _UPPER.search(gold) is not None
    cents = _read(gold, upper)
    if cents is None:
        raise ValueError(f"no {'uppercase' if upper else 'Arabic'} amount in the gold answer {gold!r}")
    return upper, cents


def load_amounts(data: Path, options: TaskOptions) -> list[GenerationItem]:
    items = load_generation(data, options)
    for item in items:
        if not isinstance(item.gold, str):
            raise data_error(data, item.item_id, "rmb-amounts: the gold answer must be a string holding one amount")
        try:
            gold_amount(item.gold)
        except ValueError as exc:
            raise data_error(data, item.item_id, f"rmb-amounts: {exc}") from None
    return items


def score_amount(response: str, item: GenerationItem) -> dict:
    upper, cents = gold_amount(item.gold)
    predicted = _read(response, upper)
    return {"gold": item.gold, "direction": "to_upper" if upper else "to_lower", "predicted_cents": predicted,
            "correct": predicted == cents, "exact": response.strip() == item.gold.strip()}


def aggregate_amounts(rows: Sequence[dict]):
    groups = {name: {"n": len(members), "amount_correct": rate(row["correct"] for row in members),
                     "exact_match": rate(row["exact"] for row in members)}
              for name, members in by_group(rows).items()}
    metrics = {"amount_correct": rate(row["correct"] for row in rows),
               "exact_match": rate(row["exact"] for row in rows),
               "amount_found": rate(row["predicted_cents"] is not None for row in rows)}
    return metrics, groups, {}
