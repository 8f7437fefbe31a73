"""data banking: dialogues with gold labels and spans, and the evaluation that scores predictions."""
from __future__ import annotations

import datetime as dt
import json
import re

from click.testing import CliRunner

from mindyouzhi.datagen.amounts import parse_arabic, to_lower
from mindyouzhi.datagen.banking import INTENTS, L1_LABELS, SLOTS
from mindyouzhi.datagen.cli import data


def generate(tmp_path, *extra):
    out = tmp_path / "banking.jsonl"
    result = CliRunner().invoke(data, ["banking", "generate", "--out", str(out), "--count", "400", "--seed", "2",
                                       "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def test_labels_spans_and_coverage(tmp_path):
    summary, items = generate(tmp_path)
    assert set(summary["per_l1"]) == set(L1_LABELS)
    assert set(summary["per_l2"]) == {intent.l2 for intent in INTENTS}
    assert set(summary["per_slot"]) == set(SLOTS)
    assert summary["turns"]["multi_turn"] > 50 and summary["turns"]["single_turn"] > 50
    uppercase_amounts = 0
    for item in items:
        labels = item["labels"]
        intent = next(i for i in INTENTS if i.l2 == labels["intent"]["l2"])
        assert labels["intent"]["l1"] == intent.l1
        assert set(intent.required) <= set(labels["slots"])
        spans = {span["slot"]: span for span in item["spans"]}
        assert set(spans) == set(labels["slots"])  # every labelled slot is mentioned exactly where the span says
        for span in item["spans"]:
            assert item["dialogue"][span["turn"]]["role"] == "user"
            assert item["dialogue"][span["turn"]]["text"][span["start"]:span["end"]] == span["text"]
            assert labels["slots"][span["slot"]] == span["value"]
        if "amount" in labels["slots"]:
            amount = labels["slots"]["amount"]
            assert re.fullmatch(r"\d+\.\d{2}", amount)
            text = spans["amount"]["text"]
            if re.search("[壹贰叁肆伍陆柒捌玖]", text):
                uppercase_amounts += 1
                assert to_lower(text) == parse_arabic(amount)
        if "date" in labels["slots"]:
            date = dt.date.fromisoformat(labels["slots"]["date"])
            assert date >= dt.date.fromisoformat(item["reference_date"])
        if "term" in labels["slots"]:
            assert re.fullmatch(r"P\d+[MD]", labels["slots"]["term"])
        assert json.loads(item["messages"][-1]["content"]) == labels
    assert uppercase_amounts > 5


def test_eval_scores_predictions(tmp_path):
    _, items = generate(tmp_path)
    gold = tmp_path / "banking.jsonl"
    perfect = tmp_path / "perfect.jsonl"
    perfect.write_text("".join(json.dumps({"id": i["id"], "prediction": json.dumps(i["labels"], ensure_ascii=False)},
                                          ensure_ascii=False) + "\n" for i in items), encoding="utf-8")
    result = CliRunner().invoke(data, ["banking", "eval", str(gold), str(perfect), "--json"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert scores["l1_accuracy"] == scores["l2_accuracy"] == scores["joint_accuracy"] == 1.0
    assert scores["slots_micro"]["f1"] == 1.0
    degraded = tmp_path / "degraded.jsonl"
    with open(degraded, "w", encoding="utf-8") as handle:
        for index, item in enumerate(items[:-10]):  # ten predictions missing
            labels = json.loads(json.dumps(item["labels"]))
            if index % 4 == 0:
                labels["intent"]["l1"] = "other" if labels["intent"]["l1"] != "other" else "loan"
            labels["slots"].pop("amount", None)
            handle.write(json.dumps({"id": item["id"], "labels": labels}, ensure_ascii=False) + "\n")
    scores = json.loads(CliRunner().invoke(data, ["banking", "eval", str(gold), str(degraded), "--json"]).stdout)
    assert scores["missing_predictions"] == 10
    assert 0.6 < scores["l1_accuracy"] < 0.8
    assert scores["per_slot"]["amount"]["recall"] == 0.0
    assert scores["slots_micro"]["precision"] == 1.0


def test_deterministic_and_filterable(tmp_path):
    _, first = generate(tmp_path)
    (tmp_path / "banking.jsonl").unlink()
    _, second = generate(tmp_path)
    assert first == second
    summary, items = generate(tmp_path, "--intents", "transfer,balance_query", "--overwrite")
    assert set(summary["per_l2"]) == {i.l2 for i in INTENTS if i.l1 == "transfer"} | {"balance_query"}
    bad = CliRunner().invoke(data, ["banking", "generate", "--out", str(tmp_path / "x.jsonl"), "--count", "3",
                                    "--intents", "crypto"])
    assert bad.exit_code == 2 and "crypto" in bad.output
