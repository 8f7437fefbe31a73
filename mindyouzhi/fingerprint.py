"""Fingerprints of cached artefacts: a cache is reused only for the inputs that made it.

A resumable job keeps artefacts between runs (the calibration statistics and the search state of
``convert`` in its work directory; the generated calibration text in ``~/.cache``).  Each one has a
fingerprint: a JSON object of *everything* that changes its content — the model's identity, the
data file's path and sha256, the token budget, window length, sampling, text field, seed, forward
precision, … — recorded next to it in ``<artefact>.fingerprint.json``.  :func:`reuse_or_reset`
compares the recorded fingerprint with the current run's: equal → the artefact is reused; any
difference (or no record at all) → the artefact is removed and rebuilt, and one line on stderr
says which inputs changed.  A stale artefact is never reused.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Optional

SUFFIX = ".fingerprint.json"


def canonical(fingerprint: dict) -> dict:
    """The fingerprint as JSON will give it back (tuples → lists, paths → strings, keys sorted)."""
    return json.loads(json.dumps(fingerprint, sort_keys=True, default=str))


def digest(fingerprint: dict) -> str:
    """A short stable hash of a fingerprint (to nest one artefact's identity in another's)."""
    return hashlib.sha256(json.dumps(canonical(fingerprint), sort_keys=True).encode()).hexdigest()


def changes(recorded: Optional[dict], current: dict) -> list[str]:
    """``key old → new`` for every differing entry (``[]`` when equal)."""
    current = canonical(current)
    if recorded is None:
        return ["no record of the inputs that made it"]
    out = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key, "unset"), current.get(key, "unset")
        if old != new:
            out.append(f"{key} {_short(old)} → {_short(new)}")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:16] + "…" + text[-8:]


def record_path(artefact: Path) -> Path:
    return artefact.with_name(artefact.name + SUFFIX)


def read_record(artefact: Path) -> Optional[dict]:
    try:
        data = json.loads(record_path(artefact).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def reuse_or_reset(artefact: str | os.PathLike, fingerprint: dict, what: str,
                   say: Optional[Callable[[str], None]] = None) -> bool:
    """Keep ``artefact`` (a file or directory) if it was made from ``fingerprint``; otherwise
    remove it, say so in one line, and record ``fingerprint`` for the artefact about to be built.

    Returns True when an existing artefact is reused.  The record is written before the artefact
    is (re)built, so the parts of a killed build (each written atomically) are reused by the next
    run with the same inputs."""
    from .io_utils import write_json_atomic

    artefact = Path(artefact)
    say = say or (lambda message: print(message, file=sys.stderr))
    exists = artefact.exists() or artefact.is_symlink()
    recorded = read_record(artefact)
    different = changes(recorded, fingerprint)
    if exists and not different:
        return True
    if exists:
        say(f"note: {what} in {artefact} came from other inputs ({'; '.join(different)}); rebuilding it")
        if artefact.is_dir() and not artefact.is_symlink():
            shutil.rmtree(artefact)
        else:
            artefact.unlink()
    if recorded != canonical(fingerprint):
        write_json_atomic(record_path(artefact), canonical(fingerprint))
    return False


def matches(recorded: Optional[dict], fingerprint: dict) -> bool:
    """Whether ``recorded`` holds every entry of ``fingerprint`` with the same value (extra
    entries of ``recorded`` are descriptive, e.g. a generated text's row count)."""
    if not isinstance(recorded, dict):
        return False
    current = canonical(fingerprint)
    return all(recorded.get(key) == value for key, value in current.items())
