"""data compress: budget, category coverage, quality priority, information gain, determinism, errors."""
from __future__ import annotations

import json
import random

import pytest
from click.testing import CliRunner

from mindyouzhi.datagen.cli import data
from mindyouzhi.datagen.compress import parse_budget, waterfill
from mindyouzhi.datagen.tagging import HeuristicTagger
from mindyouzhi.datagen.samples import SampleText
from mindyouzhi.errors import UserError

TOPICS = {
    "loan": ["房贷", "等额本息", "月供", "提前还款"],
    "deposit": ["定期存款", "大额存单", "储蓄"],
    "fx": ["汇率", "购汇", "美元"],
    "tax": ["个税", "增值税发票", "专项附加扣除"],
    "insurance": ["保费", "理赔", "寿险"],
}


def make_pool(path, seed=0, rare_low_quality=True):
    """A tagged pool: four large categories with mostly high quality, and a tiny low-quality one."""
    rng = random.Random(seed)
    lines = []
    for index in range(480):
        category = ["loan", "deposit", "tax", "insurance"][index % 4]
        words = TOPICS[category]
        text = "，".join(f"{rng.choice(words)}{rng.randint(1, 10 ** rng.randint(2, 6))}元" for _ in range(rng.randint(3, 30)))
        lines.append({"id": index, "instruction": f"关于{rng.choice(words)}的问题{index}：{text}？",
                      "output": text * rng.randint(1, 3),
                      "tags": {"categories": [category, rng.choice(words)], "quality": rng.choice([3, 4, 5, 6, 6]),
                               "complexity": rng.randint(1, 6)}})
    for index in range(2):
        lines.append({"id": 1000 + index, "instruction": f"美元汇率是多少？{index}", "output": "约7.1。",
                      "tags": {"categories": ["fx"], "quality": 2 if rare_low_quality else 5, "complexity": 1}})
    rng.shuffle(lines)
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    return lines


def run(args):
    result = CliRunner().invoke(data, ["compress", *args])
    assert result.exit_code == 0, result.output
    return result


