"""Per-rank memory plan of a training recipe, checked before anything is loaded.

The plan puts the parallel layout (``parallel_layout``: which weight slices a rank holds) together
with the recipe's dtype, batch and sequence length and hands them to one of two memory models,
chosen by the device (``context.device_target``, or ``train --plan --device``):

* ``ascend`` (``ascend_memory``) — what a buffer-reusing device must hold at the peak of a step
  (the A3 recipes), plus the host RAM of a node while its ranks load the models;
* ``cpu`` (``cpu_memory``) — what MindSpore's CPU graph really holds (every op output and
  gradient, counted op by op from the model code, plus the runtime's working set measured on a
  nano model); checked against measured peaks by ``bench/train_memory.py`` and
  ``tests/test_train_memory.py``.

Imports go one way: ``parallel_layout`` → this plan → the memory models (which import neither).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from mindyouzhi.errors import UserError

from .ascend_memory import host_rows, step_rows
from .cpu_memory import step_buffers
from .parallel_layout import Layout, build_layout, recipe_layout, refuse_on_cpu, stage_parameters

_UNITS = {"": 1, "B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


def parse_bytes(text: str, where: str) -> int:
    """``"58GB"`` → bytes (binary units, as MindSpore's ``max_device_memory`` reads them)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?B?)\s*", str(text).upper())
    if not match:
        raise UserError(f"{where}: expected a size such as \"58GB\", got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2) if match.group(2) != "" else ""])


@dataclass
class MemoryPlan:
    rows: dict  # name → bytes per rank (device)
    limit: Optional[int]
    layout: Layout
    notes: list = field(default_factory=list)
    host: dict = field(default_factory=dict)  # name → bytes of host RAM (Ascend: while the models load)

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    @property
    def fits(self) -> bool:
        return self.limit is None or self.total <= self.limit

    def to_dict(self) -> dict:
        return {"rows": dict(self.rows), "total": self.total, "limit": self.limit, "fits": self.fits,
                "layout": vars(self.layout), "notes": list(self.notes), "host": dict(self.host)}

    def table(self) -> str:
        width = max(len(name) for name in self.rows)
        lines = [f"  {name:<{width}}  {gib(value):>10}" for name, value in self.rows.items()]
        lines.append(f"  {'total per rank':<{width}}  {gib(self.total):>10}"
                     + (f"  of {gib(self.limit)} max_device_memory" if self.limit else ""))
        if self.host:
            lines.append("  host RAM while the models load:")
            lines += [f"    {name}: {gib(value)}" for name, value in self.host.items()]
        return "\n".join(lines)


def gib(value: int) -> str:
    return f"{value / (1 << 30):.2f} GiB"


def plan_memory(config, layout: Layout, *, seq_length: int, micro_batch: int, compute_dtype: str = "float32",
                recompute: bool, teacher_config=None, limit: Optional[int] = None, device: str = "ascend",
                clip: bool = True, accumulation: int = 1, local_ranks: int = 16) -> MemoryPlan:
    """``device="ascend"``: what a buffer-reusing device must hold (the A3 recipes' plan);
    ``device="cpu"``: what MindSpore's CPU graph really holds (``cpu_memory``), single-process
    data-parallel fp32 only, as that is all the CPU runs.  ``local_ranks``: ranks per node (the
    host-RAM rows; 16 NPUs per A3 node)."""
    check_layout(config, layout, "parallel_config")
    if teacher_config is not None:
        check_layout(teacher_config, layout, "parallel_config (teacher)")
    if device == "cpu":
        return _plan_cpu(config, layout, seq_length=seq_length, micro_batch=micro_batch, recompute=recompute,
                         teacher_config=teacher_config, limit=limit, clip=clip, accumulation=accumulation)
    teacher_params = stage_parameters(teacher_config, layout) if teacher_config is not None else 0
    rows = step_rows(config, layout, stage_parameters(config, layout), seq_length=seq_length,
                     micro_batch=micro_batch, compute_dtype=compute_dtype, recompute=recompute,
                     accumulation=accumulation, teacher_config=teacher_config, teacher_params=teacher_params)
    full = stage_parameters(config, Layout())
    teacher_full = stage_parameters(teacher_config, Layout()) if teacher_config is not None else 0
    notes = []
    if compute_dtype == "float32":
        notes.append("fp32 compute: the weights are the master weights")
    return MemoryPlan(rows, limit, layout, notes, host_rows(full, teacher_full, min(layout.world, local_ranks)))


def _plan_cpu(config, layout: Layout, *, seq_length: int, micro_batch: int, recompute: bool, teacher_config,
              limit: Optional[int], clip: bool, accumulation: int) -> MemoryPlan:
    teacher_params = stage_parameters(teacher_config, Layout()) if teacher_config is not None else 0
    rows = step_buffers(config, stage_parameters(config, Layout()), batch=micro_batch, seq=seq_length,
                        recompute=recompute, gkd=teacher_config is not None, clip=clip, accumulation=accumulation,
                        teacher_config=teacher_config, teacher_parameters=teacher_params,
                        data_parallel=layout.data_parallel)
    return MemoryPlan(rows, limit, layout, ["device CPU: every op output and gradient of the step graphs is counted "
                                            "(MindSpore's CPU graph does not reuse buffers); fp32 compute"])


def check_layout(config, layout: Layout, where: str) -> None:
    """What MindSpore's shard strategies and pipeline need (``parallel_layout.build_layout``)."""
    build_layout(config, layout, where)


def plan_recipe(recipe, device: Optional[str] = None) -> MemoryPlan:
    """The plan of a validated recipe (the student's and teacher's config.json, or the recipe's
    ``memory_plan`` configs for models that do not exist yet)."""
    device = device or recipe_device(recipe)
    student, teacher = recipe_model_configs(recipe)
    if device == "cpu":  # a layout the CPU cannot run has no CPU plan (after the layout's own checks)
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
