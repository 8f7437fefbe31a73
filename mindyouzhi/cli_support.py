"""Shared click plumbing: the group class every command group uses and the ``--json`` output rule."""
from __future__ import annotations

import json
import sys

import click

from mindyouzhi.errors import UserError


class UserErrorGroup(click.Group):
    """Turns a ``UserError`` raised anywhere below into one line on stderr and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)


def emit(payload: dict, as_json: bool, human: str) -> None:
    """Exactly one JSON object on stdout with ``--json``, else the human summary."""
    click.echo(json.dumps(payload, ensure_ascii=False) if as_json else human)
