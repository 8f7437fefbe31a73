"""Official HellaSwag jsonl, SST-5 PTB trees, and calibrated classification scoring."""
import json

import numpy as np
import pytest

from eval_fakes import PieceTokenizer
from mindyouzhi.errors import UserError
from mindyouzhi.eval.bench import BenchSettings, prepare_task, run_bench
from mindyouzhi.eval.tasks import TASKS, TaskOptions
from mindyouzhi.eval.tasks.classification import SST5, read_sentences
from mindyouzhi.eval.tasks.hellaswag import read_hellaswag


def test_hellaswag_official_jsonl_with_lm_eval_preprocessing(tmp_path):
    records = [
        {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
         "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
         "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                     "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "source_id": "activitynet~v_-JhWjGDPHMY"},
        {"ind": 92, "activity_label": "Clean and jerk", "ctx_a": "[header] How to lift. [title] Grip the bar.",
         "ctx_b": "then", "label": "0", "endings": ["lift [step] it  up.", "drop it.", "sit.", "run."]},
    ]
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    items = read_hellaswag(path)
    assert items[0] == ("hellaswag_val.jsonl:24", "Roof shingle removal: A man is sitting on a roof. He",
                        tuple(records[0]["endings"]), 3)
    # " [title]" → ". ", other [..] markers removed, double spaces collapsed.
    assert items[1][1] == "Clean and jerk: How to lift.. Grip the bar. Then"
    assert items[1][2][0] == "lift it up." and items[1][3] == 0
    choice = TASKS["hellaswag"].load(path, TaskOptions())[0]
    assert choice.choices[3] == " starts pulling up roofing on a roof." and choice.gold == 3
    records[0]["label"] = ""
    path.write_text(json.dumps(records[0]) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="the test split has no labels"):
        read_hellaswag(path)


def test_sst5_from_ptb_trees(tmp_path):
    trees = tmp_path / "trees" / "dev.txt"
    trees.parent.mkdir()
    trees.write_text(
        "(3 (2 It) (4 (4 (2 's) (4 (3 (2 a) (4 (3 lovely) (2 film))))) (2 .)))\n"
        "(0 (1 (2 -LRB-) (1 awful)) (2 (2 -RRB-) (2 !)))\n", encoding="utf-8")
    sentences = read_sentences(trees, SST5)
    assert [(s.sentence, s.label) for s in sentences] == [("It 's a lovely film .", "positive"),
                                                          ("( awful ) !", "very negative")]
    trees.write_text("(7 (2 x))\n", encoding="utf-8")
    with pytest.raises(UserError, match="dev.txt: line 1: expected a PTB tree"):
        read_sentences(trees, SST5)


PIECES = [" negative", " neutral", " positive", "N/A", "good", "bad", "Sentiment:", "Sentence: "]


class PriorBiasedLM:
    """Label distribution after "Sentiment:" depends on the sentence; "N/A" exposes a negative prior."""

    DISTRIBUTIONS = {"N/A": (0.6, 0.3, 0.1), "good": (0.5, 0.2, 0.3), "bad": (0.9, 0.05, 0.05)}

    def __init__(self):
        self.tokenizer = PieceTokenizer(PIECES)
        self.max_seq_len = 512

    def _row(self, seen):
        row = np.full(self.tokenizer.vocab_size, 1e-6)
        key = next((name for name in self.DISTRIBUTIONS if self.tokenizer.id(name) in seen), "N/A")
        for piece, probability in zip(PIECES[:3], self.DISTRIBUTIONS[key]):
            row[self.tokenizer.id(piece)] = probability
        return np.log(row / row.sum())

    def logprobs(self, batch):
        return [np.stack([self._row(set(seq[:t + 1])) for t in range(len(seq))]).astype(np.float32) for seq in batch]

    def greedy_generate(self, prompt_ids, max_new_tokens, stop_ids=()):
        raise AssertionError("classification does not generate")


def test_calibrated_scoring_removes_the_label_prior(tmp_path):
    data = tmp_path / "fpb.txt"
    data.write_text("good@positive\nbad@negative\n", encoding="utf-8")
    plain = run_bench(PriorBiasedLM(), "fpb", data, settings=BenchSettings(progress=False))
    calibrated = run_bench(PriorBiasedLM(), "fpb", data, settings=BenchSettings(scoring="calibrated", progress=False))
    # Plain: "good" → negative (0.5 > 0.3).  Calibrated: log(0.3/0.1) beats log(0.5/0.6) → positive.
    assert [row["pred"] for row in plain["items"]] == ["negative", "negative"]
    assert [row["pred"] for row in calibrated["items"]] == ["positive", "negative"]
    assert plain["metrics"]["accuracy"] == 0.5 and calibrated["metrics"]["accuracy"] == 1.0
    good = calibrated["items"][0]["logprobs"]
    assert good == pytest.approx([np.log(0.5 / 0.6), np.log(0.2 / 0.3), np.log(0.3 / 0.1)], abs=1e-3)
    assert calibrated["scoring"] == "calibrated"


def test_calibrated_scoring_is_for_classification_only(tmp_path):
    data = tmp_path / "h.txt"
    data.write_text("ctx\n0\na\nb\nc\nd\n", encoding="utf-8")
    with pytest.raises(UserError, match="--scoring calibrated applies to label-word classification"):
        prepare_task("hellaswag", data, scoring="calibrated")
