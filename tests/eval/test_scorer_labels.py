"""label-jsonl: a closed-label answer is right when its first line is the label, case and punctuation aside.

The cases come from SmolLM2's answers on the FPB dev split after SFT (bench/sft_choice.py): strict
exact match counted ``Neutral`` as wrong for the gold ``neutral``."""
import json

import pytest

from eval_fakes import PieceTokenizer, ScriptedLM
from mindyouzhi.errors import UserError
from mindyouzhi.eval.bench import BenchSettings, run_bench
from mindyouzhi.eval.bootstrap import task_metric
from mindyouzhi.eval.tasks.base import GenerationItem
from mindyouzhi.eval.tasks.labels import normalise_label, score_label

QUIET = BenchSettings(progress=False)
LABELS = ["negative", "neutral", "positive"]


def item(gold: str) -> GenerationItem:
    return GenerationItem("x", "g", "prompt", {"label": gold, "labels": LABELS})


@pytest.mark.parametrize("response, correct", [
    ("neutral", True),
    ("Neutral", True),                       # the case SFT's answers got wrong under strict exact match
    ("NEUTRAL.", True),
    ("  \"neutral\"  ", True),
    ("“neutral”。", True),                   # CJK quotes and full stop
    ("\n\nneutral\nThe sentence reports a fact.", True),   # the first non-empty line is the answer
    ("positive", False),
    ("neutral sentiment", False),            # more than the label on the answer line
    ("neutral or positive", False),
    ("", False),
])
def test_label_scoring(response, correct):
    assert score_label(response, item("neutral"))["correct"] is correct


def test_exact_match_and_label_validity_are_reported_beside_accuracy():
    row = score_label("Positive", item("neutral"))
    assert (row["correct"], row["exact"], row["label_valid"], row["answer"]) == (False, False, True, "positive")
    row = score_label("Neutral", item("neutral"))
    assert (row["correct"], row["exact"], row["label_valid"]) == (True, False, True)
    row = score_label("neutral", item("neutral"))
    assert row["exact"] is True
    assert score_label("mixed", item("neutral"))["label_valid"] is False
    assert normalise_label("  'Up.'\nmore") == "up"


def test_label_jsonl_task_end_to_end(tmp_path):
    records = [{"id": "a", "prompt": "Sentence: Profit rose.\nSentiment:", "answer": "positive", "group": "positive"},
               {"id": "b", "prompt": "Sentence: Sales fell.\nSentiment:", "answer": "negative", "group": "negative"},
               {"id": "c", "prompt": "Sentence: The board met.\nSentiment:", "answer": "neutral", "group": "neutral"},
               {"id": "d", "prompt": "Sentence: Costs were cut.\nSentiment:", "answer": "positive", "group": "positive"}]
    data = tmp_path / "fpb.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    answers = {"Profit": "Positive", "Sales": "negative", "board": "Neutral.", "Costs": "good"}
    lm = ScriptedLM(PieceTokenizer(), lambda prompt: next(v for k, v in answers.items() if k in prompt))
    result = run_bench(lm, "label-jsonl", data, settings=QUIET)
    assert result["primary_metric"] == "accuracy"
    assert result["metrics"] == {"accuracy": 0.75, "exact_match": 0.25, "label_valid": 0.75}
    assert result["groups"]["positive"] == {"n": 2, "accuracy": 0.5}
    # The bootstrap resamples rows with the same aggregate.
    assert task_metric("label-jsonl", "accuracy")(result["items"]) == pytest.approx(0.75)


@pytest.mark.parametrize("gold", ["", "neutral\npositive", "..."])
def test_a_gold_that_is_not_one_label_is_refused_naming_the_record(tmp_path, gold):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"id": "q3", "prompt": "p", "answer": gold}) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.jsonl: (q3: label-jsonl: the gold answer must be one label|line 1: empty gold)"):
        run_bench(ScriptedLM(PieceTokenizer(), lambda _: ""), "label-jsonl", data, settings=QUIET)