def kept(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_budget_coverage_quality_and_report(tmp_path):
    pool = tmp_path / "pool.jsonl"
    make_pool(pool)
    out = tmp_path / "kept.jsonl"
    summary = json.loads(run([str(pool), "--out", str(out), "--budget", "10%", "--json"]).stdout)
    selection = kept(out)
    assert len(selection) == summary["kept"] == 48  # floor(10% of 482)
    categories = {s["tags"]["categories"][0] for s in selection}
    assert categories == {"loan", "deposit", "fx", "tax", "insurance"}
    # Quality first: only the coverage seat of the category without good samples is below the threshold.
    low = [s for s in selection if s["tags"]["quality"] < 4]
    assert len(low) == 1 and low[0]["tags"]["categories"] == ["fx"]
    # Difficulty is balanced inside a category.
    loan = [s for s in selection if s["tags"]["categories"][0] == "loan"]
    levels = [sum(1 for s in loan if (s["tags"]["complexity"] + 1) // 2 == level) for level in (1, 2, 3)]
    assert max(levels) - min(levels) <= 1
    clusters = summary["clusters"]
    assert sum(c["kept"] for c in clusters) == 48 and sum(c["pool"] for c in clusters) == 482
    assert all(c["kept"] + c["dropped"] == c["pool"] for c in clusters)
    assert summary["categories_kept"] == summary["categories_in_pool"] == 5
    ids = [s["id"] for s in selection]
    order = [json.loads(line)["id"] for line in pool.read_text(encoding="utf-8").splitlines()]
    assert ids == [i for i in order if i in set(ids)]  # input order is kept


def test_token_budget_is_respected(tmp_path):
    pool = tmp_path / "pool.jsonl"
    make_pool(pool)
    out = tmp_path / "kept.jsonl"
    summary = json.loads(run([str(pool), "--out", str(out), "--budget", "5000", "--budget-unit", "tokens",
                              "--json"]).stdout)
    assert summary["budget"]["spent"] <= 5000 and summary["budget"]["spent"] > 4000
    assert len({s["tags"]["categories"][0] for s in kept(out)}) == 5


def test_same_seed_same_output(tmp_path):
    pool = tmp_path / "pool.jsonl"
    make_pool(pool)
    for name in ("a", "b"):
        run([str(pool), "--out", str(tmp_path / f"{name}.jsonl"), "--budget", "60", "--seed", "3"])
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


def test_information_gain_skips_redundant_samples(tmp_path):
    """One cluster: 40 copies of one long answer and 20 distinct ones — the greedy takes one copy at most."""
    rng = random.Random(1)
    lines = []
    repeated = "贷款利率按LPR加点确定，等额本息每月还款额相同。" * 8
    for index in range(40):
        lines.append({"id": f"dup{index}", "instruction": "房贷怎么还？", "output": repeated})
    for index in range(20):
        distinct = "".join(rng.choice("贷款利率期限本金月供提前还款违约金征信额度审批抵押") for _ in range(120))
        lines.append({"id": f"new{index}", "instruction": "房贷怎么还？", "output": distinct})
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(dict(line, tags={"categories": ["loan"], "quality": 5, "complexity": 3}),
                                       ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    out = tmp_path / "kept.jsonl"
    run([str(pool), "--out", str(out), "--budget", "15", "--batch-size", "4"])
    ids = [s["id"] for s in kept(out)]
    assert len(ids) == 15 and sum(i.startswith("dup") for i in ids) <= 1


def test_heuristic_tagger_fills_missing_tags(tmp_path):
    pool = tmp_path / "pool.jsonl"
    samples = [{"instruction": "等额本息房贷100万，年利率3.5%，30年，月供多少？请分别列出计算步骤。",
                "output": "1. 月利率=3.5%/12\n2. 月供约4490.45元。\n因此月供约4490.45元。"},
               {"instruction": "美元兑人民币汇率怎么查？", "output": "可在银行官网查询外汇牌价。"},
               {"question": "写一首诗", "answer": ""}]
    pool.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples), encoding="utf-8")
    out = tmp_path / "kept.jsonl"
    summary = json.loads(run([str(pool), "--out", str(out), "--budget", "3", "--json"]).stdout)
    assert summary["tags"] == {"carried": 0, "tagged": 3} and summary["tagger"] == "heuristic"
    tags = {s.get("instruction", s.get("question")): s["tags"] for s in kept(out)}
    loan = tags[samples[0]["instruction"]]
    assert loan["categories"][0] == "loan" and loan["tagger"] == "heuristic"
    assert loan["quality"] >= 5 and loan["complexity"] >= 4
    assert tags[samples[1]["instruction"]]["categories"][0] == "fx"
    assert tags["写一首诗"]["quality"] == 1
    tagger = HeuristicTagger()
    assert tagger.tag(SampleText("作为AI你能做什么", "作为一个AI，我无法回答。")).quality <= 3


def test_malformed_lines_fail_or_are_reported(tmp_path):
    pool = tmp_path / "pool.jsonl"
    make_pool(pool)
    good = pool.read_text(encoding="utf-8").splitlines()
    good.insert(3, "{broken")
    good.insert(7, json.dumps({"instruction": "x", "tags": {"categories": ["loan"], "quality": 9, "complexity": 1}}))
    pool.write_text("\n".join(good) + "\n", encoding="utf-8")
    out = tmp_path / "kept.jsonl"
    failed = CliRunner().invoke(data, ["compress", str(pool), "--out", str(out), "--budget", "10"])
    assert failed.exit_code == 2 and f"{pool}:4:" in failed.output and "--skip-bad" in failed.output
    assert not out.exists()
    summary = json.loads(run([str(pool), "--out", str(out), "--budget", "10", "--skip-bad", "--json"]).stdout)
    assert summary["skipped_lines"]["count"] == 2
    assert [e["line"] for e in summary["skipped_lines"]["lines"]] == [4, 8]
    assert "quality" in summary["skipped_lines"]["lines"][1]["error"]
    refused = CliRunner().invoke(data, ["compress", str(pool), "--out", str(out), "--budget", "10", "--skip-bad"])
    assert refused.exit_code == 2 and "--overwrite" in refused.output


def test_waterfill_and_budget_parsing():
    assert waterfill([1, 100, 100], 51, [1.0, 1.0, 1.0], [0, 1, 2]) == [1, 25, 25]
    assert waterfill([5, 5], 100, [1.0, 1.0], [0, 1]) == [5, 5]
    assert sum(waterfill([10, 20, 30], 7, [10.0, 20.0, 30.0], [2, 1, 0])) == 7
    assert parse_budget("10%", "samples").resolve(482) == 48
    assert parse_budget("500", "tokens").resolve(10**6) == 500
    for bad in ("0", "-3", "ten", "150%"):
        with pytest.raises(UserError):
            parse_budget(bad, "samples")
