"""Finance SFT data for the pipeline, with held-out splits of what SFT teaches.

A 135M model sits near chance on C-Eval/FinEval, so the finance effect of SFT is measured on tasks
it is trained on, scored on items it never saw:

* **FPB sentiment** — the Financial PhraseBank file is split by a hash of each sentence (so a
  duplicate sentence can never sit on both sides); the training records use exactly the zero-shot
  prompt the ``fpb`` task scores, and the held-out split is scored twice: as generation (the
  answer the SFT taught, exact match) and by the standard label log-likelihood.
* **RMB amounts** — ``data amounts generate`` with two seeds; the held-out items are the
  single conversions (upper ↔ lower case, the task the paper singles out as lost in transition)
  whose instruction never occurs in training.
* **Banking intent/slots** — ``data banking generate`` with two seeds; single-turn held-out
  dialogues whose user text never occurs in training, scored field by field (``gen-jsonl``).

Training also gets the refusal word problems (``data refusal``) and the user's own instruction
files (e.g. DISC-FinLLM); the pool is then reduced by ``data compress`` when a budget is given.
Everything is built by the ``mindyouzhi data`` commands (run by the caller) and this module's
pure functions.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator

from mindyouzhi.errors import UserError

FPB_PROMPT = "{instruction}\n\nSentence: {sentence}\nSentiment:"


def hash_unit(text: str, seed: int) -> float:
    """A deterministic draw in [0, 1) for ``text`` under ``seed`` (splits and orders that do not
    depend on file order)."""
    digest = hashlib.sha256(f"{seed}:{text}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def read_jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def write_jsonl(path: Path, records: Iterable[dict]) -> int:
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def split_fpb(path: Path, held_out: float, seed: int) -> tuple[list, list]:
    """(train, held-out) labelled sentences of an FPB file, split by sentence hash.  The held-out
    sentences come in the order of their hash (the file is grouped by label), so the first N of
    them (``eval.heldout_limit``) are a random sample with the file's label mix."""
    from mindyouzhi.eval.tasks.classification import FPB, read_sentences

    if not 0 < held_out < 1:
        raise UserError(f"data.fpb.held_out {held_out}: expected a share between 0 and 1")
    train, test = [], []
    for sentence in read_sentences(Path(path), FPB):
        (test if hash_unit(sentence.sentence, seed) < held_out else train).append(sentence)
    test.sort(key=lambda sentence: hash_unit(sentence.sentence, seed + 1))
    return train, test


def fpb_prompt(sentence: str) -> str:
    from mindyouzhi.eval.tasks.classification import FPB

    return FPB_PROMPT.format(instruction=FPB.instruction, sentence=sentence)


def fpb_records(sentences) -> tuple[list[dict], list[dict]]:
    """SFT records and gen-jsonl items for labelled FPB sentences."""
    sft = [{"instruction": fpb_prompt(s.sentence), "output": s.label} for s in sentences]
    items = [{"id": f"fpb-{i}", "prompt": fpb_prompt(s.sentence), "answer": s.label, "group": s.label}
             for i, s in enumerate(sentences)]
    return sft, items


def write_fpb_lines(path: Path, sentences) -> None:
    """The held-out split in FPB's own ``sentence@label`` format (for the standard ``fpb`` task)."""
    path.write_text("".join(f"{s.sentence}@{s.label}\n" for s in sentences), encoding="utf-8")


def amount_splits(train_path: Path, pool_path: Path, held_out: int) -> tuple[list[dict], list[dict]]:
    """Training records, and held-out single conversions from another seed's pool (never in training)."""
    train = list(read_jsonl(train_path))
    seen = {record["instruction"] for record in train}
    items = []
    for record in read_jsonl(pool_path):
        if len(items) >= held_out:
            break
        if record.get("kind") != "amplified" or record["instruction"] in seen or "\n" in record["output"]:
            continue
        seen.add(record["instruction"])
        items.append({"id": record["id"], "prompt": record["instruction"], "answer": record["output"],
                      "group": record.get("direction", "amount")})
    sft = [{"instruction": record["instruction"], "output": record["output"]} for record in train]
    return sft, items


def banking_prompt(messages: list[dict]) -> str:
    """A single-turn dialogue as one user prompt: the module's instruction, then the user's turn."""
    system = next(message["content"] for message in messages if message["role"] == "system")
    user = next(message["content"] for message in messages if message["role"] == "user")
    return f"{system}\n\n{user}"


def _single_turn(record: dict) -> bool:
    return [message["role"] for message in record.get("messages", [])] == ["system", "user", "assistant"]


def banking_splits(train_path: Path, pool_path: Path, held_out: int) -> tuple[list[dict], list[dict]]:
    train = [record for record in read_jsonl(train_path) if _single_turn(record)]
    seen = {record["messages"][1]["content"] for record in train}
    items = []
    for record in read_jsonl(pool_path):
        if len(items) >= held_out:
            break
        if not _single_turn(record) or record["messages"][1]["content"] in seen:
            continue
        seen.add(record["messages"][1]["content"])
        items.append({"id": record["id"], "prompt": banking_prompt(record["messages"]),
                      "answer": record["messages"][2]["content"], "group": record["labels"]["intent"]["l1"]})
    sft = [{"instruction": banking_prompt(record["messages"]), "output": record["messages"][2]["content"]}
           for record in train]
    return sft, items


def instruction_records(path: Path) -> list[dict]:
    """The user's own SFT files (a file or a directory of .json/.jsonl), as Alpaca-style records."""
    from mindyouzhi.train.sft import conversation, read_records

    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl")) if path.is_dir() else [path]
    if not files:
        raise UserError(f"data.instructions {path}: no .json or .jsonl files")
    records = []
    for file in files:
        for where, record in read_records(file):
            messages = conversation(record, where)
            records.append({"messages": messages})
    return records
