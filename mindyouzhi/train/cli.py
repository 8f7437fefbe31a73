"""``mindyouzhi train --config recipes/FILE.yaml``: GKD or SFT as the recipe says.

The same command runs under ``msrun`` for data parallel (``recipes/launch.sh``); only rank 0
prints and logs; with several workers every rank writes its shard of each checkpoint, and
``mindyouzhi train merge`` turns a checkpoint into one model directory.
"""
from __future__ import annotations

from pathlib import Path

import click

from mindyouzhi.cli_support import emit, exit_on_user_error, json_option, overwrite_option, progress_option


@click.group("train", invoke_without_command=True)
@click.option("--config", "config_path", type=click.Path(path_type=Path),
              help="recipe YAML (MindFormers layout, see recipes/); required unless a subcommand is given")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="continue from the latest checkpoint in output_dir, if there is one")
@click.option("--plan", "plan_only", is_flag=True,
              help="print the per-rank memory plan and exit (2 if it exceeds context.max_device_memory)")
@click.option("--device", "plan_device", type=click.Choice(["cpu", "ascend"]), default=None,
              help="with --plan: plan for this device instead of the recipe's context.device_target")
@click.option("--dry-run", "dry_run_rank", type=int, default=None, is_flag=False, flag_value=0,
              help="Ascend host: compile the step for this rank [0] with MindSpore's DryRun (MS_SIMULATION_LEVEL=1, "
                   "the recipe's world size) and print its compiled memory next to the plan; needs the CANN runtime")
@progress_option
@json_option
@click.pass_context
def train_cmd(ctx, config_path, resume, plan_only, plan_device, dry_run_rank, as_json):
    """Post-training: GKD from the original model, or SFT on instruction data."""
    from .config import load_recipe
    from .trainer import train

    if ctx.invoked_subcommand is not None:
        return
    if config_path is None:
        with exit_on_user_error():
            from mindyouzhi.errors import UserError

            raise UserError("--config: a recipe is required (or a subcommand: merge)")
    if dry_run_rank is not None:
        from .dry_run import dry_run

        with exit_on_user_error():
            report = dry_run(config_path, dry_run_rank)
        emit(report, as_json, report["text"])
        return
    if plan_only:
        _print_plan(config_path, as_json, plan_device)
        return
    if plan_device is not None:
        with exit_on_user_error():
            from mindyouzhi.errors import UserError

            raise UserError("--device: only with --plan (a run uses the recipe's context.device_target)")
    with exit_on_user_error():  # also when run outside the main group (msrun workers, python -m)
        recipe = load_recipe(config_path)
        summary = train(recipe, resume=resume)
    if summary.get("rank", 0) != 0:
        return
    lines = [f"{summary['run_mode']} → {summary.get('final_model')}",
             f"  steps {summary['start_step']}→{summary['total_steps']} (global batch {summary['global_batch']} × "
             f"{summary['seq_length']} tokens, {summary['world_size']} worker(s))"]
    if summary["first_loss"] is not None:
        lines.append(f"  loss {summary['first_loss']:.4f} → {summary['final_loss']:.4f}")
    if summary["tokens_per_second"]:
        lines.append(f"  {summary['tokens_per_second']:.0f} tokens/s after compilation "
                     f"({summary['compile_and_first_step_seconds']:.1f} s for the first step)")
    if summary.get("eval"):
        lines.append(f"  eval ppl {summary['eval']['ppl']:.4f} over {summary['eval']['windows']} windows")
    lines.append(f"  log {summary['log']}, curves {summary['plot']}")
    emit(summary, as_json, "\n".join(lines))


def _print_plan(config_path: Path, as_json: bool, device) -> None:
    """The plan needs no model weights or data: the models may not exist yet (``memory_plan``)."""
    from .config import load_recipe
    from .memory import plan_recipe, recipe_device, refuse_if_too_big

    with exit_on_user_error():
        recipe = load_recipe(config_path, check_paths=False)
        device = device or recipe_device(recipe)
        plan = plan_recipe(recipe, device)
        layout = plan.layout
        emit({"recipe": str(config_path), "device": device, **plan.to_dict()}, as_json,
             f"{recipe.path}: per-rank memory on {device}, {layout.world} workers (dp {layout.data_parallel} × mp "
             f"{layout.model_parallel} × pp {layout.pipeline_stage}, optimizer_shard "
             f"{str(layout.optimizer_shard).lower()}), {recipe.model['compute_dtype']}, "
             f"{recipe.runner_config['batch_size']} × {recipe.train_dataset['seq_length']} tokens per micro-batch\n"
             + plan.table())
        refuse_if_too_big(recipe, plan)


@train_cmd.command("merge")
@click.option("--checkpoint", "checkpoint", required=True, type=click.Path(path_type=Path),
              help="a checkpoint-NNNNNN directory (per-rank shards of a multi-worker run, or a single process's)")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="the model directory to write")
@overwrite_option
@json_option
def merge_cmd(checkpoint, out, overwrite, as_json):
    """One Hugging Face model directory from a training checkpoint (its shards merged)."""
    from mindyouzhi.paths import check_outputs

    from .checkpoint import merge_checkpoint

    with exit_on_user_error():
        check_outputs({"--out": out}, {"--checkpoint": checkpoint}, overwrite, directories={"--out"})
        merge_checkpoint(checkpoint, out, overwrite)
    emit({"checkpoint": str(checkpoint), "out": str(out)}, as_json, f"merged {checkpoint} → {out}")


def main() -> None:  # ``python -m mindyouzhi.train.cli --config …`` (what msrun can launch directly)
    train_cmd()


if __name__ == "__main__":
    main()
