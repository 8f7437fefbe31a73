"""Per-rank memory plan of a training recipe, checked before anything is loaded.

Two plans, chosen by the device (``context.device_target``, or ``train --plan --device``):

``ascend`` — what a buffer-reusing device must hold at the peak of a step (the plan of the A3
recipes), from the model's tensor shapes (``models.decoder.expected_*_shapes``, so MLA and GQA
layers are both exact), the parallel layout and the recipe's dtype, batch and sequence length:

* weights in the compute dtype: the slices MindSpore's shard strategies give one rank of the
  largest pipeline stage (``parallel_layout.build_layout``: heads, MLP width and vocabulary split
  over ``model_parallel``, replicated norms and latent projection, layers in contiguous stages);
* fp32 master weights when the compute dtype is not fp32, fp32 gradients, AdamW's two fp32 moments
  — master weights and moments are divided over the data-parallel ranks with
  ``parallel_config.optimizer_shard`` (MindSpore's parallel optimizer, ``hsdp`` level 1);
* the GKD teacher's weights in the compute dtype, sharded like the student;
* activations of one micro-batch, from the layer's own tensors: without recomputation every
  layer keeps its projections' outputs, attention scores and probabilities and the MLP's four
  ``intermediate_size``-wide tensors for the backward; with recomputation only each layer's input
  stays, plus one layer's full set (recomputed) and its gradients; 1F1B pipelining keeps up to
  ``pipeline_stage`` micro-batches in flight on the first stage;
* the head: logits, log-softmax and their gradient in fp32 over the vocabulary slice, plus the
  teacher's log-probabilities for GKD.

Not counted there: the framework's workspace and fragmentation (the gap between HBM and
``max_device_memory``).  Not checked on Ascend (none here).

``cpu`` — what MindSpore's CPU graph really holds (``cpu_memory``: every op output and gradient,
counted op by op from the model code, plus the runtime's working set measured on a nano model);
checked against measured peaks by ``bench/train_memory.py`` and ``tests/test_train_memory.py``.
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


def stage_parameters(config, layout: Layout) -> int:
    """Weight elements one rank of the largest pipeline stage holds: the slices the shard
    strategies of ``parallel_layout`` give it (so the plan and the strategies cannot disagree)."""
    from .parallel_layout import build_layout

    return build_layout(config, layout).largest_stage_elements()


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
                recompute: bool, teacher_config=None, limit: Optional[int] = None, device: str = "ascend",
                clip: bool = True, accumulation: int = 1) -> MemoryPlan:
    """``device="ascend"``: what a buffer-reusing device must hold (the A3 recipes' plan);
    ``device="cpu"``: what MindSpore's CPU graph really holds (``cpu_memory``), single-process
    data-parallel fp32 only, as that is all the CPU runs."""
    check_layout(config, layout, "parallel_config")
    if teacher_config is not None:
        check_layout(teacher_config, layout, "parallel_config (teacher)")
    if device == "cpu":
        return _plan_cpu(config, layout, seq_length=seq_length, micro_batch=micro_batch, recompute=recompute,
                         teacher_config=teacher_config, limit=limit, clip=clip, accumulation=accumulation)
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


def _plan_cpu(config, layout: Layout, *, seq_length: int, micro_batch: int, recompute: bool, teacher_config,
              limit: Optional[int], clip: bool, accumulation: int) -> MemoryPlan:
    from .cpu_memory import step_buffers

    rows = step_buffers(config, stage_parameters(config, Layout()), batch=micro_batch, seq=seq_length,
                        recompute=recompute, gkd=teacher_config is not None, clip=clip, accumulation=accumulation,
                        teacher_config=teacher_config, data_parallel=layout.data_parallel)
    return MemoryPlan(rows, limit, layout, ["device CPU: every op output and gradient of the step graphs is counted "
                                            "(MindSpore's CPU graph does not reuse buffers); fp32 compute"])


def check_layout(config, layout: Layout, where: str) -> None:
    """What MindSpore's shard strategies and pipeline need (``parallel_layout.build_layout``)."""
    from .parallel_layout import build_layout

    build_layout(config, layout, where)


def recipe_layout(recipe) -> Layout:
    pc = recipe.parallel_config
    return Layout(pc["data_parallel"], pc["model_parallel"], pc["pipeline_stage"], pc["optimizer_shard"],
                  pc["micro_batch_num"])


def plan_recipe(recipe, device: Optional[str] = None) -> MemoryPlan:
    """The plan of a validated recipe (the student's and teacher's config.json, or the recipe's
    ``memory_plan`` configs for models that do not exist yet)."""
    device = device or recipe_device(recipe)
    student, teacher = recipe_model_configs(recipe)
    if device == "cpu":  # a layout the CPU cannot run has no CPU plan (after the layout's own checks)
        from .parallel_layout import refuse_on_cpu

        check_layout(student, recipe_layout(recipe), f"recipe {recipe.path}: parallel_config")
        refuse_on_cpu(recipe, "CPU")
    limit_text = recipe.context["max_device_memory"]
    limit = parse_bytes(limit_text, f"recipe {recipe.path}: context.max_device_memory") if limit_text else None
    return plan_memory(student, recipe_layout(recipe), seq_length=recipe.train_dataset["seq_length"],
                       micro_batch=recipe.runner_config["batch_size"], compute_dtype=recipe.model["compute_dtype"],
                       recompute=recipe.recompute, teacher_config=teacher, limit=limit,
                       device=device, clip=recipe.runner_wrapper["use_clip_grad"],
                       accumulation=recipe.runner_config["gradient_accumulation_steps"])


def recipe_device(recipe) -> str:
    """``cpu`` or ``ascend`` from ``context.device_target`` (``auto``: Ascend where MindSpore's
    Ascend runtime is installed, as the trainer decides)."""
    target = recipe.context["device_target"]
    if target == "auto":
        from mindyouzhi.ops.dispatch import device_target

        target = "Ascend" if device_target() == "Ascend" else "CPU"
    return target.lower()


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
