"""Sentence classification scored by the log-likelihood of each label word.

* Financial PhraseBank: ``sentence@label`` per line, label in negative / neutral / positive; the
  original release is latin-1 (copies re-encoded as UTF-8 are read as such).  The sentence may
  itself contain ``@``: the label is after the last one.
* SST-5: ``label text`` per line, label 0-4 (very negative … very positive) — the ``stsa.fine.*``
  files — or the official Stanford Sentiment Treebank trees (``trees/{train,dev,test}.txt``), one
  PTB bracketed tree per line such as ``(3 (2 It) (4 (2 's) (4 fine)))``: the root's label is the
  sentence's, the leaves joined by spaces are its text (``-LRB-``/``-RRB-`` read as brackets).

Prompt (one block per few-shot example, then the sentence)::

    Classify the sentiment of each financial news sentence as negative, neutral or positive.

    Sentence: {sentence}
    Sentiment: {label}

and the continuations are `` negative``, `` neutral``, `` positive`` (the space belongs to the
word for BPE tokenizers).  Few-shot examples come from ``--fewshot-data`` (same format), taken
round-robin over the labels so every label is shown.  Each item also carries its content-free
prompt — the same prompt with the sentence replaced by ``N/A`` — for ``--scoring calibrated``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from mindyouzhi.errors import UserError

from .base import ChoiceItem, TaskOptions, balanced_shots, check_shot_count, data_error, iter_lines, read_text, require_file

FPB_LABELS = ("negative", "neutral", "positive")
SST5_LABELS = ("very negative", "negative", "neutral", "positive", "very positive")
CONTENT_FREE = "N/A"  # Zhao et al.'s content-free input


@dataclass(frozen=True)
class LabelledSentence:
    item_id: str
    sentence: str
    label: str


@dataclass(frozen=True)
class ClassificationFormat:
    parse_line: Callable[[Path, int, str], Optional[LabelledSentence]]
    labels: tuple[str, ...]
    instruction: str
    text_name: str  # "Sentence" / "Review"
    fallback_encoding: Optional[str] = None


def parse_fpb_line(path: Path, number: int, line: str) -> Optional[LabelledSentence]:
    if not line.strip():
        return None
    sentence, separator, label = line.rpartition("@")
    label = label.strip().lower()
    if not separator or not sentence.strip():
        raise data_error(path, f"line {number}", "expected 'sentence@label'")
    if label not in FPB_LABELS:
        raise data_error(path, f"line {number}", f"label {label!r} is not one of {', '.join(FPB_LABELS)}")
    return LabelledSentence(f"{path.name}:{number}", sentence.strip(), label)


_PTB_BRACKETS = {"-LRB-": "(", "-RRB-": ")", "-LSB-": "[", "-RSB-": "]", "-LCB-": "{", "-RCB-": "}"}


def parse_sst_tree(path: Path, number: int, line: str) -> LabelledSentence:
    root = re.match(r"\(\s*([0-4])\s", line)
    if root is None or line.count("(") != line.count(")"):
        raise data_error(path, f"line {number}", "expected a PTB tree '(label (label word) ...)' with labels 0-4")
    leaves = re.findall(r"\(\s*[0-4]\s+([^()\s]+)\s*\)", line)
    if not leaves:
        raise data_error(path, f"line {number}", "a tree without leaves")
    sentence = " ".join(_PTB_BRACKETS.get(leaf, leaf) for leaf in leaves)
    return LabelledSentence(f"{path.name}:{number}", sentence, SST5_LABELS[int(root.group(1))])


def parse_sst5_line(path: Path, number: int, line: str) -> Optional[LabelledSentence]:
    if not line.strip():
        return None
    if line.lstrip().startswith("("):
        return parse_sst_tree(path, number, line.strip())
    label, _, sentence = line.strip().partition(" ")
    if label not in {"0", "1", "2", "3", "4"}:
        raise data_error(path, f"line {number}", f"expected 'label text' with label 0-4, got {label!r}")
    if not sentence.strip():
        raise data_error(path, f"line {number}", "no text after the label")
    return LabelledSentence(f"{path.name}:{number}", sentence.strip(), SST5_LABELS[int(label)])


FPB = ClassificationFormat(
    parse_line=parse_fpb_line,
    labels=FPB_LABELS,
    instruction="Classify the sentiment of each financial news sentence as negative, neutral or positive.",
    text_name="Sentence",
    fallback_encoding="latin-1",
)

SST5 = ClassificationFormat(
    parse_line=parse_sst5_line,
    labels=SST5_LABELS,
    instruction="Classify the sentiment of each movie review as very negative, negative, neutral, positive or very positive.",
    text_name="Review",
)


def read_sentences(path: Path, form: ClassificationFormat) -> list[LabelledSentence]:
    path = Path(path)
    text = read_text(path, form.fallback_encoding)
    sentences = [parsed for number, line in iter_lines(text) if (parsed := form.parse_line(path, number, line))]
    if not sentences:
        raise data_error(path, "", "no labelled sentences")
    return sentences


def _block(form: ClassificationFormat, sentence: str, label: str = "") -> str:
    answer = f" {label}" if label else ""
    return f"{form.text_name}: {sentence}\nSentiment:{answer}"


def load_classification(data: Path, options: TaskOptions, form: ClassificationFormat) -> list[ChoiceItem]:
    sentences = read_sentences(require_file(data), form)[: options.limit]
    examples: list[LabelledSentence] = []
    if options.shots > 0:
        if options.fewshot_data is None:
            raise UserError("few-shot classification needs --fewshot-data FILE (same format), e.g. a train or dev split")
        pool = read_sentences(require_file(options.fewshot_data, "--fewshot-data"), form)
        examples = balanced_shots(pool, lambda example: example.label, options.shots + 1)
    items = []
    for sentence in sentences:
        # One spare example is drawn so that dropping the sentence itself still leaves k shots.
        shots = [example for example in examples if example.sentence != sentence.sentence][: options.shots]
        check_shot_count(options.shots, len(shots), options.fewshot_data or "")
        blocks = [_block(form, shot.sentence, shot.label) for shot in shots]
        head = form.instruction + "\n\n" + "".join(block + "\n\n" for block in blocks)
        items.append(
            ChoiceItem(
                item_id=sentence.item_id,
                group=sentence.label,
                context=head + _block(form, sentence.sentence),
                calibration_context=head + _block(form, CONTENT_FREE),
                choices=tuple(" " + label for label in form.labels),
                labels=form.labels,
                gold=form.labels.index(sentence.label),
            )
        )
    return items
