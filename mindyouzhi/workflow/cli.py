"""``mindyouzhi pipeline``: the whole YouZhi run from one recipe."""
from __future__ import annotations

from pathlib import Path

import click

from mindyouzhi.cli_support import emit, json_option, overwrite_option


@click.command("pipeline")
@click.option("--recipe", "recipe_path", required=True, type=click.Path(path_type=Path),
              help="pipeline recipe YAML (recipes/youzhi_*.yaml)")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="run directory: every stage's models, data, logs and tables; re-run to resume")
@click.option("--until", default=None, help="stop after this stage (convert, data, annotate, gkd, sft, eval-…, tables)")
@overwrite_option
@json_option
def pipeline_cmd(recipe_path, out, until, overwrite, as_json):
    """Convert → finance data → teacher annotation → GKD → SFT → eval → export → capacity → tables."""
    from .recipe import load_pipeline_recipe
    from .run import run_pipeline

    recipe = load_pipeline_recipe(recipe_path)
    log = (lambda line: click.echo(line, err=True)) if as_json else click.echo
    report = run_pipeline(recipe, out, until, log=log, overwrite=overwrite)
    tables = report.get("tables", {}).get("tables")
    emit(report, as_json, f"pipeline → {out}" + (f"\n  tables: {tables}" if tables else ""))
