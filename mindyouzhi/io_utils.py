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
from typing import Any, Iterator, Optional

from .errors import UserError


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_output_dir(out: str | os.PathLike, overwrite: bool, flag: str = "--out") -> Path:
    """Refuse an existing output (unless ``overwrite``), a dangling link and an unwritable place,
    before any work starts (the relations to the inputs: :func:`mindyouzhi.paths.check_outputs`)."""
    from .paths import check_writable

    out = Path(out)
    check_writable(out, flag)
    if out.exists() and not overwrite:
        raise UserError(f"{flag} {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} exists and is not a directory")
    return out


def _hold(path: Path) -> int:
    """An exclusive ``flock`` on ``path`` (a file or directory) for as long as the returned fd is open."""
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove the temporaries a killed writer of ``target`` left next to it (``.NAME.tmp-XXXXXXXX``
    directories of :func:`atomic_output_dir`, ``NAME.tmp-XXXXXXXX`` files of the JSONL writer: the
    exact names ``tempfile`` makes), skipping any that a live writer still holds (``flock``)."""
    import fcntl
    import re

    target = Path(target)
    if not target.parent.is_dir():
        return []
    made = re.compile(rf"\.?{re.escape(target.name)}\.tmp-[a-z0-9_]{{8}}")
    removed = []
    for leftover in target.parent.glob(f"*{target.name}.tmp-*"):
        if leftover.is_symlink() or not made.fullmatch(leftover.name):
            continue
        if leftover.name.startswith(".") != leftover.is_dir():  # dirs are .NAME.tmp-*, files NAME.tmp-*
            continue
        try:
            fd = os.open(leftover, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a run in progress
        finally:
            os.close(fd)
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False, flag: str = "--out") -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to ``out`` only if the block succeeds.

    Nothing half-written is ever visible at ``out``: on any exception the temporary directory is
    removed and a pre-existing ``out`` is left untouched.  The temporary directory is held with
    ``flock`` while the block runs; temporaries of ``out`` that nobody holds (a killed run's) are
    removed first.
    """
    out = check_output_dir(out, overwrite, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    held = _hold(tmp)
    try:
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
    finally:
        os.close(held)


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


def state_dir(work: str | os.PathLike, out: str | os.PathLike, named: bool) -> Path:
    """Where a resumable job keeps its state: the default work dir itself (``.OUT.work``, created
    by the job), or one subdirectory of a work dir the user named (``--work-dir``), which holds
    nothing else of ours and is never emptied or removed."""
    work = Path(work)
    if not named:
        return work
    import hashlib

    tag = hashlib.sha256(str(Path(os.path.abspath(out))).encode()).hexdigest()[:8]
    return work / f"mindyouzhi-{Path(out).name}-{tag}.state"


def _resumable(state: Path) -> bool:
    """Whether ``state`` holds anything a rerun could reuse (not just the lock and fingerprints)."""
    from .fingerprint import SUFFIX

    return any(path.is_file() and path.name != LOCK_NAME and not path.name.endswith(SUFFIX)
               for path in state.rglob("*"))


@contextlib.contextmanager
def locked_work_dir(work: str | os.PathLike, out: str | os.PathLike, restart: bool = False, named: bool = False,
                    remove_on_success: bool = False, scratch: tuple[str, ...] = ()) -> Iterator[Path]:
    """Hold a resumable job's state directory for this process alone and yield it.

    Two jobs writing the same ``--out`` would share and delete each other's state; the second one
    is refused instead.  The lock is ``flock`` on ``STATE/lock`` (released by the kernel if the
    process dies, so a killed job never leaves a stale lock).  ``named``: ``work`` is the user's
    (``--work-dir``): the state lives in one subdirectory of it (:func:`state_dir`) and nothing
    else in it is touched.  ``restart`` empties the state directory once the lock is held.  On
    success with ``remove_on_success`` the state directory is removed; on an error it is kept
    only when it holds resumable state (the lock file alone is removed with it).  ``scratch`` names
    entries rebuilt by every run (never resumed from): removed when the lock is taken and when the
    run ends.
    """
    import fcntl

    state = state_dir(work, out, named)
    state.mkdir(parents=True, exist_ok=True)
    fd = os.open(state / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"--out {out}: another run is writing it (its state directory {state} is locked); "
                        f"wait for that run to finish or choose another --out") from None
    try:
        for entry in state.iterdir():
            if entry.name != LOCK_NAME and (restart or entry.name in scratch):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        try:
            yield state
        except BaseException:
            for name in scratch:
                shutil.rmtree(state / name, ignore_errors=True)
            if not _resumable(state):
                shutil.rmtree(state, ignore_errors=True)  # nothing to resume: no trace of the run
            raise
        if remove_on_success:
            shutil.rmtree(state, ignore_errors=True)
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


def read_yaml(path: str | os.PathLike, flag: str, what: str = "YAML file") -> Any:
    """A YAML document; a missing, unreadable or malformed file is one line naming ``flag`` and the path."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: {what} not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{flag} {path}: {what} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{flag} {path}: invalid YAML ({' '.join(str(exc).split())[:200]})") from None


def _proc_kib(path: str, field: str) -> Optional[int]:
    """A ``Field:  N kB`` line of a Linux /proc file, in bytes (None elsewhere)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process: VmHWM of its own address space where Linux has it
    (``ru_maxrss`` survives ``execve``, so a process started by a large one would report its
    parent's peak), else ``ru_maxrss``."""
    import resource

    peak = _proc_kib("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * (1 if sys.platform == "darwin" else 1024)


def available_memory_bytes() -> Optional[int]:
    """MemAvailable of the machine (Linux), else None."""
    return _proc_kib("/proc/meminfo", "MemAvailable")
