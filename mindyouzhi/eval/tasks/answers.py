"""Reading answers out of generated text: option letters and JSON objects.

Letters: after an answer cue (``答案：``, ``正确答案是``, ``Answer:``) the leading run of option
letters (``ABD``, ``A、B、D``, ``A, C``) is the answer; without a cue, a run at the very start of
the response; for a single-answer question, failing both, the first option letter standing
alone.  A letter glued to other Latin letters (the "A" of "According") never counts.

JSON: the first ``{...}`` in the response that parses as a JSON object (models often wrap it in
a code fence or a sentence).  Nested objects are compared field by field on dotted paths
(``slots.amount``), so slot-filling output gets credit per slot.  String values are compared
after stripping surrounding whitespace; nothing else is normalised.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

_CUE = re.compile(r"(?:正确答案|答案|answer)\s*(?:应该是|应为|是|为|is)?\s*[:：]?", re.IGNORECASE)
_SEPARATORS = r"\s、,，/;；.。和与及()（）\[\]"


def _letter_run(segment: str, valid: str) -> str:
    word = rf"[{valid}]+(?![A-Za-z])"  # "ACD" is an answer, the "A" of "According" is not
    run = re.match(rf"[{_SEPARATORS}]*((?:{word}[{_SEPARATORS}]*)+)", segment)
    if run is None:
        return ""
    return "".join(sorted(set(re.findall(f"[{valid}]", run.group(1)))))


def extract_letters(response: str, letters: Sequence[str], multiple: bool) -> str:
    """The answer letters found in ``response``, sorted ("" when none)."""
    valid = "".join(letters)
    text = response.strip()
    for cue in _CUE.finditer(text):
        found = _letter_run(text[cue.end() :], valid)
        if found:
            return found
    found = _letter_run(text, valid)
    if found or multiple:
        return found
    alone = re.search(rf"(?<![A-Za-z])([{valid}])(?![A-Za-z])", text)
    return alone.group(1) if alone else ""


def extract_json_object(text: str) -> Optional[dict]:
    decoder = json.JSONDecoder()
    for brace in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, brace.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def flatten(obj: dict, prefix: str = "") -> dict[str, Any]:
    """Nested objects → {dotted path: leaf value}; lists stay whole (one field)."""
    flat: dict[str, Any] = {}
    for key, value in obj.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def _normalise(value: Any) -> Any:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list):
        return [_normalise(entry) for entry in value]
    if isinstance(value, dict):
        return {key: _normalise(entry) for key, entry in value.items()}
    return value


@dataclass(frozen=True)
class GenerationScore:
    exact: bool
    json_valid: Optional[bool] = None  # only for a JSON-object gold
    fields: dict = field(default_factory=dict)  # dotted path → correct, only for a JSON-object gold


def score_generation(response: str, gold: Any) -> GenerationScore:
    if isinstance(gold, dict):
        predicted = extract_json_object(response)
        gold_fields = flatten(_normalise(gold))
        if predicted is None:
            return GenerationScore(False, False, {path: False for path in gold_fields})
        predicted = _normalise(predicted)
        predicted_fields = flatten(predicted)
        fields = {path: path in predicted_fields and predicted_fields[path] == value for path, value in gold_fields.items()}
        return GenerationScore(predicted == _normalise(gold), True, fields)
    answer = response.strip()
    if isinstance(gold, str):
        return GenerationScore(answer == gold.strip())
    try:
        return GenerationScore(json.loads(answer) == gold)
    except json.JSONDecodeError:
        return GenerationScore(False)
