"""``mindyouzhi train --config recipes/FILE.yaml``: GKD or SFT as the recipe says.

The same command runs under ``msrun`` for data parallel (``recipes/launch.sh``); only rank 0
prints, logs and writes checkpoints.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from mindyouzhi.errors import UserError


@click.command("train")
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path),
              help="recipe YAML (MindFormers layout, see recipes/)")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="continue from the latest checkpoint in output_dir, if there is one")
@click.option("--json", "as_json", is_flag=True, help="print the run summary as one JSON object")
def train_cmd(config_path, resume, as_json):
    """Post-training: GKD from the original model, or SFT on instruction data."""
    from .config import load_recipe
    from .trainer import train

    try:
        recipe = load_recipe(config_path)
        summary = train(recipe, resume=resume)
    except UserError as exc:  # also when run outside the main group (msrun workers, python -m)
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    if summary.get("rank", 0) != 0:
        return
    if as_json:
        click.echo(json.dumps(summary, ensure_ascii=False))
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
    click.echo("\n".join(lines))


def main() -> None:  # ``python -m mindyouzhi.train.cli --config …`` (what msrun can launch directly)
    train_cmd()


if __name__ == "__main__":
    main()
