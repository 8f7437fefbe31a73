"""Recipe validation: bad keys, types, env variables and missing files fail clearly before any work."""
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mindyouzhi.errors import UserError
from mindyouzhi.train.cli import train_cmd
from mindyouzhi.train.config import load_recipe
from test_train_fixtures import write_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def paths(tmp_path):
    for name in ("student", "teacher"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    (tmp_path / "text.txt").write_text("w1 w2 w3\n")
    return tmp_path


def _recipe(paths, **sections):
    base = dict(model={"student": str(paths / "student"), "teacher": str(paths / "teacher")},
                train_dataset={"sources": [str(paths / "text.txt")]})
    base.update(sections)
    return write_recipe(paths / "recipe.yaml", **base)


def test_valid_recipe_fills_defaults(paths):
    recipe = load_recipe(_recipe(paths))
    assert recipe.run_mode == "gkd" and recipe.gkd["lmbda"] == 0.0 and recipe.gkd["beta"] == 0.0
    assert recipe.sources[0].format == "text"
    assert recipe.lr_schedule["warmup_ratio"] == 0.1 and recipe.runner_config["keep_checkpoints"] == 2


def test_sft_defaults_follow_the_paper(paths):
    path = paths / "sft.yaml"
    path.write_text(yaml.safe_dump({"run_mode": "sft", "output_dir": str(paths / "out"),
                                    "model": {"student": str(paths / "student")},
                                    "train_dataset": {"sources": [str(paths / "text.txt")]},
                                    "lr_schedule": {"learning_rate": 1e-5}}))
    recipe = load_recipe(path)
    assert recipe.runner_config["epochs"] == 2
    assert recipe.lr_schedule["type"] == "CosineWithWarmUpLR"
    assert recipe.lr_schedule["warmup_ratio"] == 0.01 and recipe.lr_schedule["lr_end"] == 0.0


@pytest.mark.parametrize("sections,message", [
    ({"runner_config": {"batch_szie": 2}}, "unknown key runner_config.batch_szie"),
    ({"optimiser": {}}, "unknown key optimiser"),
    ({"runner_config": {"batch_size": "two"}}, "runner_config.batch_size must be a positive integer"),
    ({"gkd": {"lmbda": 1.5}}, "gkd.lmbda must be a number between 0 and 1"),
    ({"lr_schedule": {"type": "Linear"}}, "lr_schedule.type must be one of"),
    ({"parallel_config": {"model_parallel": 0}}, "parallel_config.model_parallel must be a positive integer"),
    ({"train_dataset": {"sources": [{"path": "x.txt", "fromat": "text"}]}}, "unknown key train_dataset.sources[0].fromat"),
])
def test_bad_keys_and_values_name_the_key(paths, sections, message):
    with pytest.raises(UserError, match=None) as info:
        load_recipe(_recipe(paths, **sections))
    assert message in str(info.value)
    assert "recipe.yaml" in str(info.value)


def test_missing_files_are_reported_before_any_work(paths):
    with pytest.raises(UserError, match=r"train_dataset.sources\[0\].path .*nope.txt: data file not found"):
        load_recipe(_recipe(paths, train_dataset={"sources": [str(paths / "nope.txt")]}))
    with pytest.raises(UserError, match="model.teacher .*: model directory not found"):
        load_recipe(_recipe(paths, model={"student": str(paths / "student"), "teacher": str(paths / "gone")}))
    with pytest.raises(UserError, match="run_mode gkd needs model.teacher"):
        load_recipe(_recipe(paths, model={"student": str(paths / "student")}))


def test_environment_expansion(paths, monkeypatch):
    monkeypatch.setenv("MY_DATA", str(paths))
    recipe = load_recipe(_recipe(paths, train_dataset={"sources": ["${MY_DATA}/text.txt"]},
                                 output_dir="${MY_RUNS:-" + str(paths) + "/runs}/x"))
    assert recipe.sources[0].path == paths / "text.txt"
    assert recipe.output_dir == paths / "runs" / "x"
    monkeypatch.delenv("MY_DATA")
    with pytest.raises(UserError, match=r"train_dataset.sources\[0\]: environment variable MY_DATA is not set"):
        load_recipe(_recipe(paths, train_dataset={"sources": ["${MY_DATA}/text.txt"]}))


def test_cli_fails_with_one_line_and_exit_2_without_creating_output(paths):
    recipe = _recipe(paths, runner_config={"gradient_accumulation": 2})
    result = CliRunner().invoke(train_cmd, ["--config", str(recipe)])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: recipe")
    assert "unknown key runner_config.gradient_accumulation" in result.output
    assert not (paths / "run").exists()
    result = CliRunner().invoke(train_cmd, ["--config", str(paths / "absent.yaml")])
    assert result.exit_code == 2 and "recipe file not found" in result.output


TRAINING_RECIPES = sorted(p for p in (REPO / "recipes").glob("*.yaml") if not p.name.startswith("youzhi_"))


@pytest.mark.parametrize("recipe", TRAINING_RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(recipe, monkeypatch):
    monkeypatch.setenv("MINDYOUZHI_SHARED", "/shared")
    monkeypatch.setenv("MINDYOUZHI_MODELS", "/models")
    monkeypatch.setenv("MINDYOUZHI_DATA", "/data")
    parsed = load_recipe(recipe, check_paths=False)
    assert parsed.lr_schedule["type"] == "CosineWithWarmUpLR"
    if parsed.run_mode == "sft":
        assert parsed.lr_schedule["lr_end"] == 0.0
