"""Shared checks of the adversarial test modules (tests/test_adversarial_*.py): run the real CLI,
and assert a refusal is exit 2 with one line naming the flag/file, no traceback, nothing written,
and every input byte-identical afterwards."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from click.testing import CliRunner


def run(*args, command=None):
    """The CLI in-process; returns (exit code, stdout + stderr)."""
    if command is None:
        from mindyouzhi.cli import main as command
    result = CliRunner().invoke(command, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        return 1, result.output + "".join(traceback.format_exception(*result.exc_info))
    return result.exit_code, result.output


def snapshot(*paths) -> dict:
    """sha256 of every file under ``paths`` (files or directories; links not followed into)."""
    digests = {}
    for root in map(Path, paths):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            digests[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def assert_refused(code: int, output: str, *words: str) -> str:
    """Exit 2, exactly one ``error:`` line holding every word, no traceback; returns the line."""
    assert code == 2, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def leftovers(directory: Path, name: str) -> list[str]:
    """What a run writing ``directory/name`` may leave next to it: temporaries and its work dir."""
    return sorted(p.name for p in Path(directory).iterdir()
                  if p.name.startswith(f".{name}.") or p.name.startswith(f"{name}.tmp-") or p.name == name)


def damaged_copy(model: Path, target: Path, tensor: str = None, config: dict = None, files: dict = None) -> Path:
    """A copy of ``model`` with one tensor's first value NaN, config keys replaced, or files rewritten."""
    import json
    import shutil

    shutil.copytree(model, target)
    if tensor is not None:
        import numpy as np
        from safetensors.numpy import load_file, save_file

        tensors = load_file(target / "model.safetensors")
        array = tensors[tensor].copy()
        array.reshape(-1)[0] = np.nan
        tensors[tensor] = array
        save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        data = json.loads((target / "config.json").read_text())
        data.update(config)
        (target / "config.json").write_text(json.dumps(data))
    for name, content in (files or {}).items():
        (target / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return target


def unwritable_outs(tmp_path: Path) -> list[tuple[Path, str]]:
    """Places no output can be created: a pseudo file system, a path under a regular file."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cases = [(blocker / "out", "is a file")]
    if os.path.isdir("/proc/self"):
        cases.append((Path("/proc/x/out"), "cannot write"))
    return cases
