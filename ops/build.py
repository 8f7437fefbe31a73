"""Building the AOT C++ CPU kernels of ``mindyouzhi.ops`` on first use.

A kernel's C++ source ships as package data and is compiled with g++ into a per-user cache
(``$MINDYOUZHI_CACHE_DIR``, else ``$XDG_CACHE_HOME/mindyouzhi``, else ``~/.cache/mindyouzhi``),
under a name keyed by the source, the flags, the compiler and the CPU's feature flags: a changed
kernel or a different machine never picks up a stale library, and concurrent first uses are safe
(each builds into a temporary file that is renamed into place).
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

from mindyouzhi.errors import UserError


class KernelBuildError(UserError):
    """A CPU kernel could not be built (no compiler, a missing library, or the compiler failed)."""


def cache_dir() -> Path:
    root = os.environ.get("MINDYOUZHI_CACHE_DIR")
    if root:
        return Path(root) / "ops"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mindyouzhi" / "ops"


def compiler(purpose: str) -> str:
    """The C++ compiler (``$CXX``, else g++); ``purpose`` completes the error message's advice."""
    found = os.environ.get("CXX") or shutil.which("g++")
    if not found or not shutil.which(found):
        raise KernelBuildError(f"g++ not found: {purpose}")
    return found


def cpu_flags() -> str:
    """-march=native code depends on the CPU: its feature flags are part of the cache key."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return line.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def shared_library(source: Path, name: str, flags: Sequence[str], purpose: str, libraries: Sequence[str] = ()) -> Path:
    """Path of ``source`` compiled with ``flags`` (and linked with ``libraries``, flags that go after
    the source) into the cache, building it if it is not there."""
    cxx = compiler(purpose)
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(b"\0".join([source.read_bytes(), " ".join([*flags, *libraries]).encode(), version.encode(),
                                     cpu_flags().encode(), platform.machine().encode()])).hexdigest()[:16]
    target = cache_dir() / f"{name}-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([cxx, *flags, "-o", tmp, str(source), *libraries],
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise KernelBuildError(f"building {source.name} with {cxx} failed: {result.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
