"""Conventions shared by every data command: --json purity, one-line user errors, atomic outputs."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mindyouzhi.datagen.cli import data
from mindyouzhi.datagen.jsonl import JsonlWriter


@pytest.mark.parametrize("args", [
    ["refusal", "--count", "5"],
    ["banking", "generate", "--count", "5"],
    ["amounts", "generate", "--count", "5"],
])
def test_json_flag_prints_only_the_summary(tmp_path, args):
    runner = CliRunner()
    result = runner.invoke(data, [*args, "--out", str(tmp_path / "o.jsonl"), "--json", "--progress"])
    assert result.exit_code == 0, result.output
    assert isinstance(json.loads(result.stdout), dict)  # the progress bar went to stderr
    assert result.stdout.count("\n") == 1


def test_existing_output_needs_overwrite_and_report_is_written(tmp_path):
    out, report = tmp_path / "o.jsonl", tmp_path / "report.json"
    runner = CliRunner()
    first = runner.invoke(data, ["refusal", "--count", "3", "--out", str(out), "--report", str(report)])
    assert first.exit_code == 0 and json.loads(report.read_text(encoding="utf-8"))["items"] == 3
    before = out.read_bytes()
    refused = runner.invoke(data, ["refusal", "--count", "4", "--out", str(out)])
    assert refused.exit_code == 2
    assert refused.stderr.strip().splitlines() == [f"error: --out {out} already exists; pass --overwrite to replace it"]
    assert out.read_bytes() == before
    assert runner.invoke(data, ["refusal", "--count", "4", "--out", str(out), "--overwrite"]).exit_code == 0
    assert len(out.read_text(encoding="utf-8").splitlines()) == 4


def test_missing_input_is_a_user_error(tmp_path):
    result = CliRunner().invoke(data, ["compress", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o.jsonl"),
                                       "--budget", "10"])
    assert result.exit_code == 2 and "nope.jsonl" in result.stderr and "Traceback" not in result.output


def test_failed_run_leaves_no_partial_output(tmp_path):
    out = tmp_path / "o.jsonl"
    with pytest.raises(RuntimeError):
        with JsonlWriter(out, overwrite=False) as writer:
            writer.write({"a": 1})
            raise RuntimeError("killed")
    assert not out.exists() and not list(tmp_path.iterdir())
