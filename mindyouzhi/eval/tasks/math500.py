"""MATH-500 (Lightman et al. 2023, prm800k ``math_splits/test.jsonl``): final answers in ``\\boxed{}``.

Record::

    {"problem": "...", "solution": "...", "answer": "\\frac{14}{3}", "subject": "Algebra",
     "level": 3, "unique_id": "test/algebra/2.json"}

The model's final answer is the content of the **last** ``\\boxed{...}`` (or ``\\fbox{...}``,
``\\boxed 5``) in its response, braces balanced.  Two answers are equal when

1. their normalised strings are equal — normalisation drops ``$``, ``\\left``/``\\right``, spacing
   commands, ``^\\circ``, ``\\%``, trailing units in ``\\text{}``, a leading ``x =``; rewrites
   ``\\dfrac``/``\\tfrac`` as ``\\frac``, ``\\frac12`` as ``\\frac{1}{2}``, ``\\sqrt2`` as
   ``\\sqrt{2}``, ``.5`` as ``0.5``, ``1,000`` as ``1000``; or
2. sympy says so: both sides are turned into sympy expressions (fractions, roots, powers, ``\\pi``,
   ``\\cdot``/``\\times``, implicit products) and their difference simplifies to 0 or is
   numerically below 1e-6 relative.  Tuples and intervals compare element by element with the same
   brackets; answers sympy cannot read are only compared as strings.

Accuracy is reported overall and per subject.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from .base import GenerationItem, TaskOptions, data_error, json_objects, require_file, required_text

INSTRUCTION = "Solve the following math problem step by step. Put your final answer within \\boxed{}."


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
    try:
        return _braced(rest, brace)[0]
    except ValueError:
        return None


def _fix_fracs(text: str) -> str:
    r"""``\frac12`` → ``\frac{1}{2}``, ``\frac1{2}`` → ``\frac{1}{2}``."""
    return re.sub(r"\\frac\s*(\{[^{}]*\}|\w)\s*(\{[^{}]*\}|\w)",
                  lambda m: "\\frac" + "".join(part if part.startswith("{") else "{" + part + "}" for part in m.groups()),
                  text)


def normalize_answer(text: str) -> str:
    text = str(text).strip()
    text = text.replace("\n", "").replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\:", "")
    text = re.sub(r"\\(?:d|t)frac", r"\\frac", text)
    text = text.replace("\\left", "").replace("\\right", "").replace("\\displaystyle", "")
    text = text.replace("^{\\circ}", "").replace("^\\circ", "").replace("°", "")
    text = text.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    text = re.sub(r"\\text\{\s*\}", "", text)
    # A trailing unit ("10\text{ cm}", "5 \mbox{inches}") is not part of the number.
    text = re.sub(r"^(.*?\d)\s*\\(?:text|mbox|mathrm)\{\s*[a-zA-Z ]+\}(\^\d)?$", r"\1", text)
    text = re.sub(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"^[a-zA-Z]\s*=\s*(?=.)", "", text)  # "x = 5" → "5"
    text = re.sub(r"\\sqrt\s*(\w)", r"\\sqrt{\1}", text)
    text = _fix_fracs(text)
    text = re.sub(r"(?<![\d}])\.(\d)", r"0.\1", text)
    text = re.sub(r"(\d),(\d{3})(?!\d)", r"\1\2", text)  # thousands separators
    text = text.replace(" ", "")
    text = re.sub(r"\.$", "", text)
    if re.fullmatch(r"-?\d+\.\d*?0+", text):
        text = text.rstrip("0").rstrip(".")
    return text


def _braced(text: str, start: int) -> tuple[str, int]:
    """Content of the brace group opening at ``text[start]`` and the index after it."""
    depth = 0
    for index in range(start, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:index], index + 1
    raise ValueError("unbalanced braces")


def latex_to_python(text: str) -> str:
    r"""A normalised LaTeX answer as a sympy-parsable expression (``\frac{a}{b}`` → ``((a)/(b))``)."""
    out, index = [], 0
    while index < len(text):
        if text.startswith("\\frac", index):
            numerator, after = _braced(text, index + 5)
            denominator, after = _braced(text, after)
            out.append(f"(({latex_to_python(numerator)})/({latex_to_python(denominator)}))")
            index = after
        elif text.startswith("\\sqrt", index):
            after, degree = index + 5, "2"
            if after < len(text) and text[after] == "[":
                close = text.index("]", after)
                degree, after = text[after + 1:close], close + 1
            radicand, after = _braced(text, after)
            out.append(f"(({latex_to_python(radicand)})**(1/({latex_to_python(degree)})))")
            index = after
        elif text[index] == "{":
            inner, after = _braced(text, index)
            out.append(f"({latex_to_python(inner)})")
            index = after
        else:
            out.append(text[index])
            index += 1
    expression = "".join(out)
    for latex, python in (("\\cdot", "*"), ("\\times", "*"), ("\\pi", "pi"), ("\\infty", "oo"), ("^", "**"),
                          ("\\div", "/"), ("\\ln", "log"), ("\\log", "log"), ("\\sin", "sin"), ("\\cos", "cos"),
                          ("\\tan", "tan"), ("\\e", "E")):
        expression = expression.replace(latex, python)
    if "\\" in expression:
        raise ValueError(f"unsupported LaTeX in {text!r}")
    return expression


def _sympy_value(text: str):
    from sympy.parsing.sympy_parser import (
        convert_xor, implicit_multiplication_application, parse_expr, standard_transformations,
    )

    transformations = standard_transformations + (implicit_multiplication_application, convert_xor)
    return parse_expr(latex_to_python(text), transformations=transformations, evaluate=True)


def _sympy_equal(a: str, b: str) -> bool:
    import sympy

    try:
        left, right = _sympy_value(a), _sympy_value(b)
        difference = sympy.simplify(left - right)
        if difference == 0:
            return True
        value, scale = complex(sympy.N(difference)), abs(complex(sympy.N(right))) or 1.0
        return abs(value) <= 1e-6 * max(scale, 1.0)
    except Exception:  # anything sympy cannot parse or evaluate is simply "not shown equal"
        return False


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


def answers_equal(predicted: Optional[str], gold: str) -> bool:
    if predicted is None:
        return False
    a, b = normalize_answer(predicted), normalize_answer(gold)
    if not a:
        return False
    if a == b:
        return True
    brackets = re.fullmatch(r"([(\[])(.*)([)\]])", a), re.fullmatch(r"([(\[])(.*)([)\]])", b)
    if all(brackets) and "," in a:
        (open_a, inner_a, close_a), (open_b, inner_b, close_b) = brackets[0].groups(), brackets[1].groups()
        parts_a, parts_b = _split_top_level(inner_a), _split_top_level(inner_b)
        return (open_a, close_a) == (open_b, close_b) and len(parts_a) == len(parts_b) and all(
            answers_equal(x, y) for x, y in zip(parts_a, parts_b))
    if "," in a or "," in b:
        parts_a, parts_b = _split_top_level(a), _split_top_level(b)
        if len(parts_a) > 1 and len(parts_a) == len(parts_b):
            return all(answers_equal(x, y) for x, y in zip(parts_a, parts_b))
        return False
    return _sympy_equal(a, b)


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
