"""Sentence classification scored by the log-likelihood of each label word.

* Financial PhraseBank: ``sentence@label`` per line, label in negative / neutral / positive; the
  original release is latin-1 (copies re-encoded as UTF-8 are read as such).  The sentence may
  itself contain ``@``: the label is after the last one.
* SST-5: ``label text`` per line, label 0-4 (very negative … very positive).

Prompt (one block per few-shot example, then the sentence)::

    Classify the sentiment of each financial news sentence as negative, neutral or positive.

    Sentence: {sentence}
    Sentiment: {label}

and the continuations are `` negative``, `` neutral``, `` positive`` (the space belongs to the
word for BPE tokenizers).  Few-shot examples come from ``--fewshot-data`` (same format), taken
round-robin over the labels so every label is shown.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from mindyouzhi.errors import UserError

from .base import ChoiceItem, TaskOptions, balanced_shots, check_shot_count, data_error, iter_lines, read_text, require_file

FPB_LABELS = ("negative", "neutral", "positive")
SST5_LABELS = ("very negative", "negative", "neutral", "positive", "very positive")


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


def parse_sst5_line(path: Path, number: int, line: str) -> Optional[LabelledSentence]:
    if not line.strip():
        return None
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
        blocks = [_block(form, shot.sentence, shot.label) for shot in shots] + [_block(form, sentence.sentence)]
        items.append(
            ChoiceItem(
                item_id=sentence.item_id,
                group=sentence.label,
                context=form.instruction + "\n\n" + "\n\n".join(blocks),
                choices=tuple(" " + label for label in form.labels),
                labels=form.labels,
                gold=form.labels.index(sentence.label),
            )
        )
    return items
