"""`mindyouzhi data …` as an adversarial user tries it (issue 24): an output (--out, --report) never
replaces an input or an existing file without --overwrite, an unwritable --report is refused before
--out is published, deeply nested JSON is a per-line error (honoured by --skip-bad), and empty
inputs are refused instead of producing empty results."""
import json
import os

import pytest

from adversarial_support import assert_refused, leftovers, run, snapshot

DEEP = "[" * 100_000 + "]" * 100_000  # a valid-looking line that blows Python's recursion limit


def sample(index: int) -> dict:
    return {"instruction": f"房贷月供怎么算？问题{index}", "output": f"按等额本息计算，月供约{1000 + index}元。",
            "tags": {"categories": ["loan"], "quality": 5, "complexity": 2}}


@pytest.fixture
def pool(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(sample(i), ensure_ascii=False) + "\n" for i in range(20)), encoding="utf-8")
    return path


def compress(pool, *args):
    return run("data", "compress", pool, "--budget", "5", "--no-progress", *args)


def test_report_equal_to_the_input_is_refused(pool, tmp_path):
    before = snapshot(pool)
    out = tmp_path / "o.jsonl"
    assert_refused(*compress(pool, "--out", out, "--report", pool), "--report", "INPUT")
    assert snapshot(pool) == before and not out.exists()
    assert_refused(*compress(pool, "--out", out, "--report", pool, "--overwrite"), "--report", "INPUT")
    assert snapshot(pool) == before and not out.exists()


def test_out_equal_to_the_input_or_the_report_is_refused(pool, tmp_path):
    before = snapshot(pool)
    assert_refused(*compress(pool, "--out", pool, "--overwrite"), "--out", "INPUT")
    out = tmp_path / "o.jsonl"
    assert_refused(*compress(pool, "--out", out, "--report", out), "--report", "--out")
    assert snapshot(pool) == before and leftovers(tmp_path, "o.jsonl") == []


def test_existing_report_needs_overwrite(pool, tmp_path):
    report = tmp_path / "r.json"
    report.write_text("precious")
    out = tmp_path / "o.jsonl"
    assert_refused(*compress(pool, "--out", out, "--report", report), "--report", "already exists", "--overwrite")
    assert report.read_text() == "precious" and not out.exists()
    code, output = compress(pool, "--out", out, "--report", report, "--overwrite")
    assert code == 0, output
    assert json.loads(report.read_text())["kept"] == 5


def test_existing_report_of_a_command_without_out_needs_overwrite(tmp_path):
    gold = tmp_path / "gold.jsonl"
    gold.write_text(json.dumps({"id": "a", "labels": {"intent": {"l1": "loan", "l2": "loan_rate"}, "slots": {}}}) + "\n")
    report = tmp_path / "r.json"
    report.write_text("precious")
    assert_refused(*run("data", "banking", "eval", gold, gold, "--report", report), "--report", "already exists")
    assert report.read_text() == "precious"


def test_unwritable_report_is_refused_before_out_is_published(pool, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    reports = [blocker / "r.json"] + ([tmp_path.parent / "nope" / "r.json"] if False else [])
    if os.path.isdir("/proc/self"):
        reports.append("/proc/nope/r.json")
    out = tmp_path / "o.jsonl"
    for report in reports:
        assert_refused(*compress(pool, "--out", out, "--report", report), "--report")
        assert not out.exists() and leftovers(tmp_path, "o.jsonl") == []


@pytest.mark.parametrize("command", [["data", "compress", "--budget", "5"], ["data", "ifeval", "generate"]])
def test_deeply_nested_json_is_a_line_error_and_skip_bad_skips_it(pool, tmp_path, command):
    with open(pool, "a", encoding="utf-8") as handle:
        handle.write(DEEP + "\n")
    before = snapshot(pool)
    out = tmp_path / "o.jsonl"
    args = [*command[:-2], pool, *command[-2:]] if command[1] == "compress" else [*command, pool]
    assert_refused(*run(*args, "--out", out, "--no-progress"), f"{pool}:21", "nested too deeply", "--skip-bad")
    assert not out.exists()
    code, output = run(*args, "--out", out, "--skip-bad", "--no-progress", "--json")
    assert code == 0, output
    summary = json.loads(output.strip().splitlines()[-1])
    assert summary["skipped_lines"]["count"] == 1 and summary["skipped_lines"]["lines"][0]["line"] == 21
    assert snapshot(pool) == before


def test_ifeval_generate_on_an_empty_input_writes_nothing(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    out = tmp_path / "o.jsonl"
    assert_refused(*run("data", "ifeval", "generate", empty, "--out", out, "--no-progress"), "INPUT", "no usable sample")
    assert not out.exists() and leftovers(tmp_path, "o.jsonl") == []
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert_refused(*run("data", "ifeval", "generate", bad, "--out", out, "--skip-bad", "--no-progress"),
                   "no usable sample", "1 malformed")


def test_banking_eval_on_an_empty_gold_file_is_refused(tmp_path):
    gold = tmp_path / "gold.jsonl"
    gold.write_text("")
    pred = tmp_path / "pred.jsonl"
    pred.write_text("")
    report = tmp_path / "r.json"
    assert_refused(*run("data", "banking", "eval", gold, pred, "--report", report), "GOLD", "no gold dialogue")
    assert not report.exists()


def test_stale_temporary_of_a_killed_writer_is_removed(pool, tmp_path):
    stale = tmp_path / "o.jsonl.tmp-k1lled00"
    stale.write_text('{"half": ')
    code, output = compress(pool, "--out", tmp_path / "o.jsonl")
    assert code == 0, output
    assert leftovers(tmp_path, "o.jsonl") == ["o.jsonl"]
