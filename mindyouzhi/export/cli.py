"""``mindyouzhi export``: thin click wrapper over :func:`mindyouzhi.export.deepseek.export_deepseek_v3`.

Prints the human summary, or exactly one JSON object with ``--json``.  Every refusal is a
``UserError`` (the main group prints ``error: …`` and exits 2).
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from .plan import FORMATS


@click.command("export")
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="converted model directory (mindyouzhi convert, all layers, one --kv-lora-rank)")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="deepseek-v3", show_default=True,
              help="deepseek-v3: Hugging Face DeepseekV3ForCausalLM layout; mindformers: MindFormers mcore names")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="directory to write")
@click.option("--overwrite", is_flag=True, help="replace an existing --out")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of the summary")
def export_cmd(model_dir, fmt, out, overwrite, as_json):
    """Export a converted MLA model as a stock DeepSeek-V3 model (dense MLP; q_lora_rank null unless the source has query biases)."""
    from .deepseek import export_deepseek_v3, summary_text

    summary = export_deepseek_v3(model_dir, out, overwrite=overwrite, fmt=fmt)
    click.echo(json.dumps(summary, ensure_ascii=False) if as_json else summary_text(summary))
