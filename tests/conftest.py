"""Shared test fixtures.

Tests that read the real data and models of the workplace's ``shared/`` folder are marked
``shared``.  They *fail* when the folder is missing (CI sets ``MINDYOUZHI_SHARED``); a user who
does not have it deselects them with ``-m "not shared"``.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    config.addinivalue_line("markers", "shared: needs the shared/ data and models (MINDYOUZHI_SHARED)")
    config.addinivalue_line("markers", "slow: takes more than ~20 s; still part of the default run")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    root = Path(os.environ.get("MINDYOUZHI_SHARED", REPO.parent / "shared")).resolve()
    if not (root / "README.md").is_file():
        pytest.fail(f"shared data folder not found at {root}: set MINDYOUZHI_SHARED or deselect with -m 'not shared'")
    return root


@pytest.fixture(autouse=True)
def _run_in_tmp_cwd(tmp_path, monkeypatch):
    """MindSpore writes files into the CWD (graph dumps, kernel_meta): keep them out of the repo."""
    monkeypatch.chdir(tmp_path)
