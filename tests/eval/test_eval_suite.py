"""The suite: YAML config, several tasks on several models, the comparison table."""
import pytest

from eval_fakes import BigramLM, PieceTokenizer, bigram_table
from mindyouzhi.errors import UserError
from mindyouzhi.eval.suite import load_suite_config, model_labels, render_markdown, run_suite, suite_summary

PIECES = ["答案：", "A", "B", "C", "D", "x", "y"]
HEADER = "id,question,A,B,C,D,answer\n"


def letter_model(preferred):
    tokenizer = PieceTokenizer(PIECES)
    others = {letter: 0.1 for letter in "ABCD" if letter != preferred}
    return BigramLM(tokenizer, bigram_table(tokenizer, {"答案：": {preferred: 0.7, **others}, "x": {"y": 0.5}}))


def write_fixture(root):
    (root / "exam" / "val").mkdir(parents=True)
    (root / "exam" / "val" / "law_val.csv").write_text(HEADER + "0,q1,a,b,c,d,B\n1,q2,a,b,c,d,A\n2,q3,a,b,c,d,B\n")
    (root / "wiki.txt").write_text("xyxyxyxy")
    config = root / "suite.yaml"
    config.write_text(
        "defaults:\n  batch_size: 2\n  seq_len: 4\n"
        "tasks:\n"
        "  - task: ceval\n    data: exam/val\n    shots: 0\n    name: Exam\n"
        "  - task: ceval\n    data: exam/val/law_val.csv\n    shots: 0\n    limit: 1\n"
        "  - task: kl\n    data: ${WIKI_DIR}/wiki.txt\n"
    )
    return config


def test_config_resolves_paths_defaults_and_names(tmp_path, monkeypatch):
    monkeypatch.setenv("WIKI_DIR", str(tmp_path))
    entries = load_suite_config(write_fixture(tmp_path))
    assert [entry.name for entry in entries] == ["Exam", "ceval", "kl (seq 4)"]
    assert entries[0].data == tmp_path / "exam" / "val"
    assert entries[0].settings == {"batch_size": 2, "shots": 0}  # seq_len is not a benchmark key
    assert entries[2].settings == {"batch_size": 2, "seq_len": 4}


@pytest.mark.parametrize("body, message", [
    ("tasks: []\n", "non-empty 'tasks' list"),
    ("tasks:\n  - task: nope\n    data: x\n", r"tasks\[0\]: task 'nope' is not one of"),
    ("tasks:\n  - task: fpb\n", r"tasks\[0\]: missing 'data'"),
    ("tasks:\n  - task: fpb\n    data: .\n    seq_len: 3\n", "unknown key"),
    ("tasks:\n  - task: fpb\n    data: .\n    limit: ten\n", "'limit' must be an integer"),
    ("tasks:\n  - task: fpb\n    data: missing.txt\n", "data .*missing.txt not found"),
    ("tasks: [\n", "invalid YAML"),
    ("models: []\ntasks:\n  - task: fpb\n    data: .\n", "unknown top-level key"),
])
def test_config_errors_name_the_file_and_entry(tmp_path, body, message):
    config = tmp_path / "suite.yaml"
    config.write_text(body)
    with pytest.raises(UserError, match=message):
        load_suite_config(config)


def test_side_by_side_comparison(tmp_path, monkeypatch):
    monkeypatch.setenv("WIKI_DIR", str(tmp_path))
    entries = load_suite_config(write_fixture(tmp_path))
    models = {"orig": letter_model("B"), "conv": letter_model("A")}
    loaded = []

    def loader(model_dir):
        loaded.append(model_dir)
        return models[model_dir]

    result = run_suite(["orig", "conv"], entries, ["original", "converted"], loader=loader, progress=False)
    assert loaded == ["orig", "conv"]
    exam, limited, kl = result["tasks"]
    assert exam["results"]["original"]["metrics"]["accuracy"] == pytest.approx(2 / 3, abs=1e-6)
    assert exam["results"]["converted"]["metrics"]["accuracy"] == pytest.approx(1 / 3, abs=1e-6)
    assert exam["agreement_with_reference"] == {"converted": 0.0}
    assert limited["results"]["original"]["n"] == 1
    assert set(kl["results"]) == {"converted"} and kl["results"]["converted"]["kl_mean"] == pytest.approx(0.0, abs=1e-9)
    table = render_markdown(result)
    assert "| task | metric | n | original | converted | Δ converted |" in table
    assert "| Exam | accuracy (%) | 3 | 66.67 | 33.33 | -33.33 |" in table
    assert "| kl (seq 4) | top-1 agreement | 8 tok | — | 1.0000 |  |" in table
    assert "| Exam | 0.00 |" in table
    assert "items" not in suite_summary(result)["tasks"][0]["results"]["original"]


