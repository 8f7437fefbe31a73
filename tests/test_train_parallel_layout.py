"""The semi-auto parallel layout (train/parallel_layout.py, train/semi_auto.py), checked on CPU:
MindSpore compiles it only for Ascend, so these tests check what can be checked here on the
parameter and primitive objects — the strategies divide the weights into whole heads, every
strategy sits on a primitive that ``construct`` really calls with the weight it splits (student and
frozen teacher), names are unique across teacher and student and survive MindSpore's name check
and a save/load, the ranks' rows, the pipeline stages, and the memory plan's per-rank weights."""
import math

import numpy as np
import pytest

from mindyouzhi.errors import UserError
from mindyouzhi.models.config import ModelConfig
from mindyouzhi.train.memory import plan_memory
from mindyouzhi.train.parallel_layout import (COLUMN, REPLICATED, ROW, VOCABULARY, Layout, build_layout,
                                              data_parallel_rank, layer_stages, stage_parameters)
from test_train_fixtures import shared_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return shared_models(tmp_path_factory)


def _net(model_dir, name_prefix=""):
    from mindyouzhi.convert_weights.safetensors_io import SafetensorsStore
    from mindyouzhi.models.decoder import CausalLM

    return CausalLM(ModelConfig.from_dir(model_dir), SafetensorsStore(model_dir), where=str(model_dir),
                    name_prefix=name_prefix)


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


def _called_primitives(net, ids, config):
    """Run ``net`` eagerly (PyNative) and record every MatMul / Add / Gather call: primitive object →
    the Parameters it was given (so a strategy on a primitive ``construct`` never calls is caught)."""
    import mindspore as ms
    from mindspore import Parameter, ops

    from mindyouzhi.models.decoder import RopeTables
    from mindyouzhi.models.layers import causal_mask, to_tensor

    calls: dict = {}
    classes = {type(ops.MatMul()), type(ops.Add()), type(ops.Gather())}
    originals = {cls: cls.__call__ for cls in classes}

    def recorder(cls):
        def call(self, *args, **kwargs):
            calls.setdefault(id(self), []).append([a.name for a in args if isinstance(a, Parameter)])
            return originals[cls](self, *args, **kwargs)
        return call

    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        for cls in classes:
            cls.__call__ = recorder(cls)
        tables = tuple(to_tensor(t) for t in RopeTables(config)(ids.shape[1])) + (to_tensor(causal_mask(ids.shape[1])),)
        net(to_tensor(ids, ms.int32), *tables)
    finally:
        for cls, original in originals.items():
            cls.__call__ = original
        ms.set_context(mode=mode)
    return calls


def _tied_model():
    """A tied-embedding GQA model from random weights (its head is the table's own MatMul)."""
    from mindyouzhi.models.decoder import CausalLM, expected_global_shapes, expected_layer_shapes, layer_prefix

    config = ModelConfig.from_dict(dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=True))
    rng = np.random.default_rng(0)
    shapes = dict(expected_global_shapes(config))
    for layer in range(config.num_hidden_layers):
        shapes.update({layer_prefix(layer) + k: v for k, v in expected_layer_shapes(config, layer).items()})
    weights = {name: rng.normal(0, 0.05, shape).astype(np.float32) for name, shape in shapes.items()}
    return config, lambda prefix: CausalLM(config, weights, name_prefix=prefix)


@pytest.mark.parametrize("which, mp", [("student", 2), ("teacher", 2), ("teacher", 4), ("tied", 2)])
def test_every_strategy_is_on_a_primitive_construct_calls(models, which, mp):
    """Each projection, embedding and head primitive that ``construct`` runs carries the strategy of
    the weight it multiplies, and no strategy sits on a primitive that is never called (as
    ``Cell.shard`` on q_proj/kv_b_proj did, whose ``construct`` the attention never calls).  The
    teacher is frozen first: its strategies must not depend on ``trainable_params()``."""
    from mindyouzhi.train.semi_auto import TEACHER_PREFIX, hold_teacher, shard_network

    prefix = "" if which == "student" else TEACHER_PREFIX
    if which == "tied":
        config, build = _tied_model()
        net = build(prefix)
    else:
        config = ModelConfig.from_dir(models[which])
        net = _net(models[which], prefix)
    if which != "student":
        hold_teacher(net, "float32")
        assert not net.trainable_params()
    dp = 2
    plan = build_layout(config, Layout(data_parallel=dp, model_parallel=mp))
    applied = shard_network(net, plan)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 8)).astype(np.int32)
    calls = _called_primitives(net, ids, config)
    matrices = {name for name, w in plan.weights.items() if len(w.shape) == 2}
    covered = set()
    for cell_name, path, primitive in applied:
        assert id(primitive) in calls, f"{cell_name}.{path}: strategy on a primitive construct never calls"
        strategy = primitive.in_strategy
        for params in calls[id(primitive)]:
            assert len(params) == 1, (cell_name, path, params)
            name = params[0][len(prefix):]
            weight = plan.weights[name]
            if path.endswith("gather"):
                assert strategy == (weight.split, (dp, 1)), (name, strategy)
            elif cell_name == "tied_head":  # hidden · tableᵀ: the table split over the vocabulary
                assert name == "model.embed_tokens.weight" and strategy == ((dp, 1), weight.split)
            elif path.endswith("bias_add"):
                assert name.endswith(".bias") and strategy[1] == weight.split and strategy[0][0] == dp
            else:  # x [tokens, in] · Wᵀ: the weight's split, rows over data parallel, input split as W's columns
                assert strategy == ((dp, weight.split[1]), weight.split), (name, strategy)
            covered.add(name)
    assert matrices <= covered  # every matrix of the model is multiplied by a sharded primitive
    assert any(plan.weights[n].split[0] == mp for n in covered)  # and mp really splits something


