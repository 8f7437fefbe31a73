"""``mindyouzhi pipeline`` end to end on a tiny model: every stage runs as the real command, the
tables carry every row with n and intervals, a re-run skips finished stages, a changed section
re-runs only what depends on it, and nothing the user owns is modified."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from hf_fixtures import WORDS, write_text
from mindyouzhi.cli import main
from mindyouzhi.eval.bootstrap import (bootstrap_metric, bootstrap_perplexity, paired_difference, perplexity_gap_closure,
                                       score_gap_closure)
from test_train_fixtures import add_chat_template, write_sft
from hf_fixtures import tiny_convertible


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _fpb_file(path: Path, lines: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    labels = ("negative", "neutral", "positive")
    rows = [" ".join(WORDS[i] for i in rng.integers(0, 60, size=6)) + "@" + labels[i % 3] for i in range(lines)]
    path.write_text("\n".join(rows) + "\n", encoding="latin-1")
    return path


def _recipe(root: Path, model: Path, text: Path, fpb: Path, sft: Path, sft_lr: float = 2e-3) -> Path:
    small_train = {"train_dataset": {"seq_length": 32}, "runner_config": {"batch_size": 2, "gradient_accumulation_steps": 1,
                                                                           "max_steps": 2, "save_steps": 0}}
    recipe = {
        "original": str(model),
        "convert": {"calib": str(text), "calib-tokens": 1024, "calib-seq-len": 64, "search-tokens": 512,
                    "search-seq-len": 64, "rope-dim": 8, "kv-lora-rank": 24, "freqfold": 2},
        "baseline": {"rorope": "key", "lowrank": "bkv", "statistics": "two-stream", "nope-rotation": "none"},
        "data": {"seed": 3, "fpb": {"path": str(fpb), "held_out": 0.4}, "amounts": {"train": 12, "held_out": 4},
                 "banking": {"train": 12, "held_out": 4}, "refusal": {"train": 6}, "instructions": [str(sft)]},
        "annotate": {"max_new_tokens": 6, "batch_size": 4, "limit": 12},
        "gkd": {**small_train, "annotated_loss": "all", "mix": [{"path": str(text), "max_samples": 4}]},
        "sft": {**small_train, "lr_schedule": {"learning_rate": sft_lr}},
        "eval": {"ppl": {"data": str(text), "seq_len": 64, "max_windows": 6},
                 "kl": {"data": str(text), "seq_len": 64, "max_windows": 2}, "bootstrap": 200, "heldout_limit": 3},
        "capacity": {"memory": "1GiB", "context": 128},
    }
    path = root / "youzhi.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline-inputs")
    model = tiny_convertible(root, "llama", 2, max_position_embeddings=256)
    add_chat_template(model)
    return {"root": root, "model": model, "text": write_text(root / "text.txt", 4000, seed=1),
            "fpb": _fpb_file(root / "fpb.txt", 40, seed=2), "sft": write_sft(root / "sft.jsonl", 10)}


def _run(recipe: Path, out: Path, *extra: str):
    result = CliRunner().invoke(main, ["pipeline", "--recipe", str(recipe), "--out", str(out), "--json", *extra])
    assert result.exit_code == 0, result.output + str(result.exception)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_pipeline_end_to_end_resumes_and_reruns_what_changed(inputs, tmp_path, monkeypatch):
    before = _tree_digest(inputs["root"])
    recipe = _recipe(tmp_path, inputs["model"], inputs["text"], inputs["fpb"], inputs["sft"])
    out = tmp_path / "run"
    report = _run(recipe, out)
    assert all(status == "ran" for status in report["stages"].values()), report
    assert {"convert", "convert-transmla", "data", "annotate", "gkd", "sft", "eval-original", "eval-transmla",
            "eval-ours", "eval-gkd", "eval-gkd+sft", "export", "capacity", "tables"} == set(report["stages"])

    tables = json.loads((out / "tables.json").read_text())
    assert tables["rows"] == ["original", "transmla", "ours", "gkd", "gkd+sft"]
    names = {task["name"] for task in tables["tasks"]}
    assert {"FPB held-out (gen)", "FPB held-out (ll)", "RMB amounts held-out", "Banking intent/slots held-out"} <= names
    for task in tables["tasks"]:
        assert task["n"] == 3 if task["group"] == "finance-heldout" else task["n"] > 0  # eval.heldout_limit
        for score in task["scores"].values():
            assert score["low"] <= score["value"] <= score["high"]
    assert tables["quality"]["original"]["ppl"]["n"] == 6
    assert tables["capacity"]["ours"]["kv_bytes_per_token"] < tables["capacity"]["original"]["kv_bytes_per_token"]
    assert "gkd_ppl_gap_closed" in tables["acceptance"]
    markdown = (out / "tables.md").read_text()
    assert "| gkd+sft |" in markdown and "Table 4" in markdown
    # A run in progress is tabled from the rows whose evaluation finished.
    from mindyouzhi.workflow.recipe import load_pipeline_recipe
    from mindyouzhi.workflow.run import PipelineRun
    from mindyouzhi.workflow.tables import build_tables, finished_rows

    run = PipelineRun(load_pipeline_recipe(recipe), out)
    assert finished_rows(run) == tables["rows"]
    partial = build_tables(run, rows=["original", "gkd+sft"])
    assert partial["rows"] == ["original", "gkd+sft"] and "| ours |" not in partial["markdown"]
    assert [t["scores"]["gkd+sft"] for t in partial["tasks"]] == [t["scores"]["gkd+sft"] for t in tables["tasks"]]
    # The teacher wrote the GKD data: every record ends with its answer to the SFT prompt.
    annotated = [json.loads(line) for line in (out / "data" / "gkd.jsonl").read_text().splitlines()]
    assert len(annotated) == 12 and all(r["messages"][-1]["role"] == "assistant" for r in annotated)
    # GKD read them with the loss on every token, and the recipe's mixed-in text after them.
    gkd_sources = yaml.safe_load((out / "train" / "gkd.yaml").read_text())["train_dataset"]["sources"]
    assert [(s["path"], s.get("loss")) for s in gkd_sources] == [(str(out / "data" / "gkd.jsonl"), "all"),
                                                                (str(inputs["text"]), None)]
    summary = json.loads((out / "train" / "gkd" / "train_summary.json").read_text())
    assert [source["format"] for source in summary["data"]] == ["sft", "text"], summary["data"]
    # The held-out items never occur in the SFT data.
    sft_text = (out / "data" / "sft.jsonl").read_text()
    for name in ("amounts", "banking"):
        for line in (out / "data" / "heldout" / f"{name}.jsonl").read_text().splitlines():
            assert json.dumps(json.loads(line)["prompt"], ensure_ascii=False) not in sft_text
    assert (out / "export" / "deepseek-v3" / "config.json").is_file()

    again = _run(recipe, out)
    assert set(again["stages"].values()) == {"skipped"}
    # A held-out task scored differently (code, not the recipe) makes the eval stages stale, nothing else.
    from mindyouzhi.workflow import run as pipeline
    from mindyouzhi.workflow.recipe import load_pipeline_recipe

    state_run = pipeline.PipelineRun(load_pipeline_recipe(recipe), out)
    fingerprints = {stage.name: state_run.fingerprint(stage) for stage in pipeline.stages()}
    assert all(state_run.done(stage) for stage in pipeline.stages() if stage.when(state_run))
    monkeypatch.setattr(pipeline, "heldout_tasks",
                        lambda run: [{"task": "another-scorer", "data": str(out / "data" / "heldout" / "amounts.jsonl")}])
    stale = {stage.name for stage in pipeline.stages() if state_run.fingerprint(stage) != fingerprints[stage.name]}
    assert stale == {f"eval-{row}" for row in pipeline.ROWS}, stale
    monkeypatch.undo()
    # A stage killed while running (state "started", same inputs) runs again and keeps its outputs.
    state = json.loads((out / "pipeline.json").read_text())
    state["stages"]["eval-gkd"]["status"] = "started"
    (out / "pipeline.json").write_text(json.dumps(state))
    resumed = _run(recipe, out)
    assert {name for name, status in resumed["stages"].items() if status == "ran"} == {"eval-gkd"}

    changed = _recipe(tmp_path, inputs["model"], inputs["text"], inputs["fpb"], inputs["sft"], sft_lr=1e-3)
    rerun = _run(changed, out)
    ran = {name for name, status in rerun["stages"].items() if status == "ran"}
    assert ran == {"sft", "eval-gkd+sft", "export", "tables"}, rerun
    assert _tree_digest(inputs["root"]) == before


def test_pipeline_overwrite_discards_an_earlier_run_only(inputs, tmp_path):
    recipe = _recipe(tmp_path, inputs["model"], inputs["text"], inputs["fpb"], inputs["sft"])
    out = tmp_path / "run"
    out.mkdir()
    (out / "pipeline.json").write_text(json.dumps({"stages": {"convert": {"fingerprint": "x", "status": "done"}}}))
    (out / "stale.txt").write_text("from the earlier run")
    report = _run(recipe, out, "--until", "convert", "--overwrite")
    assert report["stages"] == {"convert": "ran"} and not (out / "stale.txt").exists()
    assert (out / "models" / "convert" / "config.json").is_file()


def test_pipeline_refuses_a_foreign_out_dir_and_bad_recipes(inputs, tmp_path):
    recipe = _recipe(tmp_path, inputs["model"], inputs["text"], inputs["fpb"], inputs["sft"])
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(main, ["pipeline", "--recipe", str(recipe), "--out", str(foreign)])
    assert result.exit_code == 2 and "not a pipeline run directory" in result.output
    assert (foreign / "notes.txt").read_text() == "keep me"
    inside = CliRunner().invoke(main, ["pipeline", "--recipe", str(recipe), "--out", str(inputs["model"] / "run")])
    assert inside.exit_code == 2 and "--out" in inside.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"original": str(inputs["model"]), "convert": {}, "datta": {}}))
    result = CliRunner().invoke(main, ["pipeline", "--recipe", str(bad), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "unknown section 'datta'" in result.output
    assert not (tmp_path / "r").exists()
    limit = yaml.safe_load(recipe.read_text())
    limit["eval"]["heldout_limit"] = "80"
    bad.write_text(yaml.safe_dump(limit))
    result = CliRunner().invoke(main, ["pipeline", "--recipe", str(bad), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "eval.heldout_limit '80': expected a whole number" in result.output
    assert result.output.count("\n") == 1 and not (tmp_path / "r").exists()
    # A typo in a training section is reported before the first stage, with nothing written.
    typo = yaml.safe_load(recipe.read_text())
    typo["gkd"]["runner_config"]["batch_sise"] = 2
    bad.write_text(yaml.safe_dump(typo))
    result = CliRunner().invoke(main, ["pipeline", "--recipe", str(bad), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "section gkd" in result.output and "batch_sise" in result.output, result.output
    assert not (tmp_path / "r").exists()
    for key, value, message in (("mix", {"path": "x"}, "gkd.mix must be a list"),
                                ("annotated_loss", "prompts", "loss")):
        typo = yaml.safe_load(recipe.read_text())
        typo["gkd"][key] = value
        bad.write_text(yaml.safe_dump(typo))
        result = CliRunner().invoke(main, ["pipeline", "--recipe", str(bad), "--out", str(tmp_path / "r")])
        assert result.exit_code == 2 and message in result.output, result.output
        assert result.output.count("\n") == 1 and not (tmp_path / "r").exists()


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parents[1] / "recipes").glob("youzhi_*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_pipeline_recipes_validate(recipe, monkeypatch, tmp_path):
    from mindyouzhi.workflow.recipe import load_pipeline_recipe
    from mindyouzhi.workflow.run import training_recipe

    monkeypatch.setenv("MINDYOUZHI_SHARED", "/shared")
    monkeypatch.setenv("MINDYOUZHI_MODELS", "/models")
    parsed = load_pipeline_recipe(recipe, check_paths=False)
    assert parsed["original"] == "/models/smollm2"
    assert all("wiki.test.raw" not in str(parsed[section]) for section in ("convert", "data", "gkd", "sft"))

    # The training recipes the pipeline writes from its gkd:/sft: sections validate as training recipes.
    from mindyouzhi.train.config import load_recipe
    from mindyouzhi.workflow.run import PipelineRun

    run = PipelineRun(parsed, tmp_path / "run", log=lambda line: None)
    for mode in ("gkd", "sft"):
        path = tmp_path / f"{mode}.yaml"
        path.write_text(yaml.safe_dump(training_recipe(run, mode)))
        assert load_recipe(path, check_paths=False).run_mode == mode


def test_bootstrap_intervals_cover_and_pair():
    rng = np.random.default_rng(0)
    rows = [{"id": i, "correct": bool(rng.random() < 0.7)} for i in range(400)]
    accuracy = lambda rs: float(np.mean([r["correct"] for r in rs]))  # noqa: E731
    interval = bootstrap_metric(rows, accuracy, replicates=500)
    # Normal approximation of a proportion's 95 % interval: ±1.96·sqrt(p(1−p)/n).
    half = 1.96 * np.sqrt(interval.value * (1 - interval.value) / 400)
    assert abs((interval.high - interval.low) / 2 - half) < 0.01
    # Paired difference of a model with itself plus 20 flipped-to-correct items: exactly +5 %, a
    # narrow interval above 0 (the shared item variance cancels).
    better = [dict(r) for r in rows]
    flipped = [r for r in better if not r["correct"]][:20]
    for r in flipped:
        r["correct"] = True
    diff = paired_difference(rows, better, accuracy, replicates=500)
    assert diff.value == pytest.approx(0.05) and diff.low > 0
    with pytest.raises(ValueError):
        paired_difference(rows, better[:-1], accuracy)
    ppl = bootstrap_perplexity([100.0, 120.0, 80.0, 110.0], 50, replicates=300)
    assert ppl.value == pytest.approx(np.exp(410 / 200)) and ppl.low < ppl.value < ppl.high


def test_data_stage_counts_what_the_budget_keeps_of_each_section(inputs, tmp_path):
    """`data compress` decides the mix of a budgeted SFT set (the real run kept all 1,500 banking
    records but 496 of 1,500 amounts): the data stage must say what it kept of each section."""
    from mindyouzhi.workflow.recipe import load_pipeline_recipe
    from mindyouzhi.workflow.run import PipelineRun, stage_data

    recipe = yaml.safe_load(_recipe(tmp_path, inputs["model"], inputs["text"], inputs["fpb"], inputs["sft"]).read_text())
    results = {}
    for budget in (None, 20):
        recipe["data"]["budget"] = budget
        path = tmp_path / f"budget-{budget}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        run = PipelineRun(load_pipeline_recipe(path), tmp_path / f"run-{budget}", log=lambda line: None)
        results[budget] = stage_data(run)
    whole = results[None]
    assert whole["sft_records_by_section"] == {"fpb": whole["fpb"]["train"], "amounts": whole["amounts"]["train"],
                                               "banking": whole["banking"]["train"], "refusal": whole["refusal"]["train"],
                                               "instructions": sum(whole["instructions"].values())}
    kept = results[20]["sft_records_by_section"]
    assert sum(kept.values()) == results[20]["sft_records"] == 20 and "unknown" not in kept
    assert all(kept[section] <= count for section, count in whole["sft_records_by_section"].items() if section in kept)


def test_gap_closure_intervals_pair_the_models_and_resample_tasks_independently():
    rng = np.random.default_rng(1)
    accuracy = lambda rs: float(np.mean([r["correct"] for r in rs]))  # noqa: E731

    def model(p, n=300):
        return [{"id": i, "correct": bool(rng.random() < p)} for i in range(n)]

    original, ours = model(0.8), model(0.4)
    # + GKD answering exactly as the original recovers all of the drop in every resample, exactly as
    # the converted model recovers none: a paired bootstrap has no width there.
    same = score_gap_closure([(original, ours, [dict(r) for r in original], accuracy)], replicates=200)
    assert (same.value, same.low, same.high) == (1.0, 1.0, 1.0)
    none = score_gap_closure([(original, ours, list(reversed(ours)), accuracy)], replicates=200)
    assert (none.value, none.low, none.high) == (0.0, 0.0, 0.0)
    half = model(0.6)
    one = score_gap_closure([(original, ours, half, accuracy)], replicates=400)
    expected = (accuracy(half) - accuracy(ours)) / (accuracy(original) - accuracy(ours))
    assert one.value == pytest.approx(expected) and one.low < one.value < one.high and one.n == 300
    # A second benchmark with the same items halves the variance only if it is drawn independently.
    two = score_gap_closure([(original, ours, half, accuracy)] * 2, replicates=400)
    assert two.value == pytest.approx(expected) and two.n == 600
    assert (two.high - two.low) < 0.85 * (one.high - one.low)
    with pytest.raises(ValueError):
        score_gap_closure([(original, ours, half[:-1], accuracy)])

    nll = [rng.normal(3.0, 0.1, 12) * 100 for _ in range(3)]
    nll[0] -= 80   # the original: lowest perplexity; + GKD in between
    nll[2] -= 40
    closure = perplexity_gap_closure(*nll, 100, replicates=300)
    ppl = [np.exp(x.sum() / 1200) for x in nll]
    assert closure.value == pytest.approx((ppl[1] - ppl[2]) / (ppl[1] - ppl[0]))
    assert closure.low < closure.value < closure.high and closure.n == 12
    with pytest.raises(ValueError):
        perplexity_gap_closure(nll[0], nll[1][:-1], nll[2], 100)


def test_fpb_held_out_items_come_in_hash_order_so_a_prefix_is_a_fair_sample(tmp_path):
    """FPB files are grouped by label: the held-out split must not inherit that order, or the first
    ``eval.heldout_limit`` items would be one label."""
    from mindyouzhi.workflow.finance_data import split_fpb

    path = tmp_path / "grouped.txt"
    rows = [f"{label} sentence number {i} about the company" + "@" + label
            for label in ("positive", "neutral", "negative") for i in range(60)]
    path.write_text("\n".join(rows) + "\n", encoding="latin-1")
    train, test = split_fpb(path, 0.3, seed=42)
    assert len(train) + len(test) == 180 and {s.sentence for s in train}.isdisjoint(s.sentence for s in test)
    assert len({s.label for s in test[:12]}) == 3
    assert [s.sentence for s in split_fpb(path, 0.3, seed=42)[1]] == [s.sentence for s in test]  # deterministic
