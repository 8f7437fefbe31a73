"""Benchmark formats and the registry ``TASKS`` (task name → ``TaskSpec``).

One module per format family: ``exam_csv`` (C-Eval, FinEval, FinanceIQ), ``cflue``,
``classification`` (Financial PhraseBank, SST-5), ``hellaswag``, ``jsonl`` (generic multiple
choice and generation).  A task's ``load(data, options)`` returns scorer-ready items; scoring and
aggregation live in ``mindyouzhi.eval.bench``.
"""
from __future__ import annotations

from functools import partial

from mindyouzhi.errors import UserError

from .base import ChoiceItem, GenerationItem, Item, TaskOptions, TaskSpec
from .cflue import load_cflue
from .classification import FPB, SST5, load_classification
from .exam_csv import load_exam
from .hellaswag import load_hellaswag
from .jsonl import load_generation, load_mcq
from .subjects import CEVAL_SUBJECTS, FINEVAL_SUBJECTS

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("ceval", "choice", "accuracy", 5, partial(load_exam, subject_names=CEVAL_SUBJECTS),
                 "C-Eval per-subject CSV, answer letter log-likelihood", letter_answers=True),
        TaskSpec("fineval", "choice", "accuracy", 5, partial(load_exam, subject_names=FINEVAL_SUBJECTS),
                 "FinEval per-subject CSV, answer letter log-likelihood", letter_answers=True),
        TaskSpec("financeiq", "choice", "accuracy", 5, partial(load_exam, subject_names={}),
                 "FinanceIQ per-subject CSV, answer letter log-likelihood", letter_answers=True),
        TaskSpec("cflue", "choice", "accuracy", 0, load_cflue,
                 "CFLUE knowledge JSON: single/multiple answer and true/false, exact-set scoring", letter_answers=True,
                 grouped_by="question type"),
        TaskSpec("fpb", "choice", "accuracy", 0, partial(load_classification, form=FPB),
                 "Financial PhraseBank sentence@label, label log-likelihood", grouped_by="gold label"),
        TaskSpec("sst5", "choice", "accuracy", 0, partial(load_classification, form=SST5),
                 "SST-5 'label text', label log-likelihood", grouped_by="gold label"),
        TaskSpec("hellaswag", "choice", "acc_norm", 0, load_hellaswag,
                 "HellaSwag 6-line text format, per-character normalised ending log-likelihood", grouped_by="none"),
        TaskSpec("mcq-jsonl", "choice", "accuracy", 0, load_mcq,
                 "generic multiple-choice JSONL, answer letter log-likelihood", letter_answers=True),
        TaskSpec("gen-jsonl", "generation", "exact_match", 0, load_generation,
                 "generic generation JSONL: exact match, JSON per-field accuracy", grouped_by="group"),
    )
}


def get_task(name: str) -> TaskSpec:
    spec = TASKS.get(name)
    if spec is None:
        raise UserError(f"--task {name!r} is not one of {', '.join(TASKS)}")
    return spec


__all__ = ["TASKS", "TaskSpec", "TaskOptions", "ChoiceItem", "GenerationItem", "Item", "get_task"]
