"""The per-rank memory plan (``train --plan``) and the layouts the trainer refuses before starting."""
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mindyouzhi.cli import main
from mindyouzhi.models.config import ModelConfig
from mindyouzhi.train.memory import parse_bytes, plan_memory
from mindyouzhi.train.parallel_layout import Layout, stage_parameters
from test_train_fixtures import shared_models, write_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
A3_RECIPES = sorted(RECIPES.glob("*_a3.yaml"))


def _checkpoint_shapes(model_dir: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "np") as handle:
        return {name: handle.get_slice(name).get_shape() for name in handle.keys()}


def test_plan_counts_every_parameter_of_the_checkpoint(tmp_path_factory):
    """Independent reference: the tensor shapes in the student's safetensors file, split by the
    rules written out here (heads / MLP width / vocabulary over mp; latent projection, norms and
    row-split biases replicated)."""
    models = shared_models(tmp_path_factory)
    config = ModelConfig.from_dir(models["student"])
    shapes = _checkpoint_shapes(models["student"])
    assert stage_parameters(config, Layout()) == sum(int(np.prod(s)) for s in shapes.values())

    def expected_slice(name, shape):
        if name.endswith(("q_proj.weight", "kv_b_proj.weight", "gate_proj.weight", "up_proj.weight", "o_proj.weight",
                          "down_proj.weight", "embed_tokens.weight", "lm_head.weight", "q_proj.bias")):
            return int(np.prod(shape)) // 2
        return int(np.prod(shape))  # kv_a_proj_with_mqa, norms

    assert stage_parameters(config, Layout(model_parallel=2)) == sum(expected_slice(n, s) for n, s in shapes.items())
    # two stages: the larger one holds one layer plus the embedding or the head
    assert stage_parameters(config, Layout(pipeline_stage=2, micro_batch_num=2)) < stage_parameters(config, Layout())


def test_optimizer_sharding_and_bf16_rows_are_the_real_buffers(tmp_path_factory):
    """Against the objects the trainer builds (not the plan's own formula): AdamW's moment Parameters,
    the network's Parameters in bf16, and the teacher as the parallel step holds it (bf16, frozen)."""
    import mindspore as ms

    from mindyouzhi.convert_weights.safetensors_io import SafetensorsStore
    from mindyouzhi.models.decoder import CausalLM
    from mindyouzhi.train.optim import AdamW
    from mindyouzhi.train.semi_auto import TEACHER_PREFIX, hold_teacher

    models = shared_models(tmp_path_factory)
    config, teacher_config = (ModelConfig.from_dir(models[k]) for k in ("student", "teacher"))
    net = CausalLM(config, SafetensorsStore(models["student"]))
    teacher = CausalLM(teacher_config, SafetensorsStore(models["teacher"]), name_prefix=TEACHER_PREFIX)
    hold_teacher(teacher, "bfloat16")
    moments = sum(p.nbytes for p in AdamW(net.trainable_params()).moments())
    common = dict(seq_length=32, micro_batch=2, recompute=True)
    fp32 = plan_memory(config, Layout(data_parallel=4), **common)
    sharded = plan_memory(config, Layout(data_parallel=4, optimizer_shard=True), compute_dtype="bfloat16",
                          teacher_config=teacher_config, **common)
    assert fp32.rows["AdamW moments (fp32)"] == moments and "fp32 master weights" not in fp32.rows
    assert abs(sharded.rows["AdamW moments (fp32)"] - moments / 4) <= 2 * 4 * 4  # ceil per rank
    assert sharded.rows["weights (bfloat16)"] == sum(p.nbytes for p in net.get_parameters()) // 2
    assert sharded.rows["teacher weights (bfloat16, held so)"] == sum(p.nbytes for p in teacher.get_parameters())
    assert all(p.dtype == ms.bfloat16 for p in teacher.get_parameters())


def test_recompute_pays_off_with_depth():
    """Recomputation keeps each layer's input plus one layer's working set (twice): worse than
    keeping everything for 2 layers, far better for 24."""
    def rows(layers, recompute):
        config = ModelConfig.from_dict(dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2))
        plan = plan_memory(config, Layout(), seq_length=64, micro_batch=1, recompute=recompute)
        return plan.rows["activations (recompute)" if recompute else "activations (no recompute)"]

    assert rows(2, True) > rows(2, False)
    assert rows(24, True) < rows(24, False) / 4
    assert rows(24, False) == 12 * rows(2, False)


