"""The recipe's ``parallel_config`` as MindSpore semi-auto parallel: shard strategies, optimizer
sharding, pipeline stages, bf16 compute.

Two parts, kept apart on purpose:

* ``build_layout`` (pure Python, any device, tested on CPU): for a model config and a ``Layout``
  it decides how every weight is split and on which pipeline stage it lives —

  - attention, split on heads: q_proj (MLA and GQA) and kv_b_proj (MLA) column-split over
    ``model_parallel`` (whole heads per rank, so RoPE, scores and softmax stay local), k/v_proj
    (GQA) column-split when the KV heads divide by mp and replicated otherwise, o_proj row-split
    (its partial sums meet in one all-reduce); kv_a_proj_with_mqa (MLA) replicated, because the
    latent and the RoPE key are read by every head;
  - MLP: gate/up column-split, down row-split;
  - embedding and LM head split over the vocabulary;
  - norms and row-split biases replicated, column-split biases split with their rows;
  - pipeline: contiguous runs of layers, as even as possible (stage sizes differ by at most one),
    the embedding on the first stage, final norm and head on the last;

  and it checks what MindSpore's strategies need (every split dimension divisible, whole heads,
  at least one layer per stage, ``micro_batch_num`` ≥ stages).  ``memory.stage_parameters`` counts
  weights from this layout, so the plan's per-rank weights are the strategies' slices.

* ``parallelize`` (Ascend only): puts the layout on the network with MindSpore's own API —
  ``Cell.shard(in_strategy, parameter_plan=…)`` per projection (sharding propagation derives the
  remaining operators), ``amp.auto_mixed_precision(…, "auto", bfloat16)`` (MatMuls in bf16,
  norms/softmax/exp in fp32, Parameters — the master weights — stay fp32),
  ``mindspore.parallel.nn.Pipeline`` with the layer→stage map, and the train step wrapped in
  ``AutoParallel(…, "sharding_propagation")`` with ``hsdp(optimizer_level="level1")`` (fp32 weights
  and AdamW moments split over the data-parallel ranks) and ``pipeline(stages, scheduler="1f1b")``.
  MindSpore 2.10 compiles none of this for CPU ("Invalid backend: CPU", docs/training.md), so on
  CPU the trainer stops before it (``refuse_on_cpu``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from mindyouzhi.errors import UserError

COLUMN, ROW, VOCABULARY, REPLICATED = "column", "row", "vocabulary", "replicated"
# the stage of a tied embedding under pipelining: the first stage embeds, the last one's head reads a copy
FIRST_AND_LAST_STAGE = -1

# local weight name (in a layer) → how it is split; biases follow below
_LAYER_ROLES = {
    "self_attn.q_proj.weight": COLUMN,
    "self_attn.kv_b_proj.weight": COLUMN,
    "self_attn.kv_a_proj_with_mqa.weight": REPLICATED,
    "self_attn.o_proj.weight": ROW,
    "mlp.gate_proj.weight": COLUMN,
    "mlp.up_proj.weight": COLUMN,
    "mlp.down_proj.weight": ROW,
}
_KV_HEADS = ("self_attn.k_proj.weight", "self_attn.v_proj.weight")


@dataclass(frozen=True)
class WeightShard:
    name: str
    shape: tuple
    split: tuple  # divisor per dimension: MindSpore's parameter strategy
    role: str
    stage: int

    @property
    def slice_elements(self) -> int:
        return math.prod(self.shape) // math.prod(self.split)


@dataclass
class ParallelLayout:
    data_parallel: int
    model_parallel: int
    pipeline_stage: int
    micro_batch_num: int
    optimizer_shard: bool
    weights: dict = field(default_factory=dict)  # name → WeightShard
    layer_stages: list = field(default_factory=list)  # layer index → stage

    def stage_elements(self, stage: int) -> int:
        """Weight elements one rank of ``stage`` holds: the slices the strategies give it."""
        return sum(w.slice_elements for w in self.weights.values() if w.stage == stage
                   or (w.stage == FIRST_AND_LAST_STAGE and stage in (0, self.pipeline_stage - 1)))

    def largest_stage_elements(self) -> int:
        return max(self.stage_elements(stage) for stage in range(self.pipeline_stage))

    def parameter_plans(self) -> dict:
        """Cell name → {parameter name: strategy} for ``Cell.shard`` (only split parameters)."""
        plans: dict = {}
        for weight in self.weights.values():
            if weight.role == REPLICATED:
                continue
            cell = weight.name.rsplit(".", 1)[0]
            plans.setdefault(cell, {})[weight.name] = weight.split
        return plans

    def input_strategy(self, cell_name: str) -> tuple:
        """``Cell.shard`` in_strategy of a split cell: its activation input, batch over data parallel."""
        dp, mp = self.data_parallel, self.model_parallel
        if cell_name == "model.embed_tokens":  # token ids [B, T]
            return ((dp, 1),)
        roles = {w.role for w in self.weights.values() if w.name.rsplit(".", 1)[0] == cell_name}
        if ROW in roles:  # the input arrives split like the previous column projection's output
            return ((dp, 1, mp),)
        return ((dp, 1, 1),)

    def stage_config(self, prefix: str = "") -> dict:
        """Cell name → pipeline stage, for ``mindspore.parallel.nn.Pipeline`` (``prefix``: the
        model's attribute path inside the wrapped cell)."""
        config = {f"model.layers.{i}": stage for i, stage in enumerate(self.layer_stages)}
        config["model.embed_tokens"] = 0
        config["model.norm"] = self.pipeline_stage - 1
        if "lm_head.weight" in self.weights:
            config["lm_head"] = self.pipeline_stage - 1
        return {prefix + name: stage for name, stage in config.items()}


def layer_stages(num_layers: int, stages: int) -> list[int]:
    """Contiguous runs of layers, the first ``num_layers % stages`` stages one layer longer."""
    base, extra = divmod(num_layers, stages)
    out = []
    for stage in range(stages):
        out += [stage] * (base + (1 if stage < extra else 0))
    return out


def _split(shape: tuple, role: str, mp: int) -> tuple:
    if role in (COLUMN, VOCABULARY):
        return (mp,) + (1,) * (len(shape) - 1)
    if role == ROW:
        return (1, mp)
    return (1,) * len(shape)


def _bias_role(weight_role: str) -> str:
    return COLUMN if weight_role == COLUMN else REPLICATED


def check_divisible(config, mp: int, where: str) -> None:
    """Whole heads per rank; MLP width and vocabulary divisible by mp."""
    for name, value in (("num_attention_heads", config.num_attention_heads),
                        ("intermediate_size", config.intermediate_size), ("vocab_size", config.vocab_size)):
        if value % mp:
            raise UserError(f"{where}: model_parallel {mp} does not divide the model's {name} {value}")


def build_layout(config, layout, where: str = "parallel_config") -> ParallelLayout:
    """Every weight of ``config`` with its split and stage under ``layout`` (a ``memory.Layout``)."""
    from mindyouzhi.models.decoder import expected_global_shapes, expected_layer_shapes, layer_prefix

    mp, pp = layout.model_parallel, layout.pipeline_stage
    check_divisible(config, mp, where)
    if config.num_hidden_layers < pp:
        raise UserError(f"{where}: pipeline_stage {pp} is more than the model's {config.num_hidden_layers} layers")
    if pp > 1 and layout.micro_batch_num < pp:
        raise UserError(f"{where}: micro_batch_num {layout.micro_batch_num} must be at least pipeline_stage {pp} "
                        f"(MindSpore's pipeline needs a micro-batch per stage in flight)")
    plan = ParallelLayout(layout.data_parallel, mp, pp, layout.micro_batch_num, layout.optimizer_shard,
                          layer_stages=layer_stages(config.num_hidden_layers, pp))
    kv_split = config.num_key_value_heads % mp == 0

    def add(name: str, shape: tuple, role: str, stage: int) -> None:
        plan.weights[name] = WeightShard(name, tuple(shape), _split(tuple(shape), role, mp), role, stage)

    for layer, stage in enumerate(plan.layer_stages):
        prefix = layer_prefix(layer)
        shapes = expected_layer_shapes(config, layer)
        for local, shape in shapes.items():
            if local.endswith(".bias"):
                continue
            role = _LAYER_ROLES.get(local)
            if local in _KV_HEADS:
                role = COLUMN if kv_split else REPLICATED
            add(prefix + local, shape, role or REPLICATED, stage)
        for local, shape in shapes.items():
            if local.endswith(".bias"):
                owner = plan.weights[prefix + local[:-len("bias")] + "weight"]
                add(prefix + local, shape, _bias_role(owner.role), stage)
    shapes = expected_global_shapes(config)
    add("model.embed_tokens.weight", shapes["model.embed_tokens.weight"], VOCABULARY, 0)
    add("model.norm.weight", shapes["model.norm.weight"], REPLICATED, pp - 1)
    if "lm_head.weight" in shapes:
        add("lm_head.weight", shapes["lm_head.weight"], VOCABULARY, pp - 1)
    elif pp > 1:  # tied: the last stage keeps its own copy of the table for the head (kept in sync by MindSpore)
        add("model.embed_tokens.weight", shapes["model.embed_tokens.weight"], VOCABULARY, FIRST_AND_LAST_STAGE)
    for weight in plan.weights.values():
        for size, parts in zip(weight.shape, weight.split):
            if size % parts:
                raise UserError(f"{where}: model_parallel {mp} does not divide {weight.name} {list(weight.shape)} "
                                f"(split {list(weight.split)})")
    return plan


def needs_semi_auto(recipe) -> list[str]:
    """The recipe keys that need MindSpore's semi-auto parallel / bf16 (i.e. Ascend)."""
    pc = recipe.parallel_config
    keys = [f"parallel_config.{key} {pc[key]}" for key in ("model_parallel", "pipeline_stage") if pc[key] > 1]
    if pc["optimizer_shard"]:
        keys.append("parallel_config.optimizer_shard true")
    if recipe.model["compute_dtype"] != "float32":
        keys.append(f"model.compute_dtype {recipe.model['compute_dtype']}")
    return keys


def refuse_on_cpu(recipe, device: str) -> None:
    """One line naming the key: MindSpore 2.10 runs none of these on CPU."""
    keys = needs_semi_auto(recipe)
    if keys and device != "Ascend":
        raise UserError(f"recipe {recipe.path}: {keys[0]} needs Ascend (MindSpore 2.10 compiles semi-auto parallel, "
                        f"optimizer sharding and bf16 MatMul only there; this run is on {device}); on CPU use "
                        f"data_parallel only with compute_dtype float32")


def data_parallel_rank(rank: int, data_parallel: int, model_parallel: int) -> int:
    """Which data-parallel slice of the batch a rank reads: MindSpore's device matrix puts the
    model-parallel ranks of one slice next to each other and pipeline stages outermost, and every
    rank of a model-parallel group must feed the same rows."""
    return (rank % (data_parallel * model_parallel)) // model_parallel


def check_semi_auto_recipe(recipe) -> None:
    """What the semi-auto step does not combine (before anything is loaded)."""
    where, pc, rc = f"recipe {recipe.path}", recipe.parallel_config, recipe.runner_config
    if pc["pipeline_stage"] > 1 and rc["gradient_accumulation_steps"] != pc["micro_batch_num"]:
        raise UserError(f"{where}: with pipeline_stage > 1 the accumulation micro-batches are the pipeline's: set "
                        f"runner_config.gradient_accumulation_steps to parallel_config.micro_batch_num "
                        f"({pc['micro_batch_num']})")
    if recipe.run_mode == "gkd" and pc["pipeline_stage"] > 1:
        raise UserError(f"{where}: GKD with pipeline_stage > 1: the teacher runs inside the student's graph and has "
                        f"no stages of its own; use model_parallel instead")
    if recipe.run_mode == "gkd" and recipe.gkd["lmbda"] > 0:
        raise UserError(f"{where}: gkd.lmbda > 0 samples from the student's full weights, which a sharded run does "
                        f"not hold on one rank; use lmbda: 0 with {needs_semi_auto(recipe)[0]}")
    if recipe.train_dataset["packed_attention"] == "isolated":
        raise UserError(f"{where}: train_dataset.packed_attention: isolated is not wired into the parallel step; "
                        f"use shared")


# -- Ascend: MindSpore's semi-auto parallel on the network (not compiled on CPU) ------------------------
def parallelize(net, loss_cell, step_cell, plan: ParallelLayout, compute_dtype: str, teacher=None):
    """Apply ``plan`` to ``net`` (and ``teacher``: (net, its plan)), bf16 and the pipeline to
    ``loss_cell``; wrap ``step_cell(loss_cell)`` in ``AutoParallel``.  Ascend only."""
    import mindspore as ms
    from mindspore import amp
    from mindspore.parallel.auto_parallel import AutoParallel

    for network, layout in ((net, plan),) + ((teacher,) if teacher is not None else ()):
        cells = dict(network.cells_and_names())
        for cell_name, parameter_plan in layout.parameter_plans().items():
            cells[cell_name].shard(in_strategy=layout.input_strategy(cell_name), parameter_plan=parameter_plan)
    if compute_dtype != "float32":
        loss_cell = amp.auto_mixed_precision(loss_cell, "auto", dtype=getattr(ms, compute_dtype))
    if plan.pipeline_stage > 1:
        from mindspore.parallel.nn import Pipeline

        loss_cell = Pipeline(loss_cell, plan.micro_batch_num, stage_config=plan.stage_config("student."))
    parallel = AutoParallel(step_cell(loss_cell), parallel_mode="sharding_propagation")
    if plan.optimizer_shard:
        parallel.hsdp(optimizer_level="level1")
    if plan.pipeline_stage > 1:
        parallel.pipeline(stages=plan.pipeline_stage, scheduler="1f1b")
    return parallel


class SemiAutoStep:
    """The whole-graph step as one MindSpore semi-auto parallel graph (Ascend): forward (the GKD
    teacher's log-probs computed inside it, sharded like the student), backward, gradient
    reduction (inserted by MindSpore), global-norm clipping and the fused AdamW, with the rank's
    accumulation micro-batches fed at once (``GradAccumulation``, or the pipeline's micro-batches);
    ``recompute_config.recompute`` = ``Cell.recompute()`` on every decoder layer."""

    def __init__(self, net, config, params, optimizer, recipe, tables, teacher_net=None, teacher_config=None):
        import mindspore as ms
        from mindspore import nn, ops

        from .memory import recipe_layout
        from .steps import _per_token_loss

        layout = recipe_layout(recipe)
        plan = build_layout(config, layout)
        teacher = (teacher_net, build_layout(teacher_config, layout, "parallel_config (teacher)")) \
            if teacher_net is not None else None
        per_token = _per_token_loss(recipe.run_mode, recipe.gkd)
        inverse_temperature = 1.0 / float(recipe.gkd["temperature"])
        clip = recipe.runner_wrapper["max_grad_norm"] if recipe.runner_wrapper["use_clip_grad"] else None
        accumulation = recipe.runner_config["gradient_accumulation_steps"]
        constants = [ms.Parameter(t, name=f"rope_table_{i}", requires_grad=False) for i, t in enumerate(tables)]
        teacher_constants = []
        if teacher_net is not None:  # the teacher's own RoPE tables (its config, not the student's)
            from mindyouzhi.models.decoder import RopeTables
            from mindyouzhi.models.layers import to_tensor

            seq = recipe.train_dataset["seq_length"]
            teacher_constants = [ms.Parameter(to_tensor(t), name=f"teacher_rope_table_{i}", requires_grad=False)
                                 for i, t in enumerate(RopeTables(teacher_config)(seq))] + [constants[-1]]
        if recipe.recompute:  # MindSpore's recomputation (the layer-wise step is single-device code)
            for layer in net.model.layers:
                layer.recompute()

        class LossCell(nn.Cell):
            def __init__(self):
                super().__init__(auto_prefix=False)  # parameter names stay the checkpoint's (shard plans use them)
                self.student = net
                self.teacher = teacher_net
                self.tables = ms.ParameterTuple(constants)
                self.teacher_tables = ms.ParameterTuple(teacher_constants)

            def construct(self, ids, targets, weights):
                logits = self.student(ids, *self.tables)
                reference = logits  # SFT: the loss does not read it
                if self.teacher is not None:
                    reference = ops.log_softmax(self.teacher(ids, *self.teacher_tables) * inverse_temperature, -1)
                return (per_token(logits, targets, ops.stop_gradient(reference)) * weights).sum()

        def step_cell(loss_cell):
            if plan.pipeline_stage == 1 and accumulation > 1:
                from mindspore.parallel.nn import GradAccumulation

                loss_cell = GradAccumulation(loss_cell, accumulation)
            grad_fn = ms.value_and_grad(loss_cell, None, params)
            reducer = None
            if plan.pipeline_stage > 1:
                from mindspore.parallel.nn import PipelineGradReducer

                reducer = PipelineGradReducer(ms.ParameterTuple(params))

            class TrainStep(nn.Cell):
                def __init__(self):
                    super().__init__(auto_prefix=False)
                    self.loss_cell = loss_cell
                    self.optimizer = optimizer
                    self.hyper = ops.HyperMap()

                def construct(self, ids, targets, weights, lr, eps, decay):
                    loss, grads = grad_fn(ids, targets, weights)
                    if reducer is not None:
                        grads = reducer(grads)
                    norm = ops.sqrt(ops.addn([(g * g).sum() for g in grads]))
                    if clip:
                        grads = self.hyper(ops.partial(ops.mul, ops.minimum(clip / (norm + 1e-6), 1.0)), grads)
                    return ops.depend(loss, self.optimizer(grads, lr, eps, decay)), norm

            return TrainStep()

        self.step = parallelize(net, LossCell(), step_cell, plan, recipe.model["compute_dtype"], teacher)

    def run(self, micro_batches, lr, eps, decay, tables):
        """All of this rank's micro-batches in one call (ids, targets, weights concatenated)."""
        import mindspore as ms

        batches = list(micro_batches)
        ids, targets, weights = (ms.ops.cat([batch[i] for batch in batches], 0) for i in range(3))
        return self.step(ids, targets, weights, lr, eps, decay)
