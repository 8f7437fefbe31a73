"""HellaSwag: the official ``hellaswag_{train,val}.jsonl`` or llama.cpp's 6-line text (plain or .bz2).

Official JSONL records (``ctx_a``, ``ctx_b``, ``endings``, ``label``, ``activity_label``, ...) are
preprocessed as lm-evaluation-harness does: the context is ``activity_label: ctx_a Ctx_b`` (ctx_b
capitalised), and context and endings drop WikiHow's bracketed markers (`` [title]`` becomes ``. ``,
other ``[...]`` are removed) and double spaces.  The format is recognised by the first character.

In the text format each item is six lines: the context (``activity_label: ctx``, already preprocessed), the gold
ending index 0-3, then the four endings.  Each ending is scored as the continuation ``" " + ending``
after the context; the reported ``acc_norm`` (the primary metric) picks the ending with the highest
log-likelihood per character, as lm-evaluation-harness does, because longer endings otherwise lose
simply for having more tokens.
"""
from __future__ import annotations

import re
from pathlib import Path

from mindyouzhi.errors import UserError

from .base import ChoiceItem, TaskOptions, check_shot_count, data_error, json_objects, read_text, require_file

LINES_PER_ITEM = 6
ENDINGS = 4


def preprocess(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _read_jsonl(path: Path) -> list[tuple[str, str, tuple[str, ...], int]]:
    items = []
    for where, record in json_objects(path):
        missing = [key for key in ("ctx_a", "ctx_b", "endings", "label", "activity_label") if key not in record]
        if missing:
            raise data_error(path, where, f"missing {', '.join(missing)} (official HellaSwag jsonl fields)")
        endings = record["endings"]
        if not isinstance(endings, list) or len(endings) != ENDINGS or not all(isinstance(e, str) and e.strip() for e in endings):
            raise data_error(path, where, f"'endings' must be {ENDINGS} non-empty strings")
        if str(record["label"]).strip() not in {str(index) for index in range(ENDINGS)}:
            raise data_error(path, where, f"'label' {record['label']!r} is not 0-3 (the test split has no labels: use val)")
        context = f"{record['activity_label']}: {record['ctx_a']} {str(record['ctx_b']).capitalize()}"
        item_id = f"{path.name}:{record.get('ind', where)}"
        items.append((item_id, preprocess(context), tuple(preprocess(e) for e in endings), int(record["label"])))
    return items


def read_hellaswag(path: Path) -> list[tuple[str, str, tuple[str, ...], int]]:
    """(item id, context, endings, gold index) per item."""
    path = Path(path)
    text = read_text(path)
    if text.lstrip().startswith(("{", "[")):
        return _read_jsonl(path)
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) % LINES_PER_ITEM:
        first = len(lines) - len(lines) % LINES_PER_ITEM + 1
        raise data_error(path, f"line {first}", f"incomplete item: {len(lines) % LINES_PER_ITEM} line(s) where 6 are expected (context, gold index, 4 endings)")
    items = []
    for start in range(0, len(lines), LINES_PER_ITEM):
        context, gold_line, *endings = lines[start : start + LINES_PER_ITEM]
        where = f"line {start + 1}"
        if not context.strip():
            raise data_error(path, where, "empty context line")
        if gold_line.strip() not in {str(index) for index in range(ENDINGS)}:
            raise data_error(path, f"line {start + 2}", f"gold index {gold_line!r} is not 0-3 (is the file in the 6-line format?)")
        for offset, ending in enumerate(endings):
            if not ending.strip():
                raise data_error(path, f"line {start + 3 + offset}", "empty ending")
        items.append((f"{path.name}:{start + 1}", context.strip(), tuple(ending.strip() for ending in endings), int(gold_line)))
    return items


def load_hellaswag(data: Path, options: TaskOptions) -> list[ChoiceItem]:
    records = read_hellaswag(require_file(data))[: options.limit]
    prefix = ""
    if options.shots > 0:
        if options.fewshot_data is None:
            raise UserError("few-shot hellaswag needs --fewshot-data FILE (same 6-line format), e.g. the train split")
        pool = read_hellaswag(require_file(options.fewshot_data, "--fewshot-data"))
        check_shot_count(options.shots, len(pool), options.fewshot_data)
        prefix = "".join(f"{context} {endings[gold]}\n\n" for _, context, endings, gold in pool[: options.shots])
    return [
        ChoiceItem(
            item_id=item_id,
            group="hellaswag",
            context=prefix + context,
            choices=tuple(" " + ending for ending in endings),
            labels=tuple(str(index) for index in range(ENDINGS)),
            gold=gold,
        )
        for item_id, context, endings, gold in records
    ]
