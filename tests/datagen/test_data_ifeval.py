"""data ifeval: generated answers pass their verifiers; mutated answers fail them; verify as evaluation."""
from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from mindyouzhi.datagen.cli import data
from mindyouzhi.datagen.ifeval import KINDS, load_catalog, verify

SAMPLES = [
    {"question": "小王贷款50万元，年利率3.6%，期限20年，等额本息，每月还款多少？", "answer": "每月还款约2925.62元。",
     "reasoning": "月利率 = 3.6% ÷ 12 = 0.3%\n还款月数 = 20 × 12 = 240\n月供 = 500000 × 0.003 × 1.003^240 ÷ (1.003^240 − 1) ≈ 2925.62元"},
    {"question": "一批货物不含税金额为10000元，增值税税率13%，价税合计是多少？", "answer": "价税合计为11300元。",
     "reasoning": "税额 = 10000 × 13% = 1300元。价税合计 = 10000 + 1300 = 11300元。"},
    {"question": "What is the simple interest on a 20,000 yuan deposit at 2% for 3 years?", "answer": "The interest is 1,200 yuan.",
     "reasoning": "Interest equals principal times rate times years.\nSo 20,000 times 0.02 times 3 equals 1,200 yuan."},
    {"instruction": "什么是贷款市场报价利率LPR？", "output": "LPR是贷款市场报价利率，由报价行按公开市场操作利率加点报价形成，是银行贷款利率的主要定价基准。"},
    {"messages": [{"role": "user", "content": "How do I report a lost bank card?"},
                  {"role": "assistant", "content": "Call the bank's hotline or use the mobile app to freeze the card immediately."}]},
]


def mutate(kind: str, response: str, params: dict) -> str:
    """A response that breaks exactly what the constraint checks."""
    if kind == "json_keys":
        value = json.loads(response)
        value.pop(next(iter(value)))
        value["extra"] = "x"
        return json.dumps(value, ensure_ascii=False)
    if kind == "markdown_table":
        return response.replace("| --- | --- |", "")
    if kind == "markdown_list":
        return re.sub(r"(?m)^\s*(?:\d+[.)]|[-*+])\s+", "", response)
    if kind == "paragraphs":
        return response.replace("***", "", 1)
    if kind == "latex_boxed":
        return response.replace("\\boxed", "\\mathbf")
    if kind == "max_length":
        return response + (" word" * (params["limit"] + 5) if params["unit_language"] == "en" else "字" * (params["limit"] + 5))
    if kind == "min_length":
        return "短" if params["unit_language"] == "zh" else "short"
    if kind == "language":
        return "This answer is entirely in English now." if params["lang"] == "zh" else "这个回答现在完全是中文。"
    if kind == "include_keywords":
        for keyword in params["keywords"]:
            response = re.sub(re.escape(keyword), "", response, flags=re.IGNORECASE)
        return response
    if kind == "exclude_words":
        return response + params["words"][0]
    if kind == "start_with":
        return "Well, " + response
    if kind == "end_with":
        return response + " Thanks."
    if kind == "postscript":
        return response.replace("P.S.", "PS")
    if kind == "title":
        return response.replace("<<", "").replace(">>", "")
    if kind == "bold_answer":
        return response.replace("**", "")
    if kind == "quote_wrap":
        return response.strip().strip('"')
    raise AssertionError(kind)


@pytest.fixture
def generated(tmp_path):
    source = tmp_path / "qa.jsonl"
    source.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in SAMPLES), encoding="utf-8")
    out = tmp_path / "ifeval.jsonl"
    result = CliRunner().invoke(data, ["ifeval", "generate", str(source), "--out", str(out), "--variants", "40",
                                       "--max-constraints", "3", "--seed", "1", "--json"])
    assert result.exit_code == 0, result.output
    items = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    return json.loads(result.stdout), items, tmp_path


def test_generated_answers_pass_and_mutations_fail(generated):
    summary, items, _ = generated
    assert summary["items"] == len(items) >= 190
    catalog_ids = {t.id for t in load_catalog().templates}
    assert set(summary["per_constraint"]) == catalog_ids  # every template gets used
    mutated_kinds = set()
    for item in items:
        results = verify(item["constraints"], item["output"])
        assert all(r["pass"] for r in results), (item["id"], results)
        for constraint in item["constraints"]:
            broken = mutate(constraint["kind"], item["output"], constraint["params"])
            (result,) = verify([constraint], broken)
            assert not result["pass"], (constraint, broken)
            mutated_kinds.add(constraint["kind"])
        assert item["source"]["question"] in item["instruction"]
    assert mutated_kinds == set(KINDS)


def test_verify_command_scores_model_outputs(generated):
    _, items, tmp_path = generated
    outputs = tmp_path / "model.jsonl"
    with open(outputs, "w", encoding="utf-8") as handle:
        for index, item in enumerate(items):
            response = item["output"] if index % 2 == 0 else mutate(item["constraints"][0]["kind"], item["output"],
                                                                       item["constraints"][0]["params"])
            handle.write(json.dumps({"id": item["id"], "constraints": item["constraints"], "response": response},
                                    ensure_ascii=False) + "\n")
    per_item = tmp_path / "results.jsonl"
    result = CliRunner().invoke(data, ["ifeval", "verify", str(outputs), "--out", str(per_item), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    expected = (len(items) + 1) // 2
    assert summary["prompts"] == len(items)
    assert summary["prompt_level_accuracy"] == round(expected / len(items), 4)
    assert 0.5 < summary["instruction_level_accuracy"] < 1
    results = [json.loads(line) for line in per_item.read_text(encoding="utf-8").splitlines()]
    assert [r["pass"] for r in results] == [i % 2 == 0 for i in range(len(items))]


def test_deterministic_and_language_aware(generated, tmp_path):
    _, items, _ = generated
    source = tmp_path / "qa2.jsonl"
    source.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in SAMPLES), encoding="utf-8")
    out = tmp_path / "again.jsonl"
    CliRunner().invoke(data, ["ifeval", "generate", str(source), "--out", str(out), "--variants", "40",
                              "--max-constraints", "3", "--seed", "1"])
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == items
    english = [i for i in items if i["language"] == "en"]
    assert english and all(not re.search(r"[\u4e00-\u9fff]", i["instruction"].split("\n\n", 1)[-1]) for i in english)


def test_bad_catalog_and_bad_lines(tmp_path):
    catalog = tmp_path / "bad.yaml"
    catalog.write_text("constraints:\n  - id: x\n    kind: nonsense\n    phrasings: {zh: [a]}\n", encoding="utf-8")
    source = tmp_path / "qa.jsonl"
    source.write_text(json.dumps(SAMPLES[0], ensure_ascii=False) + "\n[1, 2]\n", encoding="utf-8")
    runner = CliRunner()
    bad_catalog = runner.invoke(data, ["ifeval", "generate", str(source), "--out", str(tmp_path / "o.jsonl"),
                                       "--templates", str(catalog)])
    assert bad_catalog.exit_code == 2 and "nonsense" in bad_catalog.output
    bad_line = runner.invoke(data, ["ifeval", "generate", str(source), "--out", str(tmp_path / "o.jsonl")])
    assert bad_line.exit_code == 2 and f"{source}:2:" in bad_line.output
    skipped = runner.invoke(data, ["ifeval", "generate", str(source), "--out", str(tmp_path / "o.jsonl"), "--skip-bad",
                                   "--json"])
    assert json.loads(skipped.stdout)["skipped_lines"]["count"] == 1
