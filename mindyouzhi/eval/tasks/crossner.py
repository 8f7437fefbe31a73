"""CrossNER (Liu et al. 2021, ``ner_data/<domain>/{train,dev,test}.txt``): NER as generation.

Files are CoNLL-style: one ``token<TAB>tag`` per line (BIO tags such as ``B-politicalparty``,
``I-person``, ``O``), a blank line between sentences.  ``--data`` is the ``ner_data`` root (every
domain's ``test.txt``), one domain folder (its ``test.txt``) or one file (the domain is its folder's
name).  The entity types of a domain are the types that occur in its files.

Each sentence is one prompt asking for the entities of every type of its domain, one line per type
(``person: Barack Obama; Joe Biden``, ``None`` when there are none); with ``--shots k`` the first k
sentences of the domain's ``train.txt`` are shown answered the same way.  Scoring is entity-level:
an entity is the pair (type, surface text), compared after lower-casing and removing whitespace
(the model writes "U.S." where the tokens read "U.S ."); each sentence contributes true
positives, false positives and false negatives counted as multisets, and **micro F1** sums them —
over all sentences, and per domain.  ``domain_avg_f1`` is the mean of the per-domain micro F1
(how papers average CrossNER's five domains).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mindyouzhi.errors import UserError

from .base import GenerationItem, TaskOptions, check_shot_count, data_error, iter_lines, read_text, require_path

SPLIT_FILE = "test.txt"
EMPTY_ANSWERS = {"none", "n/a", "-", "无", ""}


@dataclass(frozen=True)
class Sentence:
    where: str
    tokens: tuple[str, ...]
    entities: tuple[tuple[str, str], ...]  # (type, text) in order of appearance


def _spans(path: Path, start_line: int, tokens: list[str], tags: list[str]) -> list[tuple[str, str]]:
    entities, current_type, current = [], None, []
    for offset, (token, tag) in enumerate(zip(tokens, tags)):
        if tag == "O":
            prefix, kind = "O", None
        else:
            prefix, _, kind = tag.partition("-")
            if prefix not in ("B", "I") or not kind:
                raise data_error(path, f"line {start_line + offset}", f"tag {tag!r} is not O, B-<type> or I-<type>")
        if prefix in ("O", "B") or kind != current_type:  # an I- after a different type starts a new entity
            if current:
                entities.append((current_type, " ".join(current)))
            current, current_type = ([token], kind) if prefix != "O" else ([], None)
        else:
            current.append(token)
    if current:
        entities.append((current_type, " ".join(current)))
    return entities


def read_conll(path: Path) -> list[Sentence]:
    path = Path(path)
    sentences, tokens, tags, start = [], [], [], 1

    def flush():
        if tokens:
            entities = _spans(path, start, tokens, tags)
            sentences.append(Sentence(f"{path.parent.name}/{path.name}:{start}", tuple(tokens), tuple(entities)))

    for number, line in iter_lines(read_text(path)):
        if not line.strip() or line.startswith("-DOCSTART-"):
            flush()
            tokens, tags, start = [], [], number + 1
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        if len(parts) < 2:
            raise data_error(path, f"line {number}", "expected 'token<TAB>tag'")
        tokens.append(parts[0].strip())
        tags.append(parts[-1].strip())
    flush()
    if not sentences:
        raise data_error(path, "", "no sentences")
    return sentences


def _data_files(data: Path) -> list[Path]:
    data = require_path(data)
    if data.is_file():
        return [data]
    if (data / SPLIT_FILE).is_file():
        return [data / SPLIT_FILE]
    files = sorted(path for path in data.glob(f"*/{SPLIT_FILE}"))
    if not files:
        raise UserError(f"--data {data}: neither a CrossNER domain folder with {SPLIT_FILE} nor a ner_data folder of them")
    return files


def domain_types(files: Sequence[Path], sentences: Sequence[Sentence]) -> list[str]:
    types = {kind for sentence in sentences for kind, _ in sentence.entities}
    for sibling in ("train.txt", "dev.txt"):
        for file in files:
            if (file.parent / sibling).is_file() and file.name != sibling:
                types |= {kind for sentence in read_conll(file.parent / sibling) for kind, _ in sentence.entities}
    return sorted(types)


def _answer(sentence: Sentence, types: Sequence[str]) -> str:
    lines = []
    for kind in types:
        found = [text for entity_type, text in sentence.entities if entity_type == kind]
        lines.append(f"{kind}: {'; '.join(found) if found else 'None'}")
    return "\n".join(lines)


def build_prompt(sentence: Sentence, types: Sequence[str], shots: Sequence[Sentence]) -> str:
    header = (
        "Extract the named entities from the sentence. Write one line per entity type, in the order given, "
        "as 'type: entity; entity', or 'type: None' when the sentence has none of that type.\n"
        f"Entity types: {', '.join(types)}"
    )
    blocks = [f"Sentence: {' '.join(shot.tokens)}\nEntities:\n{_answer(shot, types)}" for shot in shots]
    blocks.append(f"Sentence: {' '.join(sentence.tokens)}\nEntities:\n")
    return header + "\n\n" + "\n\n".join(blocks)


def load_crossner(data: Path, options: TaskOptions) -> list[GenerationItem]:
    items = []
    for file in _data_files(data):
        sentences = read_conll(file)
        types = domain_types([file], sentences)
        shots: list[Sentence] = []
        if options.shots > 0:
            source = options.fewshot_data or file.parent / "train.txt"
            if not Path(source).is_file():
                raise UserError(f"few-shot CrossNER reads {source}, which does not exist (pass --fewshot-data or --shots 0)")
            shots = read_conll(Path(source))[: options.shots]
            check_shot_count(options.shots, len(shots), source)
        domain = file.parent.name
        for sentence in sentences[: options.limit]:
            gold = {"types": types, "entities": [list(entity) for entity in sentence.entities]}
            items.append(GenerationItem(sentence.where, domain, build_prompt(sentence, types, shots), gold, stop=("\n\n",)))
    return items


def _key(text: str) -> str:
    return re.sub(r"\s+", "", text).lower()


def parse_entities(response: str, types: Sequence[str]) -> list[tuple[str, str]]:
    """(type, text) pairs from lines ``type: a; b``; lines naming no known type are ignored."""
    by_name = {kind.lower(): kind for kind in types}
    found = []
    for line in response.splitlines():
        match = re.match(r"^\s*[-*]?\s*([A-Za-z][\w ]*?)\s*[:：]\s*(.*)$", line)
        if not match or match.group(1).lower() not in by_name:
            continue
        for text in re.split(r"[;；|]", match.group(2)):
            text = text.strip().strip("\"'").strip()
            if text.lower() not in EMPTY_ANSWERS:
                found.append((by_name[match.group(1).lower()], text))
    return found


def score_crossner(response: str, item: GenerationItem) -> dict:
    gold = Counter((kind, _key(text)) for kind, text in item.gold["entities"])
    predicted = Counter((kind, _key(text)) for kind, text in parse_entities(response, item.gold["types"]))
    true_positive = sum((gold & predicted).values())
    return {
        "gold": item.gold["entities"],
        "tp": true_positive,
        "fp": sum(predicted.values()) - true_positive,
        "fn": sum(gold.values()) - true_positive,
    }


def _f1(tp: int, fp: int, fn: int) -> dict:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"micro_f1": round(f1, 6), "precision": round(precision, 6), "recall": round(recall, 6)}


def aggregate_crossner(rows: Sequence[dict]):
    def totals(members):
        return (sum(row["tp"] for row in members), sum(row["fp"] for row in members), sum(row["fn"] for row in members))

    by_domain: dict[str, list[dict]] = {}
    for row in rows:
        by_domain.setdefault(row["group"], []).append(row)
    groups = {domain: {"n": len(members), **_f1(*totals(members))} for domain, members in sorted(by_domain.items())}
    metrics = _f1(*totals(rows))
    metrics["domain_avg_f1"] = round(sum(group["micro_f1"] for group in groups.values()) / len(groups), 6) if groups else 0.0
    return metrics, groups, {}
