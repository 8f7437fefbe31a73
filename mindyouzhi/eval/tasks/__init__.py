"""Benchmark formats and the registry ``TASKS`` (task name → ``TaskSpec``).

One module per format family: ``exam_csv`` (C-Eval, FinEval, FinanceIQ), ``cflue`` (knowledge) and
``cflue_app`` (applications), ``classification`` (Financial PhraseBank, SST-5), ``hellaswag``,
``ifeval``, ``math500``, ``crossner``, ``amounts`` (RMB amount conversions), ``jsonl`` (generic multiple choice and generation).  A task's ``load(data, options)`` returns scorer-ready items; scoring and
aggregation live in ``mindyouzhi.eval.bench``.
"""
from __future__ import annotations

from functools import partial

from mindyouzhi.errors import UserError

from .amounts import aggregate_amounts, load_amounts, score_amount
from .base import ChoiceItem, GenerationItem, Item, TaskOptions, TaskSpec
from .cflue import load_cflue
from .cflue_app import aggregate_cflue_app, load_cflue_app, score_cflue_app
from .crossner import aggregate_crossner, load_crossner, score_crossner
from .ifeval import aggregate_ifeval, load_ifeval, score_ifeval
from .math500 import load_math500, score_math
from .classification import FPB, SST5, load_classification
from .exam_csv import load_exam
from .hellaswag import load_hellaswag
from .jsonl import load_generation, load_mcq
from .labels import aggregate_labels, load_labels, score_label
from .subjects import CEVAL_SUBJECTS, FINEVAL_SUBJECTS

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("ceval", "choice", "accuracy", 5, partial(load_exam, subject_names=CEVAL_SUBJECTS),
                 "C-Eval per-subject CSV, answer letter log-likelihood", letter_answers=True),
        TaskSpec("fineval", "choice", "accuracy", 5, partial(load_exam, subject_names=FINEVAL_SUBJECTS),
                 "FinEval per-subject CSV, answer letter log-likelihood", letter_answers=True),
        TaskSpec("financeiq", "choice", "accuracy", 5, partial(load_exam, subject_names={}, answer_split="test"),
                 "FinanceIQ per-subject CSV, answer letter log-likelihood", letter_answers=True),
        TaskSpec("cflue", "choice", "accuracy", 0, load_cflue,
                 "CFLUE knowledge JSON: single/multiple answer and true/false, exact-set scoring", letter_answers=True,
                 grouped_by="question type"),
        TaskSpec("fpb", "choice", "accuracy", 0, partial(load_classification, form=FPB),
                 "Financial PhraseBank sentence@label, label log-likelihood", grouped_by="gold label",
                 classification=True),
        TaskSpec("sst5", "choice", "accuracy", 0, partial(load_classification, form=SST5),
                 "SST-5 from stsa.fine ('label text') or the PTB trees, label log-likelihood", grouped_by="gold label",
                 classification=True),
        TaskSpec("hellaswag", "choice", "acc_norm", 0, load_hellaswag,
                 "HellaSwag official jsonl or llama.cpp 6-line text, per-character normalised ending log-likelihood",
                 grouped_by="none"),
        TaskSpec("ifeval", "generation", "prompt_level_strict_acc", 0, load_ifeval,
                 "IFEval input_data.jsonl: verifiable instructions, strict/loose prompt- and instruction-level accuracy",
                 grouped_by="instruction id", score=score_ifeval, aggregate=aggregate_ifeval, group_metric="strict"),
        TaskSpec("math500", "generation", "accuracy", 0, load_math500,
                 "MATH-500 test.jsonl: last \\boxed{} answer, math-verify equivalence", grouped_by="subject",
                 score=score_math, group_metric="accuracy"),
        TaskSpec("crossner", "generation", "micro_f1", 0, load_crossner,
                 "CrossNER ner_data CoNLL BIO: entity lists per type, entity-level micro F1 per domain",
                 grouped_by="domain", score=score_crossner, aggregate=aggregate_crossner, group_metric="micro_f1"),
        TaskSpec("cflue-app", "generation", "score", 0, load_cflue_app,
                 "CFLUE application.json: classification accuracy, extraction F1, ROUGE-L, BLEU per task",
                 grouped_by="task", score=score_cflue_app, aggregate=aggregate_cflue_app, group_metric="score"),
        TaskSpec("rmb-amounts", "generation", "amount_correct", 0, load_amounts,
                 "RMB amount conversions (gen-jsonl records): the first amount of the asked kind (大写 or digits) "
                 "has the gold's value", grouped_by="group", score=score_amount, aggregate=aggregate_amounts,
                 group_metric="amount_correct"),
        TaskSpec("label-jsonl", "generation", "accuracy", 0, load_labels,
                 "closed-label classification by generation (gen-jsonl records, one label per gold): the first "
                 "line is the label, ignoring case, quotes and punctuation", grouped_by="group", score=score_label,
                 aggregate=aggregate_labels, group_metric="accuracy"),
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