def test_pipeline_stages_name_the_networks_cells(models):
    """What ``Pipeline`` gets exists in the network (a wrong name is a KeyError or a silently
    unstaged layer)."""
    from mindspore import nn
    from mindspore.parallel.nn import Pipeline

    config = ModelConfig.from_dir(models["student"])
    net = _net(models["student"])
    plan = build_layout(config, Layout(model_parallel=2, pipeline_stage=2, micro_batch_num=2))

    class Wrapper(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)
            self.student = net

        def construct(self, ids):
            return self.student(ids)

    wrapper = Wrapper()
    Pipeline(wrapper, 2, stage_config=plan.stage_config("student."))  # KeyError if a name were wrong
    named = plan.stage_config("student.")
    stages = {name: cell.pipeline_stage for name, cell in wrapper.cells_and_names() if name in named}
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


@pytest.mark.parametrize("dp, mp, pp", [(2, 2, 1), (4, 2, 1), (2, 2, 2), (3, 1, 1)])
def test_each_row_is_read_once_per_data_parallel_group(dp, mp, pp):
    """The rows every rank reads for a step (the trainer's BatchPlan at the rank's data-parallel
    slice): disjoint across a data-parallel group, identical within a model-parallel group, all of
    the global batch — and the input strategy handed to MindSpore splits rows over dp only (its
    default would count every rank's rows as a slice of a batch split over all devices)."""
    from mindyouzhi.train.data import BatchPlan

    batch, accumulation = 2, 3
    plan = BatchPlan(200, batch * accumulation * dp, 1, -1, 7, True, "r")
    layout = build_layout(ModelConfig.from_dict(dict(model_type="llama", vocab_size=64, hidden_size=32,
                                                     intermediate_size=64, num_hidden_layers=4,
                                                     num_attention_heads=4, num_key_value_heads=2)),
                          Layout(dp, mp, pp, False, max(pp, 1)))
    assert layout.dataset_strategy(3) == ((dp, 1),) * 3
    for step in (0, 5):
        rows = {}
        for rank in range(dp * mp * pp):
            slice_ = data_parallel_rank(rank, dp, mp)
            rows[rank] = [i for micro in plan.micro_batches(step, slice_, dp, batch) for i in micro]
        stage0 = range(dp * mp)  # one pipeline stage's ranks (the others read the same rows: same device matrix)
        groups = {}
        for rank in stage0:
            groups.setdefault(rank // mp, []).append(rank)  # MindSpore: model-parallel ranks adjacent
        for members in groups.values():
            assert all(rows[r] == rows[members[0]] for r in members)
        firsts = [rows[members[0]] for members in groups.values()]
        flat = [i for r in firsts for i in r]
        assert len(flat) == len(set(flat)) == batch * accumulation * dp
        assert sorted(flat) == sorted(plan.global_indices(step))
        for rank in range(dp * mp, dp * mp * pp):
            assert rows[rank] == rows[rank - dp * mp]


RECIPES = __import__("pathlib").Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("name", ["gkd_youzhi7b_a3", "sft_youzhi7b_a3", "gkd_youzhi14b_a3", "sft_youzhi14b_a3"])
def test_a3_recipes_build_a_valid_layout_for_student_and_teacher(name, monkeypatch):
    """The shipped Ascend recipes pass every check the semi-auto step makes before it starts."""
    from mindyouzhi.train.config import load_recipe
    from mindyouzhi.train.memory import recipe_model_configs
    from mindyouzhi.train.parallel_layout import check_semi_auto_recipe, needs_semi_auto, recipe_layout

    monkeypatch.setenv("MINDYOUZHI_MODELS", "/nonexistent/models")
    monkeypatch.setenv("MINDYOUZHI_DATA", "/nonexistent/data")
    recipe = load_recipe(RECIPES / f"{name}.yaml", check_paths=False)
    assert needs_semi_auto(recipe)[0].startswith("parallel_config.model_parallel")
    check_semi_auto_recipe(recipe)
    for config in filter(None, recipe_model_configs(recipe)):
        plan = build_layout(config, recipe_layout(recipe))
        assert plan.model_parallel * plan.data_parallel == 32 and set(plan.layer_stages) == {0}
        assert recipe.global_batch(plan.data_parallel) == 128


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
    the step gives them; student and teacher names are unique (the teacher's prefixed) and stay what
    they are through MindSpore's own name check (which renames *every* parameter to its attribute path
    when two share a name) and through a checkpoint save and load; the teacher is frozen and held in
    the compute dtype; the input strategy splits rows over dp; recompute / bf16 / stages are set; the
    checkpoint's moment filter keeps every AdamW moment."""
    import mindspore as ms
    from mindspore.parallel.auto_parallel import AutoParallel

    from mindyouzhi.models.decoder import CausalLM, RopeTables
    from mindyouzhi.models.layers import causal_mask, to_tensor
    from mindyouzhi.train import checkpoint as ckpt
    from mindyouzhi.train.config import load_recipe
    from mindyouzhi.train.optim import AdamW
    from mindyouzhi.train.semi_auto import TEACHER_PREFIX, SemiAutoStep
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
    teacher = _net(models["teacher"], TEACHER_PREFIX) if run_mode == "gkd" else None
    optimizer = AdamW(params)
    step = SemiAutoStep(net, config, params, optimizer, recipe, tables, teacher,
                        ModelConfig.from_dir(models["teacher"]) if teacher is not None else None)
    assert isinstance(step.step, AutoParallel)
    dp = recipe.parallel_config["data_parallel"]
    assert step.step._dataset_strategy_config == ((dp, 1),) * 3

    every = [p.name for p in step.train_step.get_parameters()]
    assert len(every) == len(set(every))  # unique by construction: MindSpore has nothing to rename
    step.train_step.check_names_and_refresh_name()  # what MindSpore runs on the first call
    assert [p.name for p in step.train_step.get_parameters()] == every
    assert {p.name for p in net.get_parameters()} == names  # the student keeps its HF names
    moments = [p.name for p in optimizer.moments()]
    assert len(moments) == 2 * len(params) and set(moments) <= set(every)
    kept = [name for name in every if name.startswith(ckpt.MOMENT_PREFIXES)]
    assert sorted(kept) == sorted(moments)  # the checkpoint filter keeps every moment, and only them
    assert all(layer._has_config_recompute for layer in net.model.layers)  # what Cell.recompute() records
    loss_cell = step.train_step.loss_cell
    if run_mode == "gkd":
        assert getattr(loss_cell, "_amp_level", None) == "auto"
        teacher_names = [p.name for p in teacher.get_parameters()]
        assert all(n.startswith(TEACHER_PREFIX) for n in teacher_names) and not set(teacher_names) & names
        assert all(p.dtype == ms.bfloat16 and not p.requires_grad for p in teacher.get_parameters())
        assert all(p.dtype == ms.float32 for p in net.get_parameters())
        # stable across a save and load: the teacher reloaded from its own directory gets the same names
        (tmp_path / "saved").mkdir()
        ckpt.write_model(tmp_path / "saved", net, config, models["student"])
        from mindyouzhi.convert_weights.safetensors_io import SafetensorsStore

        reloaded = CausalLM(config, SafetensorsStore(tmp_path / "saved"))
        assert [p.name for p in reloaded.get_parameters()] == [p.name for p in net.get_parameters()]
        assert [p.name for p in _net(models["teacher"], TEACHER_PREFIX).get_parameters()] == teacher_names
        # the per-rank save of the parallel step (MindSpore's, no gathering) keeps exactly these names
        from safetensors import safe_open

        ckpt.write_sliced_shard(tmp_path / "run", 1, 0, step.step)
        with safe_open(str(ckpt.staging_dir(tmp_path / "run", 1) / "rank_0" / ckpt.SLICED_FILE), "np") as f:
            saved = set(f.keys())
        assert names | set(moments) | set(teacher_names) <= saved
    else:
        assert [layer.pipeline_stage for layer in net.model.layers] == [0, 1]
