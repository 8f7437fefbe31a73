"""``data ifeval``: instruction-following data from declarative format-constraint templates.

The catalogue (``ifeval_templates.yaml``, or ``--templates``) lists constraint templates — JSON with
given keys, Markdown table/list, paragraphs, LaTeX ``\\boxed``, length limits, language, required
and forbidden words, fixed opening/ending, title, bold answer, quotes — each with phrasings per
language, a sampling weight, a group and conflicts.  This module holds, per constraint *kind*:

* a **formatter** that lays out a (question, answer, reasoning) sample so it satisfies the
  constraint — the "conforming answer";
* a **verifier** that checks any response against the constraint's parameters.  Verifiers never
  look at the formatter's output shape beyond what the instruction asked, so ``data ifeval verify``
  is a fair evaluation of model outputs.

Parameters that depend on the answer (length limits, keywords to include, words to avoid) are drawn
after formatting, from the conforming answer itself; every generated item is verified before it is
written.
"""
from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Optional

import yaml

from ..errors import UserError
from .samples import SampleText, cjk_ratio, is_chinese
from .tagging import TAXONOMY

LANGUAGE_NAMES = {"zh": {"zh": "中文", "en": "英文"}, "en": {"zh": "Chinese", "en": "English"}}
LIST_STYLE_NAMES = {"zh": {"bullet": "无序列表", "numbered": "有序列表"}, "en": {"bullet": "bulleted list",
                                                                           "numbered": "numbered list"}}
ANSWER_LABEL = {"zh": "答案：", "en": "Answer: "}
EN_STOPWORDS = set("about after again also because before being below between could does doing during each "
                   "from further having here itself more most other over same should some such than that their "
                   "them then there these they this those through under until very were what when where which "
                   "while with would your yours".split())


# --------------------------------------------------------------------------------------------
# Catalogue
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConstraintTemplate:
    id: str
    kind: str
    weight: float
    group: str
    conflicts: frozenset
    params: dict
    phrasings: dict  # language → list of strings


@dataclass
class Catalog:
    templates: list
    source: str

    def by_id(self, constraint_id: str) -> ConstraintTemplate:
        for template in self.templates:
            if template.id == constraint_id:
                return template
        raise UserError(f"{self.source}: no constraint with id {constraint_id!r}")


def load_catalog(path: Optional[str] = None) -> Catalog:
    if path is None:
        source = "ifeval_templates.yaml (built in)"
        text = resources.files("mindyouzhi.datagen").joinpath("ifeval_templates.yaml").read_text(encoding="utf-8")
    else:
        source = str(path)
        if not Path(path).is_file():
            raise UserError(f"--templates {path}: file not found")
        text = Path(path).read_text(encoding="utf-8")
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"{source}: invalid YAML ({exc})") from None
    entries = document.get("constraints") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{source}: expected a top-level 'constraints' list")
    templates, ids = [], set()
    for position, entry in enumerate(entries, start=1):
        where = f"{source}: constraint #{position}"
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            raise UserError(f"{where}: needs a string 'id'")
        where = f"{source}: constraint {entry['id']!r}"
        if entry["id"] in ids:
            raise UserError(f"{where}: duplicate id")
        ids.add(entry["id"])
        kind = entry.get("kind")
        if kind not in KINDS:
            raise UserError(f"{where}: unknown kind {kind!r}; known kinds: {', '.join(sorted(KINDS))}")
        weight = entry.get("weight", 1)
        if not isinstance(weight, (int, float)) or weight <= 0:
            raise UserError(f"{where}: 'weight' must be a positive number")
        phrasings = entry.get("phrasings")
        if not isinstance(phrasings, dict) or not any(isinstance(v, list) and v for v in phrasings.values()):
            raise UserError(f"{where}: needs 'phrasings' with a non-empty list for zh and/or en")
        for language, texts in phrasings.items():
            if language not in ("zh", "en") or not all(isinstance(t, str) and t.strip() for t in texts):
                raise UserError(f"{where}: phrasings must be lists of strings under zh / en")
        params = entry.get("params") or {}
        KINDS[kind].check_params(params, where)
        templates.append(ConstraintTemplate(entry["id"], kind, float(weight), str(entry.get("group", entry["id"])),
                                            frozenset(entry.get("conflicts") or ()), params, phrasings))
    known = {t.id for t in templates}
    for template in templates:
        unknown = template.conflicts - known
        if unknown:
            raise UserError(f"{source}: constraint {template.id!r} conflicts with unknown ids {sorted(unknown)}")
    return Catalog(templates, source)


