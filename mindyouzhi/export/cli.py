"""``mindyouzhi export``: thin click wrapper over :func:`mindyouzhi.export.deepseek.export_deepseek_v3`.

Prints the human summary, or exactly one JSON object with ``--json``.  Every refusal is a
``UserError`` (the main group prints ``error: …`` and exits 2).
"""
from __future__ import annotations

from pathlib import Path

import click

from ..cli_support import emit, json_option, overwrite_option
from . import FORMATS


@click.command("export")
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="converted model directory (mindyouzhi convert, all layers, one --kv-lora-rank)")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="deepseek-v3", show_default=True,
              help="deepseek-v3: Hugging Face DeepseekV3ForCausalLM layout; mindformers: MindFormers mcore names")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="directory to write")
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False, path_type=Path),
              help="mindformers only: an SFT recipe; also write finetune_mindformers.yaml (MindFormers' trainer) from it")
@overwrite_option
@json_option
def export_cmd(model_dir, fmt, out, recipe_path, overwrite, as_json):
    """Export a converted MLA model as a stock DeepSeek-V3 model (dense MLP; q_lora_rank null unless the source has query biases)."""
    from mindyouzhi.paths import check_outputs

    from .deepseek import export_deepseek_v3, summary_text

    check_outputs({"--out": out}, {"--model": model_dir, "--recipe": recipe_path}, overwrite, directories={"--out"})
    recipe = _mindformers_recipe(recipe_path, fmt)  # refused before anything is written
    summary = export_deepseek_v3(model_dir, out, overwrite=overwrite, fmt=fmt)
    if recipe is not None:
        from .mindformers import write_mindformers_yaml

        summary["mindformers_yaml"] = str(write_mindformers_yaml(recipe, out))
    human = summary_text(summary)
    if recipe is not None:
        human += f"\n  MindFormers fine-tuning YAML: {summary['mindformers_yaml']}"
    emit(summary, as_json, human)


def _mindformers_recipe(recipe_path, fmt):
    if recipe_path is None:
        return None
    from mindyouzhi.errors import UserError
    from mindyouzhi.train.config import load_recipe

    from .mindformers import check_recipe_for_mindformers

    if fmt != "mindformers":
        raise UserError(f"--recipe {recipe_path}: only with --format mindformers (it writes MindFormers' YAML)")
    if not Path(recipe_path).is_file():
        raise UserError(f"--recipe {recipe_path}: recipe file not found")
    recipe = load_recipe(recipe_path, check_paths=False)
    check_recipe_for_mindformers(recipe)
    return recipe
