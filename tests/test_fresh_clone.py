"""A fresh clone without shared/: shared-data tests skip with one line outside CI and fail under CI=true."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")
NEEDS_SHARED = """
import pytest

@pytest.mark.shared
def test_reads_wikitext(shared_dir):
    assert (shared_dir / "data").is_dir()
"""


@pytest.mark.parametrize("ci, exit_code, outcome", [("", 0, "1 skipped"), ("true", 1, "1 error")])
def test_missing_shared_folder(tmp_path, ci, exit_code, outcome):
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_needs_shared.py").write_text(NEEDS_SHARED)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(MINDYOUZHI_SHARED=str(tmp_path / "no-shared"), CI=ci)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == exit_code, result.stdout + result.stderr
    assert outcome in result.stdout
    reason = [line for line in result.stdout.splitlines() if f"shared data folder not found at {tmp_path}" in line]
    assert reason and "MINDYOUZHI_SHARED=/path/to/shared" in reason[-1], result.stdout