@pytest.mark.parametrize("recipe", A3_RECIPES, ids=[p.stem for p in A3_RECIPES])
def test_a3_recipes_fit_58gb_per_npu(recipe, monkeypatch):
    monkeypatch.setenv("MINDYOUZHI_MODELS", "/nonexistent/models")
    monkeypatch.setenv("MINDYOUZHI_DATA", "/nonexistent/data")
    result = CliRunner().invoke(main, ["train", "--plan", "--config", str(recipe), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["limit"] == 58 << 30 and plan["total"] <= plan["limit"]
    assert plan["layout"]["data_parallel"] * plan["layout"]["model_parallel"] == 32
    gkd = recipe.name.startswith("gkd")
    assert ("teacher weights (bfloat16, held so)" in plan["rows"]) == gkd
    # the terms issue 26 found missing: the unrolled accumulation's gradient sum, the softmax over the
    # full vocabulary (MindSpore does not split the softmax axis), HCCL buffers; host RAM while loading
    rows = plan["rows"]
    assert rows["GradAccumulation: running sum of the unrolled micro-batches' gradients (fp32)"] == \
        rows["gradients (fp32)"]
    vocab = 153376 if "7b" in recipe.name else 152064
    assert rows["head: softmax over the full vocabulary (fp32, the axis is not split)"] == \
        4096 * vocab * 4 * (5 if gkd else 3)
    assert rows["HCCL buffers (default HCCL_BUFFSIZE, in and out per group)"] > 0
    assert plan["host"]["per node: 16 ranks loading at once"] == 16 * next(iter(plan["host"].values()))


def test_a_recipe_that_does_not_fit_is_refused_before_anything_starts(tmp_path, tmp_path_factory):
    models = shared_models(tmp_path_factory)
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=str(tmp_path / "out"),
                          model={"student": str(models["student"]), "teacher": str(models["teacher"])},
                          train_dataset={"sources": [str(models["text"])]},
                          context={"mode": 0, "device_target": "CPU", "max_device_memory": "1MB"})
    planned = CliRunner().invoke(main, ["train", "--plan", "--config", str(recipe)])
    assert planned.exit_code == 2 and "total per rank" in planned.output
    assert "context.max_device_memory" in planned.output.splitlines()[-1]
    trained = CliRunner().invoke(main, ["train", "--config", str(recipe)])
    assert trained.exit_code == 2 and "needs" in trained.output and len(trained.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("section, message", [
    ({"parallel_config": {"data_parallel": 1, "model_parallel": 2}}, "parallel_config.model_parallel 2 needs Ascend"),
    ({"parallel_config": {"data_parallel": 1, "pipeline_stage": 2, "micro_batch_num": 2}},
     "parallel_config.pipeline_stage 2 needs Ascend"),
    ({"parallel_config": {"data_parallel": 1, "optimizer_shard": True}}, "parallel_config.optimizer_shard true needs "
                                                                         "Ascend"),
    ({"model": {"compute_dtype": "bfloat16"}}, "model.compute_dtype bfloat16 needs Ascend"),
    ({"parallel_config": {"data_parallel": 1, "model_parallel": 3}}, "model_parallel 3 does not divide"),
    ({"parallel_config": {"data_parallel": 1, "pipeline_stage": 2}}, "micro_batch_num 1 must be at least"),
])
def test_layouts_the_cpu_cannot_run_are_refused(tmp_path, tmp_path_factory, section, message):
    """On CPU: one line naming the key, exit 2, nothing written — from `train` and `train --plan`."""
    models = shared_models(tmp_path_factory)
    model = {"student": str(models["student"]), "teacher": str(models["teacher"]), **section.get("model", {})}
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=str(tmp_path / "out"), model=model,
                          train_dataset={"sources": [str(models["text"])]},
                          **{k: v for k, v in section.items() if k != "model"})
    for extra in ([], ["--plan"]):
        result = CliRunner().invoke(main, ["train", *extra, "--config", str(recipe)])
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", ["runner_wrapper.type", "parallel_config.gradient_aggregation_group"])
def test_keys_that_did_nothing_are_refused(tmp_path, key):
    section, name = key.split(".")
    recipe = write_recipe(tmp_path / "r.yaml", run_mode="sft", model={"student": str(tmp_path)},
                          train_dataset={"sources": [str(tmp_path / "t.txt")]}, **{section: {name: 4}})
    result = CliRunner().invoke(main, ["train", "--plan", "--config", str(recipe)])
    assert result.exit_code == 2 and f"unknown key {key}" in result.output


def test_parse_bytes():
    assert parse_bytes("58GB", "x") == 58 << 30 and parse_bytes("512MB", "x") == 512 << 20
    with pytest.raises(Exception, match="expected a size"):
        parse_bytes("lots", "context.max_device_memory")


def _bench_train_memory():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "train_memory.py"
    spec = importlib.util.spec_from_file_location("bench_train_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("row", ["sft-whole-L4-V16k-T128", "gkd-mla-layerwise-L4-V16k-T256"])
def test_cpu_plan_is_within_20_percent_of_the_measured_peak(row, tmp_path):
    """`train --plan` for device CPU against a real run's peak RSS above the runtime baseline
    (3 steps in a fresh process, bench/train_memory.py's method): a whole-graph SFT step and a
    layer-wise GKD step with an MLA student and its teacher."""
    bench = _bench_train_memory()
    result = bench.measure_row(next(r for r in bench.ROWS if r[0] == row), tmp_path)
    assert abs(result["measured_bytes"] / result["plan_bytes"] - 1) <= bench.TOLERANCE, result


def test_dry_run_needs_cann(monkeypatch):
    """No CANN runtime here: one line naming what is missing, exit 2, before any model is read."""
    monkeypatch.setenv("MINDYOUZHI_MODELS", "/nonexistent/models")
    monkeypatch.setenv("MINDYOUZHI_DATA", "/nonexistent/data")
    result = CliRunner().invoke(main, ["train", "--config", str(RECIPES / "gkd_youzhi7b_a3.yaml"), "--dry-run"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "--dry-run: needs the CANN runtime" in result.output and "libge_runner.so" in result.output
    result = CliRunner().invoke(main, ["train", "--config", str(RECIPES / "gkd_youzhi7b_a3.yaml"), "--dry-run", "32"])
    assert result.exit_code == 2 and "the recipe has 32 ranks" in result.output


def test_merge_refuses_what_is_not_a_checkpoint(tmp_path):
    (tmp_path / "ckpt").mkdir()
    result = CliRunner().invoke(main, ["train", "merge", "--checkpoint", str(tmp_path / "ckpt"),
                                       "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "not a training checkpoint" in result.output
    assert not (tmp_path / "m").exists()
