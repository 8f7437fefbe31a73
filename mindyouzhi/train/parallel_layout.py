"""The recipe's ``parallel_config`` as a layout: how every weight is split, on which pipeline
stage it lives, and the MindSpore strategies that say so.

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
  at least one layer per stage, ``micro_batch_num`` ≥ stages).  ``stage_parameters`` counts
  weights from this layout, so the plan's per-rank weights are the strategies' slices.

* ``operator_strategies``: the same decisions as MindSpore ``in_strategy`` tuples for the
  primitives that run them (each projection's ``MatMul(transpose_b=True)`` and bias ``Add``, the
  embedding's ``Gather``, a tied head's ``MatMul``: ``models/layers.py``), with the batch split over
  ``data_parallel``; ``dataset_strategy`` the input strategy that makes every rank of a
  model-parallel group read the same rows.  ``semi_auto.py`` puts them on the network (Ascend).

This file decides; it imports nothing of the memory plan (``memory.py`` imports it).
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
class Layout:
    """The recipe's ``parallel_config``."""

    data_parallel: int = 1
    model_parallel: int = 1
    pipeline_stage: int = 1
    optimizer_shard: bool = False
    micro_batch_num: int = 1

    @property
    def world(self) -> int:
        return self.data_parallel * self.model_parallel * self.pipeline_stage


def recipe_layout(recipe) -> Layout:
    pc = recipe.parallel_config
    return Layout(pc["data_parallel"], pc["model_parallel"], pc["pipeline_stage"], pc["optimizer_shard"],
                  pc["micro_batch_num"])


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

    def operator_strategies(self, tied_head: bool = False) -> dict:
        """Cell name → {primitive attribute path in that cell: MindSpore ``in_strategy``}, for the
        primitives the cells' ``construct`` calls (``models/layers.py``): a projection's
        ``dense.matmul`` ([tokens, in] × Wᵀ, W as (out, in)) and, with a bias, ``dense.bias_add``;
        the embedding's ``gather`` (table, ids); a tied head's ``tied_head.matmul``.  The weight's
        entry is its split; the activations' rows are split over ``data_parallel``; a row-split
        weight reads its input split like the column projection before it (partial sums, then one
        all-reduce inserted by MindSpore)."""
        dp, mp = self.data_parallel, self.model_parallel
        out: dict = {}
        for weight in self.weights.values():
            if not weight.name.endswith(".weight") or len(weight.shape) != 2:
                continue
            cell = weight.name[:-len(".weight")]
            if cell == "model.embed_tokens":
                out[cell] = {"gather": (weight.split, (dp, 1))}
                continue
            rows = (dp, weight.split[1])  # the input: rows over dp, columns as the weight's input side
            strategies = {"dense.matmul": (rows, weight.split)}
            if cell + ".bias" in self.weights:
                strategies["dense.bias_add"] = ((dp, weight.split[0]), (weight.split[0],))
            out[cell] = strategies
        if tied_head:
            out["tied_head"] = {"matmul": ((dp, 1), self.weights["model.embed_tokens.weight"].split)}
        return out

    def dataset_strategy(self, inputs: int) -> tuple:
        """``AutoParallel.dataset_strategy`` for ``inputs`` [rows, tokens] tensors: rows split over
        ``data_parallel`` only.  MindSpore's default ("data_parallel") treats each rank's batch as its
        own slice of a batch split over *all* devices (``parallel/_utils.py: _to_full_shapes``), which
        with model parallelism would count the rows a model-parallel group shares once per rank."""
        return ((self.data_parallel, 1),) * inputs

    def stage_config(self, prefix: str = "") -> dict:
        """Cell name → pipeline stage, for ``mindspore.parallel.nn.Pipeline`` (``prefix``: the
        model's attribute path inside the wrapped cell)."""
        config = {f"model.layers.{i}": stage for i, stage in enumerate(self.layer_stages)}
        config["model.embed_tokens"] = 0
        config["model.norm"] = self.pipeline_stage - 1
        if "lm_head.weight" in self.weights:
            config["lm_head"] = self.pipeline_stage - 1
        return {prefix + name: stage for name, stage in config.items()}


def stage_parameters(config, layout: Layout) -> int:
    """Weight elements one rank of the largest pipeline stage holds: the slices the strategies give it
    (so the memory plan and the strategies cannot disagree)."""
    return build_layout(config, layout).largest_stage_elements()


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


def build_layout(config, layout: Layout, where: str = "parallel_config") -> ParallelLayout:
    """Every weight of ``config`` with its split and stage under ``layout``."""
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
    """Which data-parallel slice of the batch a rank reads under ``dataset_strategy``: MindSpore's
    device matrix puts the repeated (model-parallel) ranks of one slice next to each other and
    pipeline stages outermost, so every rank of a model-parallel group feeds the same rows and each
    row is read once per data-parallel group."""
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
