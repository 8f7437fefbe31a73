"""Shared click plumbing: the error-reporting group, the output rule and the options every command
spells the same way (``--json``, ``--progress/--no-progress``, ``--overwrite``, ``--kv-lora-rank``,
renamed flags).

This module is imported by ``mindyouzhi --help``: it must stay free of heavy imports.
"""
from __future__ import annotations

import contextlib
import functools
import json
import sys
from typing import Callable, Iterator, Union

import click

from mindyouzhi.errors import UserError
from mindyouzhi.progress import progress_choice

JSON_HELP = "Print exactly one JSON object on stdout instead of the human summary."
PROGRESS_HELP = ("Progress bars on stderr [default: on when stderr is a terminal; "
                 "MINDYOUZHI_NO_PROGRESS=1 always turns them off].")
OVERWRITE_HELP = "Replace an existing --out or --report (never replaced without this flag)."
# Default window length of search and evaluation (the served context); a model with a shorter
# context gets its own length instead, with a one-line notice (an explicit longer value is refused).
DEFAULT_WINDOW = 2048


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """A ``UserError`` becomes one line on stderr and exit code 2 — never a traceback."""
    try:
        yield
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)


class UserErrorGroup(click.Group):
    """A group whose subcommands report ``UserError`` by :func:`exit_on_user_error`."""

    def invoke(self, ctx):
        with exit_on_user_error():
            return super().invoke(ctx)


def emit(payload: dict, as_json: bool, human: str) -> None:
    """Exactly one JSON object on stdout with ``--json``, else the human summary."""
    click.echo(json.dumps(payload, ensure_ascii=False) if as_json else human)


def json_option(function: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help=JSON_HELP)(function)


def overwrite_option(function: Callable) -> Callable:
    return click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)(function)


FORWARD_PRECISION_HELP = ("Matrix products of the model's forwards (scoring and generation): bf16 (bfloat16 inputs, fp32 "
                          "accumulation; norms, softmax and log-softmax fp32), fp32, or auto = bf16 on CPUs with native "
                          "bf16 dot products; the JSON says which ran.")


def forward_precision_option(function: Callable) -> Callable:
    """``--forward-precision auto|bf16|fp32`` of the commands that run a model (resolved by
    ``eval.lm.resolve_precision``); ``convert`` has its own, about the conversion's passes."""
    return click.option("--forward-precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto",
                        show_default=True, help=FORWARD_PRECISION_HELP)(function)


def progress_option(function: Callable) -> Callable:
    """``--progress/--no-progress``; the choice reaches every ``progress_bar`` the command draws."""

    @click.option("--progress/--no-progress", "progress", default=None, help=PROGRESS_HELP)
    @functools.wraps(function)
    def wrapper(*args, progress, **kwargs):
        with progress_choice(progress):
            return function(*args, **kwargs)

    return wrapper


class RenamedOption(click.Option):
    """The old spelling of a renamed option: hidden, still accepted for one release, with a warning."""

    def __init__(self, old: str, new: str, **kwargs):
        super().__init__([old, f"{old.lstrip('-').replace('-', '_')}__renamed"], hidden=True, default=None, **kwargs)
        self.old, self.new = old, new


def renamed_option(old: str, new: str, param: str, **option_kwargs) -> Callable[[Callable], Callable]:
    """Accept ``old`` as a hidden alias of the option ``new`` (whose parameter is ``param``)."""

    def decorate(function: Callable) -> Callable:
        alias = RenamedOption(old, new, **option_kwargs)

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            value = kwargs.pop(alias.name)
            if value is not None:
                source = click.get_current_context().get_parameter_source(param)
                if source is click.core.ParameterSource.COMMANDLINE:
                    raise UserError(f"{old} is the old name of {new}: pass only {new}")
                click.echo(f"warning: {old} is now {new}; the old name goes away in the next release", err=True)
                kwargs[param] = value
            return function(*args, **kwargs)

        wrapper.__click_params__ = [*getattr(function, "__click_params__", []), alias]
        return wrapper

    return decorate


def renamed_options(command: click.Command) -> list[RenamedOption]:
    return [param for param in command.params if isinstance(param, RenamedOption)]


def walk_commands(command: click.Command, path: tuple[str, ...] = ("mindyouzhi",)) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    """Every command and group below ``command`` (itself first), with the words that invoke it."""
    yield path, command
    if isinstance(command, click.Group):
        for name in sorted(command.commands):
            yield from walk_commands(command.commands[name], path + (name,))


class KvLoraRank(click.ParamType):
    """A latent width: a positive integer, or ``full`` for no truncation (the model decides the number)."""

    name = "K|full"

    def convert(self, value, param, ctx) -> Union[int, str]:
        if isinstance(value, int) or value == "full":
            return value
        text = str(value).strip().lower()
        if text == "full":
            return "full"
        try:
            rank = int(text)
        except ValueError:
            rank = 0
        if rank < 1:
            self.fail(f"{value!r}: expected a positive integer or 'full'", param, ctx)
        return rank


KV_LORA_RANK = KvLoraRank()
