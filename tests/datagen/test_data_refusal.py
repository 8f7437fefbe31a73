"""Logic-tree word problems: a solver over the emitted tree derives every answerable answer and
cannot derive the target of any unanswerable item."""
from __future__ import annotations

import json
import random

import pytest
from click.testing import CliRunner

from mindyouzhi.datagen.cli import data
from mindyouzhi.datagen.logic_tree import evaluate, iit_annual, solve, variables
from mindyouzhi.datagen.refusal import DOMAINS, LIBRARY, domain_depths


def read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("cut_depth", [None, 1, 2, 3])
def test_solver_answers_answerable_and_fails_unanswerable(tmp_path, cut_depth):
    out = tmp_path / "r.jsonl"
    args = ["refusal", "--out", str(out), "--count", "240", "--languages", "zh,en", "--seed", "11", "--json"]
    if cut_depth:
        args += ["--cut-depth", str(cut_depth)]
    result = CliRunner().invoke(data, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    items = read(out)
    assert len(items) == 240 == summary["items"]
    assert {i["answerable"] for i in items} == {True, False}
    for item in items:
        known = solve(item["tree"])
        given_ids = {n["id"] for n in item["tree"]["nodes"] if n["given"]}
        if item["answerable"]:
            assert item["target"] in known
            assert round(known[item["target"]], 2) == round(item["answer_value"], 2)
            assert item["target"] not in given_ids and item["reasoning"]
        else:
            assert item["target"] not in known, item["id"]
            missing = item["missing"]["quantity"]
            assert missing not in known and missing not in given_ids
            assert item["missing"]["name"] in item["answer"]
            assert any(f.get("cut_input") == missing for f in item["tree"]["formulas"])
            if cut_depth:
                assert item["cut_depth"] == cut_depth == item["missing"]["depth"]
    languages = {i["language"] for i in items}
    assert languages == {"zh", "en"}
    chinese = next(i for i in items if i["language"] == "zh" and not i["answerable"])
    assert chinese["answer"].startswith("无法计算")


def test_given_values_appear_in_the_question(tmp_path):
    out = tmp_path / "r.jsonl"
    CliRunner().invoke(data, ["refusal", "--out", str(out), "--count", "60", "--seed", "3"])
    for item in read(out):
        for node in item["tree"]["nodes"]:
            if node["given"] and node["unit"] == "yuan" and node["value"] >= 1000:
                assert f"{node['value']:,.0f}" in item["question"] or f"{node['value']:,.2f}" in item["question"]


def test_same_seed_same_output(tmp_path):
    runner = CliRunner()
    for name in ("a", "b"):
        runner.invoke(data, ["refusal", "--out", str(tmp_path / f"{name}.jsonl"), "--count", "50", "--seed", "9"])
    runner.invoke(data, ["refusal", "--out", str(tmp_path / "c.jsonl"), "--count", "50", "--seed", "10"])
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert (tmp_path / "a.jsonl").read_bytes() != (tmp_path / "c.jsonl").read_bytes()


def test_user_errors(tmp_path):
    runner = CliRunner()
    deepest = max(domain_depths().values())
    too_deep = runner.invoke(data, ["refusal", "--out", str(tmp_path / "x.jsonl"), "--count", "5",
                                    "--cut-depth", str(deepest + 1)])
    assert too_deep.exit_code == 2 and "--cut-depth" in too_deep.output
    unknown = runner.invoke(data, ["refusal", "--out", str(tmp_path / "x.jsonl"), "--count", "5", "--domains", "crypto"])
    assert unknown.exit_code == 2 and "crypto" in unknown.output


def test_library_is_consistent():
    assert domain_depths().keys() == DOMAINS.keys()
    for formula in LIBRARY.formulas.values():
        assert variables(formula.expression) <= set(LIBRARY.quantities)
    assert iit_annual(36_000) == pytest.approx(1_080)
    assert iit_annual(100_000) == pytest.approx(100_000 * 0.10 - 2_520)
    assert evaluate("min(max(a * 0.001, 2), 50)", {"a": 100_000}) == 50
    with pytest.raises(ValueError):
        evaluate("__import__('os')", {})
    rng = random.Random(0)
    for target in ("monthly_payment", "annual_iit", "total_cny_cost"):
        tree = LIBRARY.grow(target, rng, max_depth=3, min_depth=3)
        assert tree.depth >= 3
        quantities = [node.quantity for node in tree.nodes.values()]
        assert len(quantities) == len(set(quantities))
