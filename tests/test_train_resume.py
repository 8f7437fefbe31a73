"""A run killed (SIGKILL) after a checkpoint and resumed ends with the uninterrupted run's weights
and loss curve."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mindyouzhi.errors import UserError
from mindyouzhi.train.config import load_recipe
from mindyouzhi.train.trainer import train
from test_train_fixtures import shared_models, final_weights, log_records, venv_env, write_recipe


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return shared_models(tmp_path_factory)


def _recipe(tmp_path, models, name):
    return write_recipe(tmp_path / f"{name}.yaml", output_dir=str(tmp_path / name),
                        model={"student": str(models["student"]), "teacher": str(models["teacher"])},
                        train_dataset={"sources": [{"path": str(models["text"]), "max_samples": 40},
                                                   {"path": str(models["sft"]), "max_samples": 20}],
                                       "seq_length": 32},
                        runner_config={"max_steps": 16, "save_steps": 4, "batch_size": 2},
                        optimizer={"weight_decay": 0.01})


def test_resume_after_kill_reproduces_the_uninterrupted_run(tmp_path, models):
    reference = train(load_recipe(_recipe(tmp_path, models, "straight")), show_progress=False)
    assert reference["steps_run"] == 16

    killed_recipe = _recipe(tmp_path, models, "killed")
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "mindyouzhi.train.cli", "--config", str(killed_recipe)],
                               env=venv_env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (out / "checkpoint-000008").is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    assert not (out / "final").exists()

    resumed = train(load_recipe(killed_recipe), show_progress=False)
    assert resumed["resumed_from"] is not None and resumed["start_step"] >= 8
    assert resumed["steps_run"] == 16 - resumed["start_step"]
    want, got = final_weights(tmp_path / "straight"), final_weights(out)
    assert sorted(want) == sorted(got)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-6, rtol=0, err_msg=name)
    curve, replayed = log_records(tmp_path / "straight"), log_records(out)
    assert [r["step"] for r in replayed] == list(range(1, 17))
    np.testing.assert_allclose([r["loss"] for r in replayed], [r["loss"] for r in curve], rtol=1e-5)
    np.testing.assert_allclose([r["lr"] for r in replayed], [r["lr"] for r in curve], rtol=1e-12)

    # --no-resume refuses to silently discard the checkpoints
    with pytest.raises(UserError, match="already has checkpoints .* --resume"):
        train(load_recipe(killed_recipe), resume=False, show_progress=False)
