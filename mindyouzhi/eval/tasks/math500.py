"""MATH-500 (Lightman et al. 2023, prm800k ``math_splits/test.jsonl``): final answers in ``\\boxed{}``.

Record::

    {"problem": "...", "solution": "...", "answer": "\\frac{14}{3}", "subject": "Algebra",
     "level": 3, "unique_id": "test/algebra/2.json"}

The model's final answer is the content of the **last** ``\\boxed{...}`` (or ``\\fbox{...}``,
``\\boxed 5``) in its response, braces balanced, as the prompt asks for; a response without one
has no answer (no fallback to the last number of the text, which credits a rambling model by
chance).  Whether it equals the gold answer is decided by Hugging Face's ``math-verify``, the
checker the community scores MATH-500 with: both sides are parsed from LaTeX to sympy (mixed
numbers ``137 \\frac{1}{2}`` = 275/2, thousands separators ``58{,}500``, ``\\pm`` as the set of
both values, intervals, sets and tuples, percentages, units and ``\\text{}`` dropped) and compared
symbolically and numerically.  Accuracy is reported overall and per subject.
"""
from __future__ import annotations

import logging
import re
import threading
from functools import lru_cache
from pathlib import Path
from typing import Optional

from .base import GenerationItem, TaskOptions, data_error, json_objects, require_file, required_text

INSTRUCTION = "Solve the following math problem step by step. Put your final answer within \\boxed{}."
# math-verify's own default: seconds for one parse and for one comparison (a guard against
# pathological inputs such as huge powers).  Its timer is SIGALRM, usable only in the main thread.
TIMEOUT_SECONDS = 5


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces), or of ``\\boxed x``."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:]
    brace = rest.find("{")
    spaced = re.match(r"\\boxed ([^\s$]+)", rest)
    if spaced and (brace < 0 or spaced.start(1) < brace):
        return spaced.group(1)
    if brace < 0:
        return None
    depth = 0
    for index in range(brace, len(rest)):
        if rest[index] == "{":
            depth += 1
        elif rest[index] == "}":
            depth -= 1
            if depth == 0:
                return rest[brace + 1:index]
    return None  # unbalanced braces


@lru_cache(maxsize=1)
def _math_verify():
    import math_verify

    # Without a timer (outside the main thread) it warns once on stderr; the eval keeps its own output.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return math_verify


def _parsed(answer: str, timeout: Optional[int]) -> list:
    """An answer (LaTeX without delimiters) as math-verify's [sympy value, source string], [] when unreadable."""
    return _math_verify().parse("\\boxed{" + answer + "}", parsing_timeout=timeout)


def answers_equal(predicted: Optional[str], gold: str) -> bool:
    """math-verify's judgement of ``predicted`` against ``gold`` (both LaTeX, as inside ``\\boxed{}``)."""
    if predicted is None or not predicted.strip():
        return False
    timeout = TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None
    gold_value, predicted_value = _parsed(gold, timeout), _parsed(predicted, timeout)
    return bool(gold_value and predicted_value
                and _math_verify().verify(gold_value, predicted_value, timeout_seconds=timeout))


def load_math500(data: Path, options: TaskOptions) -> list[GenerationItem]:
    if options.shots:
        raise data_error(data, "", "math500 is zero-shot here: use --shots 0")
    path = require_file(data)
    items = []
    for where, record in list(json_objects(path))[: options.limit]:
        problem, answer = required_text(path, where, record, "problem"), record.get("answer")
        if not isinstance(answer, (str, int, float)) or not str(answer).strip():
            raise data_error(path, where, "missing or empty 'answer' (the final answer as LaTeX)")
        item_id = str(record.get("unique_id") or f"{path.name}:{where}")
        prompt = f"{INSTRUCTION}\n\nProblem: {problem.strip()}\n\nSolution:"
        items.append(GenerationItem(item_id, str(record.get("subject") or "math"), prompt, str(answer), stop=()))
    return items


def score_math(response: str, item: GenerationItem) -> dict:
    predicted = last_boxed(response)
    return {"gold": item.gold, "extracted": predicted, "correct": answers_equal(predicted, item.gold)}