def _conflict(a: ConstraintTemplate, b: ConstraintTemplate) -> bool:
    return a.group == b.group or b.id in a.conflicts or a.id in b.conflicts


# --------------------------------------------------------------------------------------------
# Content and layout
# --------------------------------------------------------------------------------------------
@dataclass
class Content:
    question: str
    answer: str
    reasoning: str
    language: str

    @property
    def steps(self) -> list[str]:
        """Reasoning split into steps (lines, else sentences); the answer when there is no reasoning."""
        text = self.reasoning.strip()
        if not text:
            return [self.answer.strip()]
        lines = [re.sub(r"^\s*(?:\d+[.、)]|[-*•])\s*", "", line).strip() for line in text.splitlines()]
        lines = [line for line in lines if line]
        if len(lines) > 1:
            return lines
        sentences = [s.strip() for s in re.split(r"(?<=[。；！？.;!?])\s*", text) if s.strip()]
        return sentences or [text]


def content_from_sample(sample: SampleText) -> Content:
    language = "zh" if is_chinese(sample.instruction + sample.response) else "en"
    return Content(sample.instruction.strip(), sample.response.strip(), sample.reasoning.strip(), language)


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", " ", text).replace("|", "／").strip()


@dataclass
class Layout:
    """What the chosen shape constraints ask of the answer."""

    structure: Optional[tuple[str, dict]] = None
    bold: bool = False
    prefix: str = ""
    title: str = ""
    suffix: str = ""
    postscript: str = ""
    quote: bool = False


def render(content: Content, layout: Layout) -> str:
    answer_line = ANSWER_LABEL[content.language] + content.answer
    if layout.bold:
        answer_line = f"**{_one_line(answer_line)}**"
    steps = content.steps if content.reasoning else []
    kind, params = layout.structure or (None, {})
    if kind == "json_keys":
        roles = {"answer": content.answer, "reasoning": content.reasoning or content.answer,
                 "question": content.question}
        body = json.dumps({key: roles[role] for key, role in params["roles"].items()}, ensure_ascii=False, indent=2)
    elif kind == "markdown_table":
        columns = params["columns"]
        rows = [(str(i), _one_line(step)) for i, step in enumerate(steps, start=1)]
        answer_cell = _one_line(content.answer)  # the row label already says "答案"
        rows.append((ANSWER_LABEL[content.language].strip(" ：:"), f"**{answer_cell}**" if layout.bold else answer_cell))
        body = "\n".join([f"| {columns[0]} | {columns[1]} |", "| --- | --- |"] + [f"| {a} | {b} |" for a, b in rows])
    elif kind == "markdown_list":
        items = [_one_line(step) for step in steps] + [_one_line(answer_line)]
        marker = (lambda i: f"{i}. ") if params["style"] == "numbered" else (lambda i: "- ")
        body = "\n".join(marker(i) + item for i, item in enumerate(items, start=1))
    elif kind == "paragraphs":
        n = params["n"]
        groups = _split_evenly(steps, n - 1) if steps else []
        paragraphs = ["".join(group) if content.language == "zh" else " ".join(group) for group in groups]
        paragraphs = [p for p in paragraphs if p] + [answer_line]
        body = "\n\n***\n\n".join(paragraphs)
    elif kind == "latex_boxed":
        working = "\n".join(steps)
        boxed = f"$\\boxed{{{_one_line(content.answer)}}}$"
        label = "最终答案：" if content.language == "zh" else "Final answer: "
        body = (working + "\n\n" if working else "") + (f"**{label}{boxed}**" if layout.bold else label + boxed)
    else:
        working = "\n".join(steps)
        body = (working + "\n\n" if working else "") + answer_line
    if layout.title:
        body = f"<<{layout.title}>>\n\n{body}"
    if layout.prefix:
        body = f"{layout.prefix}{body}" if content.language == "zh" else f"{layout.prefix} {body}"
    if layout.postscript:
        body = f"{body}\n\nP.S. {layout.postscript}"
    if layout.suffix:
        body = f"{body}\n\n{layout.suffix}"
    if layout.quote:
        body = f"\"{body}\""
    return body


