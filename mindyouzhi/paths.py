"""Output safety: every path a command writes, checked against every path it reads, before any work.

One rule for every command that writes (docs/design.md, "Output safety"):

* an output is never one of the inputs, never a directory holding an input (replacing it would
  delete the input) and never inside an input directory (a model dir stays as it was);
* symbolic links are resolved first (``--out`` a link to the model dir is the model dir), and an
  output that is a dangling link is refused (its rename would fail after the whole job);
* an existing output is refused without ``--overwrite`` (and a file where a directory is expected,
  or the reverse, even with it);
* the place the output will be created must be writable *now*: the nearest existing ancestor is
  probed by creating (and removing) an empty directory in it, which catches a path under a
  regular file, read-only and pseudo file systems (``/proc``) before any hour of work;
* two outputs of one command never overlap (``--report`` equal to ``--out``);
* a work directory the user names (``--work-dir``) is neither an input, nor inside one, nor the
  output or inside it.

Values that are not paths (``generate:N`` text sources, ``None``) are skipped.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Collection, Mapping, Optional, Union

from .errors import UserError

PathValue = Union[str, os.PathLike, None]
GENERATED_PREFIX = "generate:"


def _as_path(value: PathValue) -> Optional[Path]:
    if value is None or str(value) == "" or str(value).startswith(GENERATED_PREFIX):
        return None
    return Path(value)


def resolved(path: Union[str, os.PathLike]) -> Path:
    """Absolute path with every symbolic link of its existing part resolved (``realpath``)."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_writable(path: Union[str, os.PathLike], flag: str) -> None:
    """Refuse ``path`` (to be created, file or directory) when its parent cannot be created/written."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise UserError(f"{flag} {path}: a symbolic link to {os.readlink(path)}, which does not exist; "
                        "remove the link or point it at an existing directory")
    ancestor = resolved(path).parent
    while not ancestor.exists():
        if ancestor.is_symlink():  # a dangling link on the way
            raise UserError(f"{flag} {path}: {ancestor} is a symbolic link to a missing place")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{flag} {path}: {ancestor} is a file, not a directory")
    try:
        probe = tempfile.mkdtemp(prefix=".mindyouzhi-write-check-", dir=ancestor)
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot write in {ancestor} ({exc.strerror or exc})") from None
    shutil.rmtree(probe, ignore_errors=True)


def check_outputs(outputs: Mapping[str, PathValue], inputs: Mapping[str, PathValue] = {}, overwrite: bool = False,
                  directories: Collection[str] = ()) -> None:
    """Validate every output (flag → path) against every input (flag → path) and each other.

    ``directories`` names the output flags that are directories (the others are files)."""
    checked: dict[str, Path] = {}
    for flag, value in outputs.items():
        path = _as_path(value)
        if path is None:
            continue
        check_writable(path, flag)
        real = resolved(path)
        for in_flag, in_value in inputs.items():
            source = _as_path(in_value)
            if source is not None:
                _refuse_overlap(flag, path, real, in_flag, source, "input")
        for other_flag, other in checked.items():
            if _within(real, other) or _within(other, real):
                raise UserError(f"{flag} {path} and {other_flag} {outputs[other_flag]} are the same place or one "
                                "holds the other; give them separate paths")
        checked[flag] = real
        if path.exists():
            if not overwrite:
                raise UserError(f"{flag} {path} already exists; pass --overwrite to replace it")
            if flag in directories and not path.is_dir():
                raise UserError(f"{flag} {path} exists and is not a directory")
            if flag not in directories and path.is_dir():
                raise UserError(f"{flag} {path} is a directory; expected a file path")


def _refuse_overlap(flag: str, path: Path, real: Path, in_flag: str, source: Path, role: str) -> None:
    source_real = resolved(source)
    if real == source_real:
        raise UserError(f"{flag} {path} is {in_flag} {source} (the same place): an {role} is never replaced; "
                        "choose another path")
    if source_real in real.parents and source_real.is_dir():
        raise UserError(f"{flag} {path} is inside {in_flag} {source}: an {role} directory is never written into; "
                        "choose a path outside it")
    if real in source_real.parents:
        raise UserError(f"{flag} {path} holds {in_flag} {source}: replacing it would delete the {role}; "
                        "choose another path")


def check_work_dir(work: PathValue, out: PathValue, inputs: Mapping[str, PathValue] = {},
                   flag: str = "--work-dir") -> None:
    """A user-named work directory: writable, not an input (or inside one), not ``out`` (or inside it)."""
    work_path = _as_path(work)
    if work_path is None:
        return
    if work_path.exists() and not work_path.is_dir():
        raise UserError(f"{flag} {work_path} exists and is not a directory")
    if not work_path.exists():
        check_writable(work_path, flag)
    real = resolved(work_path)
    for in_flag, value in inputs.items():
        source = _as_path(value)
        if source is None:
            continue
        source_real = resolved(source)
        if real == source_real or (source_real in real.parents and source_real.is_dir()):
            raise UserError(f"{flag} {work_path} is {in_flag} {source} or inside it: the run's state never goes "
                            "into an input; choose a separate directory")
    out_path = _as_path(out)
    if out_path is not None and _within(real, resolved(out_path)):
        raise UserError(f"{flag} {work_path} is --out {out_path} or inside it: the output replaces that place; "
                        "choose a separate directory")
