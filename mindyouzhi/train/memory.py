"""Per-rank memory plan of a training recipe, checked before anything is loaded.

The plan counts what one device holds at the peak of a step, from the model's tensor shapes
(``models.decoder.expected_*_shapes``, so MLA and GQA layers are both exact), the parallel layout
and the recipe's dtype, batch and sequence length:

* weights in the compute dtype, split over ``model_parallel`` (every matrix; vectors are
  replicated, as MindSpore's ``shard`` leaves them) and ``pipeline_stage`` (whole layers; the
  embedding sits on the first stage, the final norm and head on the last; the plan reports the
  largest stage);
* fp32 master weights when the compute dtype is not fp32, fp32 gradients, AdamW's two fp32 moments
  — master weights and moments are divided over the data-parallel ranks with
  ``parallel_config.optimizer_shard`` (MindSpore's parallel optimizer, level 1);
* the GKD teacher's weights in the compute dtype, sharded like the student;
* activations of one micro-batch, from the layer's own tensors: without recomputation every
  layer keeps its projections' outputs, attention scores and probabilities and the MLP's four
  ``intermediate_size``-wide tensors for the backward; with recomputation only each layer's input
  stays, plus one layer's full set (recomputed) and its gradients; 1F1B pipelining keeps up to
  ``pipeline_stage`` micro-batches in flight on the first stage;
* the head: logits, log-softmax and their gradient in fp32 over the vocabulary slice, plus the
  teacher's log-probabilities for GKD.

Not counted: the framework's own workspace and fragmentation (on CPU the runtime baseline, which
``bench``/tests subtract; on Ascend the gap between HBM and ``max_device_memory``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional

from mindyouzhi.errors import UserError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FP32 = 4
_UNITS = {"": 1, "B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


def parse_bytes(text: str, where: str) -> int:
    """``"58GB"`` → bytes (binary units, as MindSpore's ``max_device_memory`` reads them)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?B?)\s*", str(text).upper())
    if not match:
        raise UserError(f"{where}: expected a size such as \"58GB\", got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2) if match.group(2) != "" else ""])


@dataclass(frozen=True)
class Layout:
    data_parallel: int = 1
    model_parallel: int = 1
    pipeline_stage: int = 1
    optimizer_shard: bool = False
    micro_batch_num: int = 1

    @property
    def world(self) -> int:
        return self.data_parallel * self.model_parallel * self.pipeline_stage


@dataclass
class MemoryPlan:
    rows: dict  # name → bytes per rank
    limit: Optional[int]
    layout: Layout
    notes: list = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    @property
    def fits(self) -> bool:
        return self.limit is None or self.total <= self.limit

    def to_dict(self) -> dict:
        return {"rows": dict(self.rows), "total": self.total, "limit": self.limit, "fits": self.fits,
                "layout": vars(self.layout), "notes": list(self.notes)}

    def table(self) -> str:
        width = max(len(name) for name in self.rows)
        lines = [f"  {name:<{width}}  {gib(value):>10}" for name, value in self.rows.items()]
        lines.append(f"  {'total per rank':<{width}}  {gib(self.total):>10}"
                     + (f"  of {gib(self.limit)} max_device_memory" if self.limit else ""))
        return "\n".join(lines)


def gib(value: int) -> str:
    return f"{value / (1 << 30):.2f} GiB"


def _split(shape: tuple, model_parallel: int) -> int:
    count = math.prod(shape)
    return count // model_parallel if len(shape) >= 2 else count


def stage_parameters(config, layout: Layout) -> int:
    """Parameters on the largest pipeline stage of one model-parallel slice."""
    from mindyouzhi.models.decoder import expected_global_shapes, expected_layer_shapes

    mp, pp = layout.model_parallel, layout.pipeline_stage
    layers = [sum(_split(s, mp) for s in expected_layer_shapes(config, i).values())
              for i in range(config.num_hidden_layers)]
    per_stage = math.ceil(len(layers) / pp)
    stages = [sum(layers[i:i + per_stage]) for i in range(0, len(layers), per_stage)]
    stages += [0] * (pp - len(stages))
    shapes = expected_global_shapes(config)
    stages[0] += _split(shapes["model.embed_tokens.weight"], mp)
    stages[-1] += _split(shapes["model.norm.weight"], mp)
    if "lm_head.weight" in shapes:
        stages[-1] += _split(shapes["lm_head.weight"], mp)
    elif pp > 1:  # tied: the last stage keeps its own copy of the table for the head
        stages[-1] += _split(shapes["model.embed_tokens.weight"], mp)
    return max(stages)


def _layer_activation_elements(config, layer: int, tokens: int, seq_length: int, mp: int) -> int:
    """Elements one layer keeps for its backward: every projection's output (split over mp),
    scores and probabilities (heads split over mp), the MLP's activation and product, and the
    hidden-size tensors around the norms and residuals (replicated)."""
    from mindyouzhi.models.decoder import expected_layer_shapes

    shapes = expected_layer_shapes(config, layer)
    projected = sum(shape[0] for name, shape in shapes.items()
                    if len(shape) == 2 and not name.endswith("down_proj.weight") and not name.endswith("o_proj.weight"))
    heads = config.num_attention_heads
    sharded = projected // mp + 2 * heads * seq_length // mp + 2 * config.intermediate_size // mp
    replicated = 6 * config.hidden_size
    return tokens * (sharded + replicated)


def plan_memory(config, layout: Layout, *, seq_length: int, micro_batch: int, compute_dtype: str = "float32",
                recompute: bool, teacher_config=None, limit: Optional[int] = None) -> MemoryPlan:
    check_layout(config, layout, "parallel_config")
    if teacher_config is not None:
        check_layout(teacher_config, layout, "parallel_config (teacher)")
    mp, dp, pp = layout.model_parallel, layout.data_parallel, layout.pipeline_stage
    compute = DTYPE_BYTES[compute_dtype]
    shard = dp if layout.optimizer_shard else 1
    params = stage_parameters(config, layout)
    rows = {"weights (" + compute_dtype + ")": params * compute}
    if compute_dtype != "float32":
        rows["fp32 master weights"] = math.ceil(params / shard) * FP32
    rows["gradients (fp32)"] = params * FP32
    rows["AdamW moments (fp32)"] = math.ceil(params / shard) * 2 * FP32
    if teacher_config is not None:
        rows["teacher weights (" + compute_dtype + ")"] = stage_parameters(teacher_config, layout) * compute

    tokens = micro_batch * seq_length
    layers_per_stage = math.ceil(config.num_hidden_layers / pp)
    stage_layers = range(layers_per_stage)  # the first stage: the most micro-batches in flight
    per_layer = [_layer_activation_elements(config, i, tokens, seq_length, mp) for i in stage_layers]
    in_flight = min(pp, layout.micro_batch_num) if pp > 1 else 1
    if recompute:
        kept = tokens * config.hidden_size * layers_per_stage
        working = 2 * max(per_layer)  # the recomputed layer and its gradients
        rows["activations (recompute)"] = (kept * in_flight + working) * compute
    else:
        rows["activations (no recompute)"] = sum(per_layer) * in_flight * compute
    vocab_slice = config.vocab_size // mp
    head_tensors = 3 + (2 if teacher_config is not None else 0)
    rows["head: logits, log-softmax, gradient" + (", teacher log-probs" if teacher_config is not None else "")] = (
        tokens * vocab_slice * head_tensors * FP32)
    notes = []
    if compute_dtype == "float32":
        notes.append("fp32 compute: the weights are the master weights")
    return MemoryPlan(rows, limit, layout, notes)


def check_layout(config, layout: Layout, where: str) -> None:
    """What MindSpore's shard strategies need: heads, MLP width and vocabulary divisible by mp."""
    mp = layout.model_parallel
    for name, value in (("num_attention_heads", config.num_attention_heads),
                        ("intermediate_size", config.intermediate_size), ("vocab_size", config.vocab_size)):
        if value % mp:
            raise UserError(f"{where}: model_parallel {mp} does not divide the model's {name} {value}")
    if config.num_hidden_layers < layout.pipeline_stage:
        raise UserError(f"{where}: pipeline_stage {layout.pipeline_stage} is more than the model's "
                        f"{config.num_hidden_layers} layers")


def recipe_layout(recipe) -> Layout:
    pc = recipe.parallel_config
    return Layout(pc["data_parallel"], pc["model_parallel"], pc["pipeline_stage"], pc["optimizer_shard"],
                  pc["micro_batch_num"])


def plan_recipe(recipe) -> MemoryPlan:
    """The plan of a validated recipe (the student's and teacher's config.json, or the recipe's
    ``memory_plan`` configs for models that do not exist yet)."""
    student, teacher = recipe_model_configs(recipe)
    limit_text = recipe.context["max_device_memory"]
    limit = parse_bytes(limit_text, f"recipe {recipe.path}: context.max_device_memory") if limit_text else None
    return plan_memory(student, recipe_layout(recipe), seq_length=recipe.train_dataset["seq_length"],
                       micro_batch=recipe.runner_config["batch_size"], compute_dtype=recipe.model["compute_dtype"],
                       recompute=recipe.recompute, teacher_config=teacher, limit=limit)


def recipe_model_configs(recipe):
    from mindyouzhi.models.config import ModelConfig

    where = f"recipe {recipe.path}"

    def load(model_dir, section_key: str):
        if model_dir is not None and (model_dir / "config.json").is_file():
            return ModelConfig.from_dir(model_dir)
        declared = (recipe.memory_plan or {}).get(section_key)
        if declared is None:
            raise UserError(f"{where}: {model_dir}/config.json not found and no memory_plan.{section_key} to plan "
                            f"with (give the model's config.json contents there)")
        return ModelConfig.from_dict(declared, f"{where}: memory_plan.{section_key}")

    student = load(recipe.student, "student_config")
    teacher = load(recipe.teacher, "teacher_config") if recipe.run_mode == "gkd" else None
    return student, teacher


def refuse_if_too_big(recipe, plan: MemoryPlan) -> None:
    if not plan.fits:
        largest = max(plan.rows, key=plan.rows.get)
        raise UserError(f"recipe {recipe.path}: needs {gib(plan.total)} per rank but context.max_device_memory is "
                        f"{gib(plan.limit)} (largest: {largest} {gib(plan.rows[largest])}); raise model_parallel, "
                        f"enable parallel_config.optimizer_shard or recompute_config.recompute, or shorten "
                        f"seq_length (see `mindyouzhi train --plan`)")