def _split_evenly(items: list, parts: int) -> list[list]:
    """Exactly ``parts`` consecutive, non-empty groups (fewer only if there are fewer items)."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    groups, start = [], 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        groups.append(items[start:end])
        start = end
    return groups


# --------------------------------------------------------------------------------------------
# Verifiers (response, params) → (ok, reason)
# --------------------------------------------------------------------------------------------
def measure_length(text: str, language: str) -> int:
    """Characters (without blanks) for Chinese, words for English."""
    if language == "zh":
        return len(re.sub(r"\s+", "", text))
    return len(re.findall(r"\b[\w'-]+\b", text))


def _strip_fence(text: str) -> str:
    match = re.fullmatch(r"\s*```(?:json)?\s*(.*?)\s*```\s*", text, re.DOTALL)
    return match.group(1) if match else text.strip()


def verify_json_keys(response: str, params: dict) -> tuple[bool, str]:
    try:
        value = json.loads(_strip_fence(response))
    except json.JSONDecodeError as exc:
        return False, f"not valid JSON ({exc.msg})"
    if not isinstance(value, dict):
        return False, "JSON is not an object"
    expected = set(params["keys"])
    if set(value) != expected:
        return False, f"keys {sorted(value)} != {sorted(expected)}"
    if any(v in (None, "", [], {}) for v in value.values()):
        return False, "a key has an empty value"
    return True, ""


_TABLE_SEPARATOR = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?$")


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def verify_markdown_table(response: str, params: dict) -> tuple[bool, str]:
    lines = [line.strip() for line in response.splitlines()]
    columns = [str(c) for c in params["columns"]]
    for index, line in enumerate(lines[:-1]):
        if "|" in line and _cells(line) == columns and _TABLE_SEPARATOR.match(lines[index + 1]):
            rows = 0
            for row in lines[index + 2:]:
                if "|" not in row or len(_cells(row)) != len(columns):
                    break
                rows += 1
            if rows >= params["min_rows"]:
                return True, ""
            return False, f"table has {rows} rows, needs {params['min_rows']}"
    return False, f"no Markdown table with header {columns}"


def verify_markdown_list(response: str, params: dict) -> tuple[bool, str]:
    pattern = r"^\s*\d+[.)]\s+\S" if params["style"] == "numbered" else r"^\s*[-*+]\s+\S"
    count = len(re.findall(pattern, response, re.MULTILINE))
    return (count >= params["min_items"],
            f"{count} {params['style']} items, needs {params['min_items']}" if count < params["min_items"] else "")


def verify_paragraphs(response: str, params: dict) -> tuple[bool, str]:
    parts = re.split(r"\n\s*\*\*\*\s*\n", response.strip())
    if len(parts) != params["n"] or any(not part.strip() for part in parts):
        return False, f"{len(parts)} paragraphs separated by ***, needs exactly {params['n']}"
    return True, ""


def verify_latex_boxed(response: str, params: dict) -> tuple[bool, str]:
    for match in re.finditer(r"\\boxed\{", response):
        depth, index = 1, match.end()
        while index < len(response) and depth:
            depth += {"{": 1, "}": -1}.get(response[index], 0)
            index += 1
        if depth == 0 and response[match.end():index - 1].strip():
            return True, ""
    return False, "no non-empty \\boxed{...}"


def verify_max_length(response: str, params: dict) -> tuple[bool, str]:
    length = measure_length(response, params["unit_language"])
    return length <= params["limit"], f"length {length} > {params['limit']}" if length > params["limit"] else ""


def verify_min_length(response: str, params: dict) -> tuple[bool, str]:
    length = measure_length(response, params["unit_language"])
    return length >= params["limit"], f"length {length} < {params['limit']}" if length < params["limit"] else ""


def verify_language(response: str, params: dict) -> tuple[bool, str]:
    ratio = cjk_ratio(response)
    ok = ratio >= 0.5 if params["lang"] == "zh" else ratio <= 0.05
    return ok, "" if ok else f"CJK share {ratio:.2f} does not fit {params['lang']}"


def verify_include_keywords(response: str, params: dict) -> tuple[bool, str]:
    missing = [word for word in params["keywords"] if word.lower() not in response.lower()]
    return not missing, f"missing keywords {missing}" if missing else ""


def verify_exclude_words(response: str, params: dict) -> tuple[bool, str]:
    found = [word for word in params["words"] if word.lower() in response.lower()]
    return not found, f"forbidden words present {found}" if found else ""


def verify_start_with(response: str, params: dict) -> tuple[bool, str]:
    ok = response.lstrip().startswith(params["prefix"])
    return ok, "" if ok else f"does not start with {params['prefix']!r}"


def verify_end_with(response: str, params: dict) -> tuple[bool, str]:
    ok = response.rstrip().endswith(params["suffix"])
    return ok, "" if ok else f"does not end with {params['suffix']!r}"


def verify_postscript(response: str, params: dict) -> tuple[bool, str]:
    ok = re.search(r"(?m)^\s*P\.S\.\s*\S", response) is not None
    return ok, "" if ok else "no line starting with P.S."


def verify_title(response: str, params: dict) -> tuple[bool, str]:
    ok = re.search(r"<<[^<>\n]+>>", response) is not None
    return ok, "" if ok else "no <<title>>"


def verify_bold_answer(response: str, params: dict) -> tuple[bool, str]:
    ok = re.search(r"\*\*[^*\n]+\*\*", response) is not None
    return ok, "" if ok else "no **bold** text"


def verify_quote_wrap(response: str, params: dict) -> tuple[bool, str]:
    text = response.strip()
    ok = len(text) >= 2 and text[0] == '"' and text[-1] == '"'
    return ok, "" if ok else "not wrapped in double quotes"


# --------------------------------------------------------------------------------------------
# Kinds: how params are checked, drawn, phrased and verified
# --------------------------------------------------------------------------------------------
def _by_language(value, language: str):
    return value.get(language) if isinstance(value, dict) else value


def _draw(spec, rng: random.Random):
    if isinstance(spec, dict) and "min" in spec:
        return rng.randint(int(spec["min"]), int(spec["max"]))
    return spec


def _list_text(items, language: str) -> str:
    return ("、".join(items) if language == "zh" else ", ".join(f'"{i}"' for i in items))


@dataclass
class Kind:
    verify: Callable[[str, dict], tuple[bool, str]]
    stage: str  # "shape" (drawn before rendering) or "observe" (drawn from the rendered answer)
    required_params: tuple = ()
    languages_from_params: Optional[str] = None  # a param keyed by language limits the languages

    def check_params(self, params: dict, where: str) -> None:
        missing = [name for name in self.required_params if name not in params]
        if missing:
            raise UserError(f"{where}: missing params {missing}")


KINDS: dict[str, Kind] = {
    "json_keys": Kind(verify_json_keys, "shape", ("keysets",), "keysets"),
    "markdown_table": Kind(verify_markdown_table, "shape", ("columns", "min_rows"), "columns"),
    "markdown_list": Kind(verify_markdown_list, "shape", ("style", "min_items")),
    "paragraphs": Kind(verify_paragraphs, "shape", ("n",)),
    "latex_boxed": Kind(verify_latex_boxed, "shape"),
    "max_length": Kind(verify_max_length, "observe", ("factor", "round_to")),
    "min_length": Kind(verify_min_length, "observe", ("factor", "round_to")),
    "language": Kind(verify_language, "observe"),
    "include_keywords": Kind(verify_include_keywords, "observe", ("count",)),
    "exclude_words": Kind(verify_exclude_words, "observe", ("count", "words"), "words"),
    "start_with": Kind(verify_start_with, "shape", ("prefix",), "prefix"),
    "end_with": Kind(verify_end_with, "shape", ("suffix",), "suffix"),
    "postscript": Kind(verify_postscript, "shape", ("note",), "note"),
    "title": Kind(verify_title, "shape", ("text",), "text"),
    "bold_answer": Kind(verify_bold_answer, "shape"),
    "quote_wrap": Kind(verify_quote_wrap, "shape"),
}


def supports_language(template: ConstraintTemplate, language: str) -> bool:
    if not template.phrasings.get(language):
        return False
    keyed = KINDS[template.kind].languages_from_params
    return keyed is None or _by_language(template.params[keyed], language) is not None


def shape_params(template: ConstraintTemplate, content: Content, rng: random.Random) -> dict:
    """Parameters fixed before the answer is laid out."""
    p, language = template.params, content.language
    kind = template.kind
    if kind == "json_keys":
        keysets = _by_language(p["keysets"], language)
        roles = dict(keysets[rng.randrange(len(keysets))])
        if not content.reasoning:  # nothing to put under a reasoning key: ask only for the others
            roles = {key: role for key, role in roles.items() if role != "reasoning"} or roles
        return {"keys": list(roles), "roles": roles}
    if kind == "markdown_table":
        choices = _by_language(p["columns"], language)
        rows_available = len(content.steps if content.reasoning else []) + 1
        return {"columns": [str(c) for c in choices[rng.randrange(len(choices))]],
                "min_rows": min(_draw(p["min_rows"], rng), rows_available)}
    if kind == "markdown_list":
        styles = p["style"]
        items_available = len(content.steps if content.reasoning else []) + 1
        return {"style": styles[rng.randrange(len(styles))], "min_items": min(_draw(p["min_items"], rng), items_available)}
    if kind == "paragraphs":
        steps = len(content.steps) if content.reasoning else 0
        return {"n": max(2, min(_draw(p["n"], rng), steps + 1))} if steps else {"n": 0}
    if kind in ("start_with", "end_with", "postscript", "title"):
        name = {"start_with": "prefix", "end_with": "suffix", "postscript": "note", "title": "text"}[kind]
        choices = _by_language(p[name], language)
        return {name: choices[rng.randrange(len(choices))]}
    return {}


def applicable(template: ConstraintTemplate, content: Content) -> bool:
    kind = template.kind
    if kind in ("markdown_table", "markdown_list", "paragraphs") and not content.reasoning:
        return False  # a one-row table or one-item list is not a meaningful constraint
    if kind == "latex_boxed":
        return len(content.answer) <= int(template.params.get("max_answer_chars", 80)) and "\n" not in content.answer
    return True


def observed_params(template: ConstraintTemplate, content: Content, response: str, rng: random.Random) -> Optional[dict]:
    """Parameters drawn from the conforming answer; None when the constraint cannot be met."""
    p, language = template.params, content.language
    kind = template.kind
    if kind in ("max_length", "min_length"):
        length = measure_length(response, language)
        factor = rng.uniform(float(p["factor"]["min"]), float(p["factor"]["max"]))
        step = int(p["round_to"])
        if kind == "max_length":
            limit = int(math.ceil(length * factor / step) * step)
        else:
            limit = int(math.floor(length * factor / step) * step)
            if limit < step:
                return None
        return {"limit": limit, "unit_language": language}
    if kind == "language":
        return {"lang": language}
    if kind == "include_keywords":
        candidates = keyword_candidates(response, language)
        if not candidates:
            return None
        count = min(_draw(p["count"], rng), len(candidates))
        return {"keywords": rng.sample(candidates, count)}
    if kind == "exclude_words":
        words = [w for w in _by_language(p["words"], language) if w.lower() not in response.lower()]
        if not words:
            return None
        return {"words": rng.sample(words, min(_draw(p["count"], rng), len(words)))}
    raise AssertionError(f"{kind} is not an observed kind")


def a_priori_params(template: ConstraintTemplate, language: str, rng: random.Random,
                    keywords: list[str]) -> Optional[dict]:
    """Observed kinds for instructions whose answer does not exist yet (``data augment``)."""
    p, kind = template.params, template.kind
    if kind in ("max_length", "min_length"):
        choices = _by_language(p.get("a_priori") or {}, language)
        if not choices:
            return None
        return {"limit": int(choices[rng.randrange(len(choices))]), "unit_language": language}
    if kind == "language":
        return {"lang": language}
    if kind == "include_keywords":
        if not keywords:
            return None
        return {"keywords": rng.sample(keywords, min(_draw(p["count"], rng), len(keywords)))}
    if kind == "exclude_words":
        words = _by_language(p["words"], language)
        return {"words": rng.sample(words, min(_draw(p["count"], rng), len(words)))}
    raise AssertionError(f"{kind} is not an observed kind")


_FINANCE_TERMS = sorted({w for words in TAXONOMY.values() for w in words if re.search(r"[\u4e00-\u9fff]", w)},
                        key=len, reverse=True)


def keyword_candidates(text: str, language: str) -> list[str]:
    """Words a required-keyword constraint can ask for: numbers and finance terms already present."""
    found = []
    for number in re.findall(r"\d[\d,]*(?:\.\d+)?", text):
        if len(number) >= 3 and number not in found:
            found.append(number)
    if language == "zh":
        found += [term for term in _FINANCE_TERMS if len(term) >= 2 and term in text and term not in found]
    else:
        words = re.findall(r"\b[A-Za-z]{6,}\b", text)
        found += [w for w in dict.fromkeys(w.lower() for w in words) if w not in EN_STOPWORDS]
    return found[:12]


def phrase(template: ConstraintTemplate, params: dict, language: str, rng: random.Random) -> str:
    texts = template.phrasings[language]
    values = {
        "keys": _list_text(params.get("keys", []), language),
        "columns": " | ".join(params.get("columns", [])),
        "min_rows": params.get("min_rows", ""),
        "min_items": params.get("min_items", ""),
        "style_name": LIST_STYLE_NAMES[language].get(params.get("style", ""), ""),
        "n": params.get("n", ""),
        "limit": params.get("limit", ""),
        "lang_name": LANGUAGE_NAMES[language].get(params.get("lang", ""), ""),
        "keywords": _list_text(params.get("keywords", []), language),
        "words": _list_text(params.get("words", []), language),
        "prefix": params.get("prefix", ""),
        "suffix": params.get("suffix", ""),
        "title": params.get("text", ""),
    }
    return texts[rng.randrange(len(texts))].format(**values)


def verify(constraints: list[dict], response: str) -> list[dict]:
    """Check a response against emitted constraints ({id, kind, params}); one result per constraint."""
    results = []
    for constraint in constraints:
        kind = KINDS.get(constraint.get("kind"))
        if kind is None:
            raise ValueError(f"unknown constraint kind {constraint.get('kind')!r}")
        ok, reason = kind.verify(response, constraint.get("params") or {})
        results.append({"id": constraint.get("id"), "kind": constraint["kind"], "pass": bool(ok), "reason": reason})
    return results


# --------------------------------------------------------------------------------------------
# Choosing constraints and building items
# --------------------------------------------------------------------------------------------
def choose_templates(catalog: Catalog, language: str, rng: random.Random, count: int,
                     allowed: Callable[[ConstraintTemplate], bool] = lambda t: True) -> list[ConstraintTemplate]:
    """Weighted sampling without replacement, skipping conflicts."""
    pool = [t for t in catalog.templates if supports_language(t, language) and allowed(t)]
    chosen: list[ConstraintTemplate] = []
    while pool and len(chosen) < count:
        total = sum(t.weight for t in pool)
        pick = rng.uniform(0, total)
        for template in pool:
            pick -= template.weight
            if pick <= 0:
                break
        chosen.append(template)
        pool = [t for t in pool if t is not template and not _conflict(t, template)]
    return chosen


def layout_for(chosen: list[tuple[ConstraintTemplate, dict]]) -> Layout:
    layout = Layout()
    for template, params in chosen:
        kind = template.kind
        if kind in ("json_keys", "markdown_table", "markdown_list", "paragraphs", "latex_boxed"):
            layout.structure = (kind, params)
        elif kind == "bold_answer":
            layout.bold = True
        elif kind == "start_with":
            layout.prefix = params["prefix"]
        elif kind == "title":
            layout.title = params["text"]
        elif kind == "end_with":
            layout.suffix = params["suffix"]
        elif kind == "postscript":
            layout.postscript = params["note"]
        elif kind == "quote_wrap":
            layout.quote = True
    return layout


def instruction_text(question: str, phrasings: list[str], language: str, rng: random.Random) -> str:
    if len(phrasings) == 1 and rng.random() < 0.5:
        return f"{question}\n\n{phrasings[0]}"
    header = "回答要求：" if language == "zh" else "Requirements:"
    lines = "\n".join(f"{i}. {text}" for i, text in enumerate(phrasings, start=1))
    return f"{question}\n\n{header}\n{lines}"


def constrain(content: Content, catalog: Catalog, rng: random.Random, max_constraints: int,
              attempts: int = 8) -> Optional[dict]:
    """One constrained instruction with its conforming, verified answer; None if none could be made."""
    for _ in range(attempts):
        count = rng.randint(1, max_constraints)
        templates = choose_templates(catalog, content.language, rng, count, lambda t: applicable(t, content))
        chosen = []
        for template in templates:
            if KINDS[template.kind].stage == "shape":
                params = shape_params(template, content, rng)
                if template.kind == "paragraphs" and params["n"] < 2:
                    continue
                chosen.append((template, params))
        response = render(content, layout_for(chosen))
        observed_ok = True
        for template in templates:
            if KINDS[template.kind].stage == "observe":
                params = observed_params(template, content, response, rng)
                if params is None:
                    observed_ok = False
                    break
                chosen.append((template, params))
        if not observed_ok or not chosen:
            continue
        constraints = [{"id": t.id, "kind": t.kind, "params": params} for t, params in chosen]
        if all(result["pass"] for result in verify(constraints, response)):
            phrasings = [phrase(t, params, content.language, rng) for t, params in chosen]
            return {"instruction": instruction_text(content.question, phrasings, content.language, rng),
                    "output": response, "constraints": constraints, "language": content.language}
    return None


@dataclass
class IfevalStats:
    generated: int = 0
    unsatisfiable: list = field(default_factory=list)
    per_constraint: dict = field(default_factory=dict)

    def count(self, item: dict) -> None:
        self.generated += 1
        for constraint in item["constraints"]:
            self.per_constraint[constraint["id"]] = self.per_constraint.get(constraint["id"], 0) + 1
