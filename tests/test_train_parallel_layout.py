"""The semi-auto parallel layout (train/parallel_layout.py), checked on CPU: MindSpore compiles it
only for Ascend, so these tests check what can be checked here — the strategies divide the weights
into whole heads, every weight of the real model has one, the pipeline stages partition the
layers, the names given to ``Cell.shard`` / ``Pipeline`` are the network's, and the memory plan's
per-rank weights are the slices the strategies imply."""
import math

import numpy as np
import pytest

from mindyouzhi.errors import UserError
from mindyouzhi.models.config import ModelConfig
from mindyouzhi.train.memory import Layout, plan_memory, stage_parameters
from mindyouzhi.train.parallel_layout import (COLUMN, REPLICATED, ROW, VOCABULARY, build_layout, data_parallel_rank,
                                              layer_stages)
from test_train_fixtures import shared_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return shared_models(tmp_path_factory)


def _net(model_dir):
    from mindyouzhi.convert_weights.safetensors_io import SafetensorsStore
    from mindyouzhi.models.decoder import CausalLM

    return CausalLM(ModelConfig.from_dir(model_dir), SafetensorsStore(model_dir), where=str(model_dir))


@pytest.mark.parametrize("which", ["student", "teacher"])
@pytest.mark.parametrize("mp", [2, 4])
def test_every_weight_has_a_valid_strategy_with_whole_heads(models, which, mp):
    config = ModelConfig.from_dir(models[which])
    net = _net(models[which])
    plan = build_layout(config, Layout(data_parallel=2, model_parallel=mp))
    params = {name: tuple(param.shape) for name, param in net.parameters_and_names()}
    assert set(plan.weights) == set(params)
    for name, weight in plan.weights.items():
        assert weight.shape == params[name] and len(weight.split) == len(weight.shape)
        assert all(size % parts == 0 for size, parts in zip(weight.shape, weight.split)), weight
    heads = config.num_attention_heads
    for name, weight in plan.weights.items():
        if name.endswith(("q_proj.weight", "kv_b_proj.weight")):  # column split on heads: whole heads per rank
            assert weight.role == COLUMN and weight.split == (mp, 1)
            assert (weight.shape[0] // mp) % (weight.shape[0] // heads) == 0
        elif name.endswith("o_proj.weight"):                     # row split: input columns of whole heads
            assert weight.role == ROW and weight.split == (1, mp)
            assert (weight.shape[1] // mp) % (weight.shape[1] // heads) == 0
        elif name.endswith(("gate_proj.weight", "up_proj.weight")):
            assert weight.split == (mp, 1)
        elif name.endswith("down_proj.weight"):
            assert weight.split == (1, mp)
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
            assert weight.role == VOCABULARY and weight.split == (mp, 1)
        elif name.endswith(("k_proj.weight", "v_proj.weight")):  # 2 KV heads: split over 2, replicated over 4
            assert weight.split == ((mp, 1) if config.num_key_value_heads % mp == 0 else (1, 1))
        elif name.endswith("kv_a_proj_with_mqa.weight") or len(weight.shape) == 1:
            assert weight.role == REPLICATED and set(weight.split) == {1}


def test_shard_plans_and_pipeline_stages_name_the_networks_cells(models):
    """What ``parallelize`` hands to Cell.shard and Pipeline exists in the network (MindSpore ignores
    an unknown parameter name with a warning, so a typo would silently leave a weight unsplit)."""
    from mindspore import nn
    from mindspore.parallel.nn import Pipeline

    config = ModelConfig.from_dir(models["student"])
    net = _net(models["student"])
    plan = build_layout(config, Layout(model_parallel=2, pipeline_stage=2, micro_batch_num=2))
    cells = dict(net.cells_and_names())
    for cell_name, parameter_plan in plan.parameter_plans().items():
        assert set(parameter_plan) <= {p.name for p in cells[cell_name].get_parameters()}
        strategy, = plan.input_strategy(cell_name)
        assert strategy[-1] == (2 if any(plan.weights[n].role == ROW for n in parameter_plan) else 1)

    class Wrapper(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)
            self.student = net

        def construct(self, ids):
            return self.student(ids)

    wrapper = Wrapper()
    Pipeline(wrapper, 2, stage_config=plan.stage_config("student."))  # KeyError if a name were wrong
    stages = {name: cell.pipeline_stage for name, cell in wrapper.cells_and_names() if name.startswith("student.")
              and name.count(".") <= 3 and name not in ("student.model", "student.model.layers")}
    assert [stages[f"student.model.layers.{i}"] for i in range(config.num_hidden_layers)] == plan.layer_stages
    assert stages["student.model.embed_tokens"] == 0 and stages["student.lm_head"] == 1
    assert {p.name for p in net.get_parameters()} == set(plan.weights)  # the wrapper did not rename them


@pytest.mark.parametrize("layers, stages", [(2, 2), (5, 2), (7, 3), (34, 4), (48, 5), (8, 8)])
def test_pipeline_stages_partition_the_layers(layers, stages):
    assigned = layer_stages(layers, stages)
    assert len(assigned) == layers and assigned == sorted(assigned)  # every layer once, contiguous runs
    sizes = [assigned.count(stage) for stage in range(stages)]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("layout", [Layout(model_parallel=2), Layout(data_parallel=2, model_parallel=4),
                                    Layout(model_parallel=2, pipeline_stage=2, micro_batch_num=2)])
def test_plan_weights_are_the_strategies_slices(models, layout):
    """Independent of the layout's own sum: each parameter of the loaded network divided by its
    strategy, summed per stage (the tied-free head on the last stage, the embedding on the first)."""
    config = ModelConfig.from_dir(models["student"])
    net = _net(models["student"])
    plan = build_layout(config, layout)
    per_stage = [0] * layout.pipeline_stage
    for name, param in net.parameters_and_names():
        weight = plan.weights[name]
        per_stage[weight.stage] += math.prod(param.shape) // math.prod(weight.split)
    assert stage_parameters(config, layout) == max(per_stage)
    bf16 = plan_memory(config, layout, seq_length=32, micro_batch=1, compute_dtype="bfloat16", recompute=True)
    assert bf16.rows["weights (bfloat16)"] == 2 * max(per_stage)


def test_refusals_name_the_key(models):
    config = ModelConfig.from_dir(models["student"])
    with pytest.raises(UserError, match="model_parallel 3 does not divide the model's num_attention_heads"):
        build_layout(config, Layout(model_parallel=3))
    with pytest.raises(UserError, match="pipeline_stage 3 is more than the model's 2 layers"):
        build_layout(config, Layout(pipeline_stage=3, micro_batch_num=3))
    with pytest.raises(UserError, match="micro_batch_num 1 must be at least pipeline_stage 2"):
        build_layout(config, Layout(pipeline_stage=2))


def test_model_parallel_ranks_read_the_same_rows():
    """MindSpore's device matrix: mp ranks adjacent, stages outermost (dp 2 × mp 2 × pp 2)."""
    assert [data_parallel_rank(rank, 2, 2) for rank in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert [data_parallel_rank(rank, 4, 1) for rank in range(4)] == [0, 1, 2, 3]
    assert np.all(np.diff([data_parallel_rank(r, 16, 2) for r in range(32)])[::2] == 0)


RECIPES = __import__("pathlib").Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("name", ["gkd_youzhi7b_a3", "sft_youzhi7b_a3", "gkd_youzhi14b_a3", "sft_youzhi14b_a3"])
def test_a3_recipes_build_a_valid_layout_for_student_and_teacher(name, monkeypatch):
    """The shipped Ascend recipes pass every check the semi-auto step makes before it starts."""
    from mindyouzhi.train.config import load_recipe
    from mindyouzhi.train.memory import recipe_layout, recipe_model_configs
    from mindyouzhi.train.parallel_layout import check_semi_auto_recipe, needs_semi_auto

    monkeypatch.setenv("MINDYOUZHI_MODELS", "/nonexistent/models")
    monkeypatch.setenv("MINDYOUZHI_DATA", "/nonexistent/data")
    recipe = load_recipe(RECIPES / f"{name}.yaml", check_paths=False)
    assert needs_semi_auto(recipe)[0].startswith("parallel_config.model_parallel")
    check_semi_auto_recipe(recipe)
    for config in filter(None, recipe_model_configs(recipe)):
        plan = build_layout(config, recipe_layout(recipe))
        assert plan.model_parallel * plan.data_parallel == 32 and set(plan.layer_stages) == {0}


@pytest.mark.parametrize("change, message", [
    ({"parallel_config": {"data_parallel": 1, "pipeline_stage": 2, "micro_batch_num": 4},
      "runner_config": {"gradient_accumulation_steps": 2}}, "set runner_config.gradient_accumulation_steps"),
    ({"run_mode": "gkd", "parallel_config": {"data_parallel": 1, "pipeline_stage": 2, "micro_batch_num": 2},
      "runner_config": {"gradient_accumulation_steps": 2}}, "GKD with pipeline_stage > 1"),
    ({"run_mode": "gkd", "parallel_config": {"data_parallel": 1, "model_parallel": 2}, "gkd": {"lmbda": 0.5}},
     "gkd.lmbda > 0"),
])
def test_combinations_the_parallel_step_does_not_make_are_refused(tmp_path, change, message):
    from mindyouzhi.train.config import load_recipe
    from mindyouzhi.train.parallel_layout import check_semi_auto_recipe
    from test_train_fixtures import write_recipe

    sections = {"run_mode": "sft", "model": {"student": str(tmp_path), "teacher": str(tmp_path)},
                "train_dataset": {"sources": [str(tmp_path / "t.txt")]}, **change}
    if sections["run_mode"] == "sft":
        sections["model"] = {"student": str(tmp_path)}
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", **sections), check_paths=False)
    with pytest.raises(UserError, match=message):
        check_semi_auto_recipe(recipe)


def test_a_tied_table_is_on_the_first_and_the_last_stage():
    config = ModelConfig.from_dict(dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=True))
    table = 256 * 64 // 2
    plan = build_layout(config, Layout(model_parallel=2, pipeline_stage=2, micro_batch_num=2))
    layers = [sum(w.slice_elements for name, w in plan.weights.items() if name.startswith(f"model.layers.{i}."))
              for i in range(4)]
    assert plan.stage_elements(0) == table + layers[0] + layers[1]
    assert plan.stage_elements(1) == table + layers[2] + layers[3] + 64  # + the final norm


@pytest.mark.parametrize("run_mode, extra", [
    ("gkd", {"parallel_config": {"data_parallel": 1, "model_parallel": 2, "optimizer_shard": True},
             "model": {"compute_dtype": "bfloat16"}}),
    ("sft", {"parallel_config": {"data_parallel": 1, "pipeline_stage": 2, "micro_batch_num": 2},
             "runner_config": {"batch_size": 1, "gradient_accumulation_steps": 2}}),
])
def test_the_semi_auto_step_is_assembled_on_cpu(models, tmp_path, run_mode, extra):
    """Everything up to compilation (which MindSpore does only for Ascend): the wrappers accept what
    ``parallelize`` gives them, the parameter names survive, recompute / bf16 / stages are set."""
    from mindspore.parallel.auto_parallel import AutoParallel

    from mindyouzhi.models.decoder import RopeTables
    from mindyouzhi.models.layers import causal_mask, to_tensor
    from mindyouzhi.train.config import load_recipe
    from mindyouzhi.train.optim import AdamW
    from mindyouzhi.train.parallel_layout import SemiAutoStep
    from test_train_fixtures import write_recipe

    model = {"student": str(models["student"]), **({"teacher": str(models["teacher"])} if run_mode == "gkd" else {}),
             **extra.get("model", {})}
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", run_mode=run_mode, model=model,
                                      train_dataset={"sources": [str(models["text"])], "seq_length": 16},
                                      recompute_config={"recompute": True},
                                      **{k: v for k, v in extra.items() if k != "model"}))
    config = ModelConfig.from_dir(models["student"])
    net = _net(models["student"])
    names = {p.name for p in net.get_parameters()}
    params = net.trainable_params()
    tables = tuple(to_tensor(t) for t in RopeTables(config)(16)) + (to_tensor(causal_mask(16)),)
    teacher = _net(models["teacher"]) if run_mode == "gkd" else None
    step = SemiAutoStep(net, config, params, AdamW(params), recipe, tables, teacher,
                        ModelConfig.from_dir(models["teacher"]) if teacher is not None else None)
    assert isinstance(step.step, AutoParallel)
    assert {p.name for p in net.get_parameters()} == names
    assert all(layer._has_config_recompute for layer in net.model.layers)  # what Cell.recompute() records
    loss_cell = step.step.network.loss_cell
    if run_mode == "gkd":
        assert getattr(loss_cell, "_amp_level", None) == "auto"
    else:
        assert [layer.pipeline_stage for layer in net.model.layers] == [0, 1]
