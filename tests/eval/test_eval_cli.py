"""The click commands: --json prints one object, --out writes results, errors name file and row."""
import json

import pytest
from click.testing import CliRunner

from eval_fakes import BigramLM, PieceTokenizer, bigram_table
from mindyouzhi.errors import UserError
from mindyouzhi.eval import lm as lm_module
from mindyouzhi.eval.cli import bench_cmd, kl_cmd, suite_cmd

PIECES = ["答案：", "A", "B", "C", "D", "x", "y"]
HEADER = "id,question,A,B,C,D,answer\n"


def fake_model(preferred="B"):
    tokenizer = PieceTokenizer(PIECES)
    others = {letter: 0.1 for letter in "ABCD" if letter != preferred}
    return BigramLM(tokenizer, bigram_table(tokenizer, {"答案：": {preferred: 0.7, **others}, "x": {"y": 0.5}}))


@pytest.fixture
def models(tmp_path, monkeypatch):
    """Two model dirs; loading one returns a fake preferring the letter named by the dir."""
    dirs = {}
    for letter in "AB":
        dirs[letter] = tmp_path / f"model_{letter}"
        dirs[letter].mkdir()
    loaded = []

    def load(model_dir, **_):
        loaded.append(model_dir)
        return fake_model(str(model_dir)[-1])

    monkeypatch.setattr(lm_module, "load_language_model", load)
    return dirs, loaded


@pytest.fixture
def exam(tmp_path):
    val = tmp_path / "ceval" / "val"
    val.mkdir(parents=True)
    (val / "law_val.csv").write_text(HEADER + "0,q1,a,b,c,d,B\n1,q2,a,b,c,d,A\n")
    return val


def test_bench_json_prints_exactly_one_object_and_out_has_items(tmp_path, models, exam):
    dirs, _ = models
    out = tmp_path / "results" / "bench.json"
    result = CliRunner().invoke(bench_cmd, ["--model", str(dirs["B"]), "--task", "ceval", "--data", str(exam),
                                            "--shots", "0", "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)  # the whole of stdout is one JSON object
    assert printed["metrics"]["accuracy"] == 0.5 and printed["model"] == str(dirs["B"])
    assert "items" not in printed
    written = json.loads(out.read_text())
    assert [row["pred"] for row in written["items"]] == ["B", "B"]


def test_bench_human_summary(models, exam):
    dirs, _ = models
    result = CliRunner().invoke(bench_cmd, ["--model", str(dirs["A"]), "--task", "ceval", "--data", str(exam), "--shots", "0"])
    assert result.exit_code == 0, result.output
    assert "ceval on" in result.stdout and "accuracy 0.5000 over 2 items" in result.stdout


def test_bench_malformed_data_fails_before_loading_the_model(tmp_path, models):
    dirs, loaded = models
    bad = tmp_path / "law_val.csv"
    bad.write_text(HEADER + "0,q1,a,b,c,d,B\n1,q2,a,b,c,d,F\n")
    result = CliRunner().invoke(bench_cmd, ["--model", str(dirs["A"]), "--task", "ceval", "--data", str(bad), "--shots", "0"])
    assert isinstance(result.exception, UserError)
    assert str(bad) in str(result.exception) and "line 3 (id 1): answer 'F'" in str(result.exception)
    assert loaded == []


def test_bench_unknown_task_is_a_usage_error(models, exam):
    dirs, _ = models
    result = CliRunner().invoke(bench_cmd, ["--model", str(dirs["A"]), "--task", "mmlu", "--data", str(exam)])
    assert result.exit_code == 2 and "mmlu" in result.output


def test_kl_command_json(tmp_path, models):
    dirs, _ = models
    data = tmp_path / "text.txt"
    data.write_text("答案：xy答案：xy答案：x")  # the two fakes differ only after "答案："
    result = CliRunner().invoke(kl_cmd, ["--teacher", str(dirs["A"]), "--student", str(dirs["B"]), "--data", str(data),
                                         "--seq-len", "4", "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["tokens"] == 8 and printed["kl_mean"] > 0 and printed["top1_agreement"] == 0.625
    assert printed["teacher"] == str(dirs["A"])


def test_suite_command_writes_markdown_and_json(tmp_path, models, exam):
    dirs, loaded = models
    config = tmp_path / "suite.yaml"
    config.write_text(f"tasks:\n  - task: ceval\n    data: {exam}\n    shots: 0\n")
    out = tmp_path / "suite_out"
    result = CliRunner().invoke(suite_cmd, ["--model", str(dirs["B"]), "--model", str(dirs["A"]),
                                            "--label", "orig", "--label", "conv", "--config", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| ceval | accuracy (%) | 2 | 50.00 | 50.00 | +0.00 |" in result.stdout
    assert (out / "results.md").read_text() == result.stdout
    written = json.loads((out / "results.json").read_text())
    assert written["reference"] == "orig" and len(written["tasks"][0]["results"]["conv"]["items"]) == 2
    assert loaded == [dirs["B"], dirs["A"]]

    result = CliRunner().invoke(suite_cmd, ["--model", str(dirs["B"]), "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["models"][0]["label"] == "model_B"


def test_suite_command_loads_models_in_the_requested_precision(tmp_path, models, exam, monkeypatch):
    """The suite's forwards and generation run at --forward-precision (default auto, as eval ppl),
    and results.json says which precision ran."""
    dirs, _ = models
    precisions = []
    load = lm_module.load_language_model
    monkeypatch.setattr(lm_module, "load_language_model",
                        lambda model_dir, precision="fp32": precisions.append(precision) or load(model_dir))
    config = tmp_path / "suite.yaml"
    config.write_text(f"tasks:\n  - task: ceval\n    data: {exam}\n    shots: 0\n")
    out = tmp_path / "suite_out"
    result = CliRunner().invoke(suite_cmd, ["--model", str(dirs["B"]), "--config", str(config), "--out", str(out),
                                            "--forward-precision", "fp32"])
    assert result.exit_code == 0, result.output
    assert precisions == ["fp32"]
    assert json.loads((out / "results.json").read_text())["forward_precision"]["used"] == "fp32"
    auto = lm_module.resolve_precision("auto")["used"]
    result = CliRunner().invoke(suite_cmd, ["--model", str(dirs["B"]), "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    assert precisions == ["fp32", auto]