def test_kl_needs_two_models_and_labels_must_match(tmp_path, monkeypatch):
    monkeypatch.setenv("WIKI_DIR", str(tmp_path))
    entries = load_suite_config(write_fixture(tmp_path))
    with pytest.raises(UserError, match="at least two --model"):
        run_suite(["orig"], entries, loader=lambda _: letter_model("B"), progress=False)
    with pytest.raises(UserError, match="--label given 1 time"):
        model_labels(["a", "b"], ["only"])
    assert model_labels(["/m/model", "/n/model"]) == ["model", "model#2"]


def test_json_generation_rows_show_field_accuracy(tmp_path):
    import json

    from eval_fakes import ScriptedLM

    data = tmp_path / "intents.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "answer": {"intent": "pay", "amount": "5"}}) for p in ("a", "b")))
    config = tmp_path / "suite.yaml"
    config.write_text("tasks:\n  - task: gen-jsonl\n    data: intents.jsonl\n    name: Intents\n")
    responses = {
        "good": lambda prompt: '{"intent": "pay", "amount": "5"}',
        "half": lambda prompt: '{"intent": "pay", "amount": "6"}',
    }
    result = run_suite(["good", "half"], load_suite_config(config),
                       loader=lambda name: ScriptedLM(PieceTokenizer(PIECES), responses[name]), progress=False)
    table = render_markdown(result)
    assert "| Intents | exact_match (%) | 2 | 100.00 | 0.00 | -100.00 |" in table
    assert "| Intents | field_accuracy (%) | 2 | 100.00 | 50.00 | -50.00 |" in table


def test_finance_preset_runs_what_has_data_and_prints_the_paper_layout(tmp_path):
    from mindyouzhi.eval.suite import preset_entries, render_paper_table

    root = tmp_path / "eval"
    (root / "fineval" / "val").mkdir(parents=True)
    (root / "fineval" / "dev").mkdir()
    (root / "fineval" / "val" / "banking_val.csv").write_text(HEADER + "0,q1,a,b,c,d,B\n1,q2,a,b,c,d,A\n")
    (root / "fineval" / "dev" / "banking_dev.csv").write_text(HEADER + "0,s,a,b,c,d,B\n")
    entries, not_run = preset_entries("finance", root, limit=1)
    assert [entry.name for entry in entries] == ["FinEval"]
    assert entries[0].data == root / "fineval" and entries[0].settings == {"limit": 1, "shots": 5}
    assert not_run[0] == "OpenFinData (no task in mindyouzhi)"
    assert any(text.startswith("CFLUE (no ") for text in not_run) and any(text.startswith("FPB (no ") for text in not_run)
    entries[0].settings["shots"] = 1  # the fixture's dev split has one example per subject
    models = {"orig": letter_model("B"), "conv": letter_model("A")}
    result = run_suite(["orig", "conv"], entries, ["original", "converted"], loader=models.__getitem__, progress=False)
    table = render_paper_table(result, "Finance benchmarks", not_run)
    lines = [line for line in table.splitlines() if line]
    assert lines[0] == "**Finance benchmarks**"
    assert lines[1] == "| Model | FinEval | Avg |"
    assert lines[3] == "| original | 100.00 | 100.00 |" and lines[4] == "| converted | 0.00 | 0.00 |"
    assert "FinEval: accuracy, n=1" in table and "Not run: OpenFinData" in table


def test_preset_errors(tmp_path):
    from mindyouzhi.eval.suite import preset_entries

    with pytest.raises(UserError, match="none of its benchmarks has data"):
        preset_entries("general", tmp_path)
    with pytest.raises(UserError, match="--data-root"):
        preset_entries("general", tmp_path / "missing")
