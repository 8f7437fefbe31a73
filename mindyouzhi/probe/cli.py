"""``mindyouzhi probe compare``: which layer does the student (converted / trained) differ at?"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from mindyouzhi.cli_support import UserErrorGroup, emit, json_option
from mindyouzhi.errors import UserError


@click.group("probe", cls=UserErrorGroup)
def probe():
    """Precision checks with msprobe (pip install 'mindyouzhi[probe]')."""


@probe.command("compare")
@click.option("--teacher", required=True, type=click.Path(path_type=Path), help="reference model dir (golden side)")
@click.option("--student", required=True, type=click.Path(path_type=Path), help="model dir to check (target side)")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="text file; the first window is probed")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="directory for dumps, msprobe CSVs and probe_report.json (default: ./probe_compare)")
@click.option("--seq-len", default=128, show_default=True, help="tokens per probed window")
@click.option("--samples", default=1, show_default=True, help="windows to probe (one batch)")
@click.option("--keep-dumps", is_flag=True, help="keep msprobe's dump directories")
@json_option
def compare(teacher, student, data, out, seq_len, samples, keep_dumps, as_json):
    """Dump both models with msprobe and compare them layer by layer (cosine / error of the attention
    outputs, chained and with every layer fed the teacher's input)."""
    from mindyouzhi.paths import check_outputs

    from .compare import compare_models, format_report, require_msprobe

    check_outputs({"--out": out or Path("probe_compare")}, {"--teacher": teacher, "--student": student, "--data": data},
                  overwrite=True, directories={"--out"})
    try:
        require_msprobe()
        for flag, path in (("--teacher", teacher), ("--student", student)):
            if not (path / "config.json").is_file():
                raise UserError(f"{flag} {path}: not a model directory (no config.json)")
        if not data.is_file():
            raise UserError(f"--data {data}: file not found")
        if seq_len < 2 or samples < 1:
            raise UserError("--seq-len must be at least 2 and --samples at least 1")
        report = compare_models(teacher, student, data, out or Path("probe_compare"), seq_len, samples, keep_dumps)
    except RuntimeError as exc:  # msprobe itself failed: its log is named in the message
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    emit(report, as_json, format_report(report))
