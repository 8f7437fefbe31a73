"""The whole-graph train step as one MindSpore semi-auto parallel graph (Ascend only).

``parallel_layout`` decides how every weight is split; this file puts that on the network with
MindSpore's own API and nothing of our own distributed code:

* ``shard_network``: ``Primitive.shard(in_strategy)`` on the primitives the cells' ``construct``
  calls — every projection's ``MatMul(transpose_b=True)`` and bias ``Add``, the embedding's
  ``Gather``, a tied head's ``MatMul`` (``models/layers.py``; MindFormers shards its ``Linear`` the
  same way).  A parameter's slice follows from the strategy of the operator that reads it, so the
  frozen GKD teacher is split exactly like the student (``Cell.shard(parameter_plan=…)`` would look
  its parameters up through ``trainable_params()`` and drop the frozen ones:
  ``mindspore/parallel/shard.py``, ``Shard._search_parameter_by_name``);
* the teacher is built with the ``teacher.`` name prefix (``CausalLM(name_prefix=…)``), so no
  parameter name is shared with the student and MindSpore never renames them; its parameters are
  held in the compute dtype (bf16 on A3), not fp32;
* ``amp.auto_mixed_precision(…, "auto", dtype)`` (MatMuls in bf16, norms/softmax/exp in fp32; the
  student's Parameters — the master weights — stay fp32), ``Pipeline`` with the layer→stage map,
  ``GradAccumulation`` for accumulation without a pipeline, ``PipelineGradReducer`` with one;
* the step wrapped in ``AutoParallel(…, "sharding_propagation")`` with ``dataset_strategy`` (rows
  over data-parallel only: the ranks of a model-parallel group read the same rows),
  ``hsdp(optimizer_level="level1")`` for ``optimizer_shard`` and ``pipeline(stages, "1f1b")``; the
  strategy file of every parameter (optimizer moments included) is saved for ``train merge``.

MindSpore 2.10 compiles none of this for CPU ("Invalid backend: CPU", docs/training.md), so the
trainer refuses such recipes on CPU; the tests assemble it on CPU and check the primitives,
names, dtypes and strategies.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .parallel_layout import ParallelLayout, build_layout, recipe_layout

TEACHER_PREFIX = "teacher."
DATA_INPUTS = 3  # ids, targets, loss weights


def shard_network(net, plan: ParallelLayout) -> list[tuple[str, str, object]]:
    """Put ``plan``'s strategies on the primitives of ``net`` (a ``CausalLM``); returns (cell name,
    primitive path, primitive) for every primitive that got one."""
    cells = dict(net.cells_and_names())
    applied = []
    for cell_name, strategies in plan.operator_strategies(net.tied).items():
        for path, strategy in strategies.items():
            primitive = cells[cell_name]
            for part in path.split("."):
                primitive = getattr(primitive, part)
            primitive.shard(strategy)
            applied.append((cell_name, path, primitive))
    return applied


def hold_teacher(teacher_net, compute_dtype: str) -> None:
    """Frozen, in the compute dtype (the teacher has no master weights to keep in fp32)."""
    import mindspore as ms

    for param in teacher_net.get_parameters():
        if compute_dtype != "float32":
            param.set_dtype(getattr(ms, compute_dtype))
        param.requires_grad = False


class SemiAutoStep:
    """Forward (the GKD teacher's log-probs computed inside the same graph, sharded like the student),
    backward, gradient reduction (inserted by MindSpore), global-norm clipping and the fused AdamW,
    with the rank's accumulation micro-batches fed at once (``GradAccumulation``, or the pipeline's
    micro-batches); ``recompute_config.recompute`` = ``Cell.recompute()`` on every decoder layer.
    The learning-rate scalars are Parameters set from the host before each call, so the graph's
    inputs are exactly the three data tensors ``dataset_strategy`` describes."""

    def __init__(self, net, config, params, optimizer, recipe, tables, teacher_net=None, teacher_config=None,
                 strategy_file: Optional[Path] = None):
        import mindspore as ms
        from mindspore import Parameter, Tensor, amp, nn, ops
        from mindspore.parallel.auto_parallel import AutoParallel

        from mindyouzhi.models.decoder import RopeTables
        from mindyouzhi.models.layers import to_tensor

        from .steps import _per_token_loss

        layout = recipe_layout(recipe)
        self.plan = plan = build_layout(config, layout)
        compute = recipe.model["compute_dtype"]
        self.sharded = shard_network(net, plan)
        if teacher_net is not None:
            if teacher_net.name_prefix != TEACHER_PREFIX:
                raise ValueError("the GKD teacher must be built with CausalLM(name_prefix='teacher.')")
            self.sharded += shard_network(teacher_net, build_layout(teacher_config, layout,
                                                                    "parallel_config (teacher)"))
            hold_teacher(teacher_net, compute)
        per_token = _per_token_loss(recipe.run_mode, recipe.gkd)
        inverse_temperature = 1.0 / float(recipe.gkd["temperature"])
        clip = recipe.runner_wrapper["max_grad_norm"] if recipe.runner_wrapper["use_clip_grad"] else None
        accumulation = recipe.runner_config["gradient_accumulation_steps"]
        constants = [Parameter(t, name=f"rope_table_{i}", requires_grad=False) for i, t in enumerate(tables)]
        teacher_constants = []
        if teacher_net is not None:  # the teacher's own RoPE tables (its config, not the student's)
            seq = recipe.train_dataset["seq_length"]
            teacher_constants = [Parameter(to_tensor(t), name=f"{TEACHER_PREFIX}rope_table_{i}", requires_grad=False)
                                 for i, t in enumerate(RopeTables(teacher_config)(seq))] + [constants[-1]]
        self.scalars = [Parameter(Tensor(0.0, ms.float32), name=f"optimizer_{name}", requires_grad=False)
                        for name in ("lr", "eps", "decay")]
        if recipe.recompute:
            for layer in net.model.layers:
                layer.recompute()

        class LossCell(nn.Cell):
            def __init__(self):
                super().__init__(auto_prefix=False)  # parameter names stay the checkpoint's / "teacher.…"
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

        loss_cell = LossCell()
        if compute != "float32":
            loss_cell = amp.auto_mixed_precision(loss_cell, "auto", dtype=getattr(ms, compute))
        if plan.pipeline_stage > 1:
            from mindspore.parallel.nn import Pipeline

            loss_cell = Pipeline(loss_cell, plan.micro_batch_num, stage_config=plan.stage_config("student."))
        elif accumulation > 1:
            from mindspore.parallel.nn import GradAccumulation

            loss_cell = GradAccumulation(loss_cell, accumulation)
        grad_fn = ms.value_and_grad(loss_cell, None, params)
        reducer = None
        if plan.pipeline_stage > 1:
            from mindspore.parallel.nn import PipelineGradReducer

            reducer = PipelineGradReducer(ms.ParameterTuple(params))
        scalars = self.scalars

        class TrainStep(nn.Cell):
            def __init__(self):
                super().__init__(auto_prefix=False)
                self.loss_cell = loss_cell
                self.optimizer = optimizer
                self.scalars = ms.ParameterTuple(scalars)
                self.hyper = ops.HyperMap()

            def construct(self, ids, targets, weights):
                loss, grads = grad_fn(ids, targets, weights)
                if reducer is not None:
                    grads = reducer(grads)
                norm = ops.sqrt(ops.addn([(g * g).sum() for g in grads]))
                if clip:
                    grads = self.hyper(ops.partial(ops.mul, ops.minimum(clip / (norm + 1e-6), 1.0)), grads)
                lr, eps, decay = self.scalars
                return ops.depend(loss, self.optimizer(grads, lr, eps, decay)), norm

        self.train_step = TrainStep()
        parallel = AutoParallel(self.train_step, parallel_mode="sharding_propagation")
        parallel.dataset_strategy(plan.dataset_strategy(DATA_INPUTS))
        if strategy_file is not None:  # every parameter's slicing, moments included: `train merge` reads it
            parallel.disable_strategy_file_only_for_trainable_params()
            parallel.save_param_strategy_file(str(strategy_file))
        if plan.optimizer_shard:
            parallel.hsdp(optimizer_level="level1")
        if plan.pipeline_stage > 1:
            parallel.pipeline(stages=plan.pipeline_stage, scheduler="1f1b")
        self.step = parallel

    def run(self, micro_batches, lr, eps, decay, tables):
        """All of this rank's micro-batches in one call (ids, targets, weights concatenated)."""
        import mindspore as ms

        for parameter, value in zip(self.scalars, (lr, eps, decay)):
            parameter.set_data(value)
        batches = list(micro_batches)
        ids, targets, weights = (ms.ops.cat([batch[i] for batch in batches], 0) for i in range(DATA_INPUTS))
        return self.step(ids, targets, weights)
