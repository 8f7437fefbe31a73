"""The training loop shared by GKD and SFT.

One optimizer step = one global batch (``batch_size × gradient_accumulation_steps × workers``
examples).  The loss weights of a micro-batch are its loss-token mask divided by the number of
loss tokens of the *whole global batch*, so the summed gradients of all micro-batches on all ranks
are exactly the gradient of the global per-token mean — a 2-worker ``msrun`` run and a single
process with twice the accumulation take the same step.

The hot path is jitted (``ms.jit``) and compiled once, because every batch has the same shape
(``steps.py``: the whole model as one graph, or layer by layer with recomputation for models whose
whole-graph backward does not fit in CPU memory).

The learning rate (``schedule.CosineWithWarmUp``), AdamW's bias-correction scalars, the data
order and the on-policy draws are all functions of the step number, and the checkpoint stores the
step with the weights and moments, so a run resumed after a kill replays exactly the remaining
steps of the uninterrupted run.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from mindyouzhi.errors import UserError

from . import checkpoint as ckpt
from .config import Recipe
from .data import BatchPlan, TrainData, attention_mask, build_dataset, collate
from .distributed import WorldInfo, all_reduce_sum, barrier, init_world
from .memory import plan_recipe, refuse_if_too_big
from .parallel_layout import check_semi_auto_recipe, data_parallel_rank, needs_semi_auto, refuse_on_cpu
from .schedule import CosineWithWarmUp
from .steps import as_tensors, build_step

LOG_FILE = "train_log.jsonl"
PLOT_FILE = "train_curves.png"
SUMMARY_FILE = "train_summary.json"
STRATEGY_DIR = ".strategy"  # each rank's MindSpore strategy file (semi-auto parallel)


def setup_device(context: dict) -> str:
    import mindspore as ms

    target = context["device_target"]
    if target == "auto":  # MindSpore's own default: Ascend where its Ascend runtime is installed
        target = "Ascend" if ms.get_context("device_target") == "Ascend" else "CPU"
    try:
        if target == "Ascend":
            device_id = context["device_id"] if context["device_id"] is not None else int(os.environ.get("DEVICE_ID", "0"))
            ms.set_device("Ascend", device_id)
            if context.get("max_device_memory"):
                ms.set_context(max_device_memory=context["max_device_memory"])
        else:
            ms.set_device("CPU")
    except RuntimeError:  # the runtime is already up (an earlier run in this process): fine if it is ours
        if ms.get_context("device_target") != target:
            raise UserError(f"context.device_target {target}: this process already runs MindSpore on "
                            f"{ms.get_context('device_target')}") from None
    return target


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    loss_tokens: int
    on_policy: bool


class Trainer:
    def __init__(self, recipe: Recipe, resume: bool = True, show_progress: bool = True,
                 echo: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True)):
        self.recipe = recipe
        self.resume = resume
        self.show_progress = show_progress
        self.echo = echo
        self.where = f"recipe {recipe.path}"

    # -- set-up ------------------------------------------------------------------------------------
    def _check_world(self, world: WorldInfo) -> None:
        wanted = self.recipe.workers
        if wanted != world.size:
            how = "msrun started" if world.size > 1 else "this is a single process with"
            raise UserError(f"{self.where}: parallel_config data_parallel × model_parallel × pipeline_stage is "
                            f"{wanted} but {how} {world.size} worker(s); run under `msrun --worker_num={wanted}` "
                            f"(recipes/launch.sh) or change parallel_config")

    def _isolated_packing(self, config) -> bool:
        """``packed_attention: isolated``: refused where a mask could not reach every attention."""
        section, where = self.recipe.train_dataset, self.where
        if section["packed_attention"] != "isolated":
            return False
        if not section["packing"]:
            raise UserError(f"{where}: train_dataset.packed_attention: isolated needs train_dataset.packing: true")
        if self.recipe.run_mode == "gkd":
            raise UserError(f"{where}: train_dataset.packed_attention: isolated is for SFT; the GKD teacher reads "
                            f"the packed window as one sequence (use packing: false for GKD)")
        gqa_layers = [i for i in range(config.num_hidden_layers) if not config.is_mla(i)]
        if gqa_layers and not self.recipe.recompute:
            raise UserError(f"{where}: train_dataset.packed_attention: isolated with GQA layers ({gqa_layers[0]}, …) "
                            f"needs recompute_config.recompute: true (the whole-graph step has one mask layout)")
        return True

    def _resume_point(self, world: WorldInfo) -> Optional[Path]:
        out = self.recipe.output_dir
        latest = ckpt.latest_checkpoint(out)
        if latest is None or self.resume:
            return latest
        if not self.recipe.runner_config["overwrite_output"]:
            raise UserError(f"{self.where}: output_dir {out} already has checkpoints (latest {latest.name}); run with "
                            f"--resume to continue, or set runner_config.overwrite_output: true to start over")
        if world.is_main:
            for path in ckpt.list_checkpoints(out):
                shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(out / ckpt.FINAL_DIR, ignore_errors=True)
        barrier(world)
        return None

    def _trainable(self, net):
        params = net.trainable_params()
        if self.recipe.model["trainable"] == "attention":
            for param in params:
                if ".self_attn." not in param.name:
                    param.requires_grad = False
            params = [p for p in params if ".self_attn." in p.name]
        return params

    # -- the run -------------------------------------------------------------------------------------
    def run(self) -> dict:
        from mindyouzhi.convert_weights.safetensors_io import SafetensorsStore
        from mindyouzhi.models.balance import BalancedStore
        from mindyouzhi.models.config import ModelConfig
        from mindyouzhi.models.decoder import CausalLM, RopeTables
        from mindyouzhi.models.layers import causal_mask, to_tensor
        from mindyouzhi.tokenizer import load_tokenizer

        from .gkd import Teacher, check_same_vocabulary
        from .optim import AdamW

        recipe, rc = self.recipe, self.recipe.runner_config
        started = time.perf_counter()
        refuse_if_too_big(recipe, plan_recipe(recipe))  # on CPU also refuses what needs Ascend
        sharded = bool(needs_semi_auto(recipe))
        if sharded:
            check_semi_auto_recipe(recipe)
        isolated = self._isolated_packing(ModelConfig.from_dir(recipe.student))
        device = setup_device(recipe.context)
        refuse_on_cpu(recipe, device)
        world = init_world()
        self._check_world(world)
        # which rows this rank reads: under semi-auto parallel the ranks of one model-parallel group share them
        pc = recipe.parallel_config
        data = WorldInfo(data_parallel_rank(world.rank, pc["data_parallel"], pc["model_parallel"]),
                         pc["data_parallel"], world.backend) if sharded else world
        out = recipe.output_dir
        if world.is_main:
            out.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temporaries(out)
        resume_from = self._resume_point(world)

        student_config = ModelConfig.from_dir(recipe.student)
        tokenizer = load_tokenizer(recipe.student)
        if recipe.run_mode == "gkd":
            teacher_config = ModelConfig.from_dir(recipe.teacher)
            check_same_vocabulary(recipe.teacher, teacher_config, load_tokenizer(recipe.teacher), recipe.student,
                                  student_config, tokenizer)
            if recipe.gkd["lmbda"] > 0 and recipe.train_dataset["packing"]:
                raise UserError(f"{self.where}: gkd.lmbda > 0 (on-policy sampling) needs unpacked examples; "
                                f"set train_dataset.packing: false")
        seq_length = recipe.train_dataset["seq_length"]
        dataset = build_dataset(tokenizer, recipe.sources, seq_length, recipe.train_dataset["packing"], self.where)
        batch_size, accumulation = rc["batch_size"], rc["gradient_accumulation_steps"]
        global_batch = recipe.global_batch(data.size)
        plan = BatchPlan(len(dataset), global_batch, rc["epochs"], rc["max_steps"], recipe.seed,
                         recipe.train_dataset["shuffle"], self.where)
        schedule = CosineWithWarmUp.from_recipe(recipe.lr_schedule, plan.total_steps)
        fingerprint, data_fingerprint = recipe.training_fingerprint(), dataset.fingerprint()

        start_step, tokens_seen, previous_seconds = 0, 0, 0.0
        model_dir = recipe.student
        if resume_from is not None:
            state = ckpt.read_state(resume_from)
            if state.get("recipe_fingerprint") != fingerprint or state.get("data_fingerprint") != data_fingerprint:
                raise UserError(f"{self.where}: {resume_from} was written by a different recipe or data (batch "
                                f"layout, data, objective, schedule or worker count changed); use another output_dir "
                                f"or run with --no-resume and runner_config.overwrite_output: true")
            start_step = int(state["step"])
            tokens_seen = int(state.get("loss_tokens_seen", 0))
            previous_seconds = float(state.get("train_seconds", 0.0))
            model_dir = resume_from
        log_path = out / LOG_FILE
        if world.is_main:
            _truncate_log(log_path, start_step)

        config = ModelConfig.from_dir(model_dir)
        moments = None
        if resume_from is not None and ckpt.is_sharded(resume_from):  # several workers wrote it: per-rank shards
            weights, moments = ckpt.read_checkpoint(resume_from, config)
            net = CausalLM(config, weights, where=str(resume_from))
        else:
            # a fresh run balances the MLA factor scales (exact; AdamW's per-entry step needs it), a
            # resumed one reads its own checkpoint, already balanced, as saved
            store = SafetensorsStore(model_dir)
            if resume_from is None and recipe.model["balance_mla"]:
                store = BalancedStore(store, config)
            net = CausalLM(config, store, where=str(model_dir))
        params = self._trainable(net)
        opt_section = recipe.optimizer
        optimizer = AdamW(params, tuple(opt_section["betas"]), opt_section["eps"], opt_section["weight_decay"])
        if moments is not None:
            optimizer.load_state_arrays(moments, str(resume_from))
        elif resume_from is not None:
            ckpt.load_optimizer_state(resume_from, optimizer)
        tables = tuple(to_tensor(t) for t in RopeTables(config)(seq_length)) + (to_tensor(causal_mask(seq_length)),)
        teacher = None
        strategy_file = None
        if sharded:  # the teacher runs inside the student's parallel graph, sharded like it
            from .semi_auto import TEACHER_PREFIX, SemiAutoStep

            teacher_net = None
            if recipe.run_mode == "gkd":
                teacher_net = CausalLM(teacher_config, SafetensorsStore(recipe.teacher), where=str(recipe.teacher),
                                       name_prefix=TEACHER_PREFIX)
            strategy_file = out / STRATEGY_DIR / f"rank_{world.rank}.ckpt"
            strategy_file.parent.mkdir(parents=True, exist_ok=True)
            steps = SemiAutoStep(net, config, params, optimizer, recipe, tables, teacher_net,
                                 teacher_config if recipe.run_mode == "gkd" else None, strategy_file)
        else:
            steps = build_step(net, config, params, optimizer, recipe, world.size)
            teacher = Teacher(recipe.teacher, recipe.gkd["temperature"], steps.precision["projections"]) \
                if recipe.run_mode == "gkd" else None
        no_teacher = to_tensor(np.zeros((1,), np.float32))
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        # the projections' precision (steps.build_step); the semi-auto step: its amp compute dtype
        precision = getattr(steps, "precision", {"compute_dtype": recipe.model["compute_dtype"]})

        if world.is_main:
            self.echo(f"{recipe.run_mode}: {len(dataset)} examples × {seq_length} tokens, global batch {global_batch} "
                      f"({data.size} data-parallel worker(s) × {accumulation} × {batch_size}), steps "
                      f"{start_step}→{plan.total_steps}"
                      f" on {device}, {_describe_precision(precision)}"
                      + (f", resuming from {resume_from.name}" if resume_from else ""))
        bar = None
        if world.is_main and self.show_progress:
            from mindyouzhi.progress import progress_bar

            bar = progress_bar(plan.total_steps, f"train {recipe.run_mode}", "step", initial=start_step)

        def state_for(step: int, seconds: float) -> dict:
            return {"step": step, "total_steps": plan.total_steps, "epoch": step / plan.steps_per_epoch,
                    "examples_consumed": step * global_batch, "global_batch": global_batch, "world_size": world.size,
                    "recipe_fingerprint": fingerprint, "data_fingerprint": data_fingerprint,
                    "loss_tokens_seen": tokens_seen, "train_seconds": seconds, "run_mode": recipe.run_mode,
                    "student_source": str(recipe.student), "teacher": str(recipe.teacher) if recipe.teacher else None}

        tokens_per_step = global_batch * seq_length
        step_seconds: list[float] = []
        first_loss = last_loss = None
        save_steps = rc["save_steps"]
        for step in range(start_step, plan.total_steps):
            began = time.perf_counter()
            result = self._step(step, plan, dataset, data, batch_size, steps, optimizer, schedule, teacher, tables,
                                no_teacher, pad_id, net, config, tokenizer, seq_length, isolated)
            seconds = time.perf_counter() - began
            step_seconds.append(seconds)
            tokens_seen += result.loss_tokens
            first_loss = result.loss if first_loss is None else first_loss
            last_loss = result.loss
            done = step + 1
            if world.is_main:
                record = {"step": done, "epoch": round(done / plan.steps_per_epoch, 4), "loss": result.loss,
                          "lr": schedule(step), "grad_norm": result.grad_norm, "tokens": tokens_per_step,
                          "loss_tokens": result.loss_tokens, "tokens_per_second": tokens_per_step / seconds,
                          "step_seconds": seconds, "elapsed_seconds": previous_seconds + sum(step_seconds)}
                if recipe.run_mode == "gkd":
                    record["on_policy"] = result.on_policy
                if done % rc["log_steps"] == 0 or done == plan.total_steps:
                    with open(log_path, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps(record) + "\n")
                if bar is not None:
                    bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{record['lr']:.2e}",
                                    tok_s=f"{record['tokens_per_second']:.0f}")
                    bar.update(1)
            if (save_steps and done % save_steps == 0) or done == plan.total_steps:
                state = state_for(done, previous_seconds + sum(step_seconds))
                if world.size == 1:
                    ckpt.save_checkpoint(out, done, net, config, optimizer, state, recipe.student,
                                         rc["keep_checkpoints"])
                else:  # every rank writes its own shard; rank 0 publishes the checkpoint once all have
                    if sharded:
                        ckpt.write_sliced_shard(out, done, world.rank, steps.step)
                    else:
                        ckpt.write_rank_shard(out, done, world.rank, world.size, net, optimizer)
                    barrier(world)
                    if world.is_main:
                        ckpt.publish_checkpoint(out, done, world.size, config, state, recipe.student,
                                                rc["keep_checkpoints"], _strategy(out, strategy_file, recipe))
                if world.is_main:
                    _plot(out, recipe)
        if bar is not None:
            bar.close()

        final_weights = None  # a sharded run's rank holds slices: rank 0 reads the final checkpoint's shards
        if sharded and world.is_main:
            final_weights = ckpt.read_checkpoint(out / ckpt.checkpoint_name(plan.total_steps), config)[0]
        summary = {"run_mode": recipe.run_mode, "output_dir": str(out), "device": device, "world_size": world.size,
                   "rank": world.rank, "examples": len(dataset), "data": dataset.stats, "seq_length": seq_length,
                   "global_batch": global_batch, "total_steps": plan.total_steps, "start_step": start_step,
                   "resumed_from": str(resume_from) if resume_from else None, "steps_run": len(step_seconds),
                   "first_loss": first_loss, "final_loss": last_loss,
                   "compile_and_first_step_seconds": step_seconds[0] if step_seconds else None,
                   "tokens_per_second": _steady_rate(step_seconds, tokens_per_step),
                   "train_seconds": previous_seconds + sum(step_seconds),
                   "wall_seconds": time.perf_counter() - started, "precision": precision,
                   "weights_sha256": weights_digest(net, final_weights) if world.is_main or not sharded else None}
        if not world.is_main:  # lets a user (and the tests) check that every rank ends with the same weights
            from mindyouzhi.io_utils import write_json_atomic

            write_json_atomic(out / f"worker_{world.rank}.json", {k: summary[k] for k in
                                                                  ("rank", "final_loss", "weights_sha256")})
        if world.is_main:
            final = ckpt.save_final(out, net, config, state_for(plan.total_steps, summary["train_seconds"]),
                                    recipe.student, final_weights)
            summary["final_model"] = str(final)
            summary["log"] = str(log_path)
            summary["plot"] = str(out / PLOT_FILE)
            _plot(out, recipe)
            if recipe.eval_dataset:
                summary["eval"] = _evaluate(final, recipe.eval_dataset)
            from mindyouzhi.io_utils import write_json_atomic

            write_json_atomic(out / SUMMARY_FILE, summary)
        barrier(world)
        return summary

    def _step(self, step, plan: BatchPlan, data: TrainData, world: WorldInfo, batch_size, steps, optimizer,
              schedule, teacher, tables, no_teacher, pad_id, net, config, tokenizer, seq_length,
              isolated: bool = False) -> StepResult:
        """``world``: this rank's data-parallel position (under semi-auto parallel, its slice's)."""
        from mindyouzhi.models.layers import to_tensor

        from .gkd import is_on_policy_step, on_policy_examples, student_runner

        recipe = self.recipe
        micro = [[data.examples[i] for i in indices]
                 for indices in plan.micro_batches(step, world.rank, world.size, batch_size)]
        on_policy = recipe.run_mode == "gkd" and is_on_policy_step(recipe.gkd["lmbda"], recipe.seed, step)
        if on_policy:
            runner = student_runner(net, config, tokenizer)
            stop = tuple(t for t in (tokenizer.eos_token_id,) if t is not None)
            micro = [on_policy_examples(runner, examples, seq_length, recipe.gkd, recipe.seed, step * 1000 + m, stop)
                     for m, examples in enumerate(micro)]
            count = all_reduce_sum(sum(e.loss_tokens for examples in micro for e in examples), world)
        else:
            count = sum(data.examples[i].loss_tokens for i in plan.global_indices(step))

        def batches():  # lazily: one micro-batch's teacher log-probs [B, T, V] alive at a time
            for examples in micro:
                batch = collate(examples, seq_length, pad_id)
                weights = batch.mask.astype(np.float32) / np.float32(count)
                teacher_logprobs = teacher.logprobs(batch.ids) if teacher is not None else no_teacher
                if isolated:
                    masks = (to_tensor(attention_mask(batch.segments)),
                             to_tensor(attention_mask(batch.segments, grouped=True)))
                    yield (*as_tensors(batch.ids, batch.targets, weights), teacher_logprobs, masks)
                else:
                    yield (*as_tensors(batch.ids, batch.targets, weights), teacher_logprobs)

        lr, eps, decay = optimizer.scalars(step + 1, schedule(step))
        loss, norm = steps.run(batches(), lr, eps, decay, tables)
        return StepResult(float(loss.asnumpy()), float(norm.asnumpy()), int(count), on_policy)


def weights_digest(net, arrays: Optional[dict] = None) -> str:
    """sha256 over every parameter (name and bytes), in name order."""
    import hashlib

    arrays = arrays if arrays is not None else {name: param.asnumpy() for name, param in net.parameters_and_names()}
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return digest.hexdigest()


def _describe_precision(precision: dict) -> str:
    if "projections" not in precision:
        return f"compute dtype {precision['compute_dtype']}"
    note = f" ({precision['fallback_reason']})" if precision["fallback_reason"] else ""
    return f"{precision['projections']} projections{note}"


def _strategy(out: Path, strategy_file: Optional[Path], recipe: Recipe) -> Optional[Path]:
    """The strategy file a sharded checkpoint keeps: rank 0's (every stage's merged with pipelining)."""
    if strategy_file is None:
        return None
    if recipe.parallel_config["pipeline_stage"] == 1:
        return strategy_file
    import mindspore as ms

    merged = out / f"{STRATEGY_DIR}-merged.ckpt"
    ms.parallel.merge_pipeline_strategys(str(out / STRATEGY_DIR), str(merged))
    return merged


def _steady_rate(step_seconds: list[float], tokens_per_step: int) -> Optional[float]:
    """Tokens/s over the steps after the first (which includes graph compilation)."""
    steady = step_seconds[1:] or step_seconds
    return tokens_per_step * len(steady) / sum(steady) if steady and sum(steady) > 0 else None


def _truncate_log(log_path: Path, step: int) -> None:
    """Keep the log lines up to ``step`` (a resumed run rewrites what came after its checkpoint)."""
    from .plots import read_log

    kept = [r for r in read_log(log_path) if r.get("step", 0) <= step]
    if not kept:
        log_path.unlink(missing_ok=True)
        return
    tmp = log_path.with_name(f".{log_path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    tmp.replace(log_path)


def _plot(out: Path, recipe: Recipe) -> None:
    from .plots import plot_training

    plot_training(out / LOG_FILE, out / PLOT_FILE, f"{recipe.run_mode}: {recipe.path.name}")


def _evaluate(model_dir: Path, section: dict) -> dict:
    from mindyouzhi.eval.ppl import perplexity, token_stream, windows
    from mindyouzhi.models.runner import ModelRunner

    runner = ModelRunner.from_dir(model_dir)
    data = windows(token_stream(runner.tokenizer, section["path"], "eval_dataset.path"), section["seq_length"],
                   section["max_windows"], section["path"], "eval_dataset.path")
    return perplexity(runner, data).to_dict()


def train(recipe: Recipe, resume: bool = True, show_progress: bool = True) -> dict:
    return Trainer(recipe, resume, show_progress).run()
