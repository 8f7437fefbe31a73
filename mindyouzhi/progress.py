"""Progress bars on stderr (stdout stays clean for --json), switched on and off by one rule everywhere.

The rule, first match wins: ``MINDYOUZHI_NO_PROGRESS=1`` in the environment (CI and the bench
scripts set it) → off; the running command's ``--progress/--no-progress`` → as given; otherwise
bars are drawn only when stderr is a terminal, so logs and pipes never fill with carriage returns.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, Optional

# What --progress/--no-progress said for the command running now (None: not given, or no command).
# A module global rather than a parameter because the bars are drawn deep inside library code
# (the conversion pipeline, the trainer, the scorers) that the CLI flag should reach unchanged.
_command_choice: Optional[bool] = None


def progress_enabled(explicit: Optional[bool] = None) -> bool:
    """The rule above; ``explicit`` is a caller's own on/off, which only the environment overrides."""
    if os.environ.get("MINDYOUZHI_NO_PROGRESS") == "1":
        return False
    if explicit is not None:
        return explicit
    if _command_choice is not None:
        return _command_choice
    return sys.stderr.isatty()


@contextlib.contextmanager
def progress_choice(choice: Optional[bool]) -> Iterator[None]:
    """The value of ``--progress/--no-progress`` for the duration of one command."""
    global _command_choice
    previous, _command_choice = _command_choice, choice
    try:
        yield
    finally:
        _command_choice = previous


def progress_bar(total: Optional[int], desc: str, unit: str = "it", enabled: Optional[bool] = None, **kwargs):
    """A tqdm bar on stderr, drawn when :func:`progress_enabled` says so."""
    from tqdm import tqdm  # tqdm costs ~20 ms: `mindyouzhi --help` should not pay for it

    kwargs.setdefault("unit_scale", unit in ("tok", "B"))
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False,
                disable=not progress_enabled(enabled), **kwargs)
