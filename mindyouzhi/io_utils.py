"""Small I/O helpers shared by every command: atomic outputs, hashes, JSON."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_output_dir(out: str | os.PathLike, overwrite: bool, flag: str = "--out") -> Path:
    """Refuse an existing output (unless ``overwrite``) before any work starts."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{flag} {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} exists and is not a directory")
    return out


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False, flag: str = "--out") -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to ``out`` only if the block succeeds.

    Nothing half-written is ever visible at ``out``: on any exception the temporary directory is
    removed and a pre-existing ``out`` is left untouched.
    """
    out = check_output_dir(out, overwrite, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publishable(tmp)
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / "old")
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _publishable(directory: Path) -> None:
    """mkdtemp (and some writers) create owner-only entries; give the published tree the
    permissions any ordinary file or directory gets under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


LOCK_NAME = "lock"


@contextlib.contextmanager
def locked_work_dir(work: str | os.PathLike, out: str | os.PathLike, restart: bool = False) -> Iterator[Path]:
    """Hold ``work`` (a resumable job's state directory) for this process alone.

    Two jobs writing the same ``--out`` would share and delete each other's state; the second one
    is refused instead.  The lock is ``flock`` on ``work/lock`` (released by the kernel if the
    process dies, so a killed job never leaves a stale lock).  ``restart`` empties the directory
    once the lock is held.
    """
    import fcntl

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    fd = os.open(work / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"--out {out}: another run is writing it (its state directory {work} is locked); "
                        f"wait for that run to finish or choose another --out") from None
    try:
        if restart:
            for entry in work.iterdir():
                if entry.name != LOCK_NAME:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        yield work
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write next to ``path`` then rename, so a kill never leaves a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: invalid {what} ({exc})") from None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process: VmHWM of its own address space where Linux has it
    (``ru_maxrss`` survives ``execve``, so a process started by a large one would report its
    parent's peak), else ``ru_maxrss``."""
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * (1 if sys.platform == "darwin" else 1024)
