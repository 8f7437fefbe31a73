"""``mindyouzhi train`` killed (SIGKILL) at every awkward moment, then resumed, ends exactly where an
uninterrupted run ends: the same final weights and the same loss log, with nothing stale left in
``output_dir``.

One chain of real ``train`` processes per objective (GKD, SFT), each resuming what the previous one
left and each killed (SIGKILL) at a different point:

1. during the first steps, before any checkpoint exists (the rerun starts over);
2. right after a checkpoint is published (the rerun resumes from it and rewrites the log lines the
   killed process had appended after it);
3. halfway through writing a checkpoint — GKD: checkpoint 8 (its temporary directory is abandoned;
   the rerun resumes from checkpoint 4); SFT: ``final/`` (the rerun finds the checkpoint of the last
   step, runs no step and writes ``final/`` again).

Point 3 uses the ``MINDYOUZHI_TEST_PAUSE_MID_WRITE`` hook (``train/checkpoint.py``), which holds the
writer between the weights and the state file so the kill lands mid-write every time.  The last
rerun runs in this process.  (On-policy GKD steps are left out: each costs ~20 s of generation
here; their draws are functions of the seed and the step like everything else.)
"""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mindyouzhi.train.checkpoint import PAUSE_MID_WRITE_ENV
from mindyouzhi.train.config import load_recipe
from mindyouzhi.train.trainer import train
from test_train_fixtures import final_weights, log_records, shared_models, venv_env, write_recipe

STEPS, SAVE_EVERY = 10, 4  # checkpoints at 4, 8 and 10 (the last step)
WAIT = 300  # seconds any one stage may take on a loaded machine


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return shared_models(tmp_path_factory)


def _recipe(tmp_path, models, mode: str, name: str):
    if mode == "gkd":
        sections = {"model": {"student": str(models["student"]), "teacher": str(models["teacher"])},
                    "train_dataset": {"sources": [{"path": str(models["sft"]), "max_samples": 24}]}}
    else:
        sections = {"run_mode": "sft", "model": {"student": str(models["student"])},
                    "train_dataset": {"sources": [{"path": str(models["sft"]), "max_samples": 24}], "packing": True,
                                      "seq_length": 48}}
    return write_recipe(tmp_path / f"{name}.yaml", output_dir=str(tmp_path / name), seed=5,
                        runner_config={"max_steps": STEPS, "save_steps": SAVE_EVERY, "batch_size": 2},
                        optimizer={"weight_decay": 0.01}, **sections)


def _start(recipe, pause_in=None):
    env = venv_env()
    env.pop(PAUSE_MID_WRITE_ENV, None)
    if pause_in:
        env[PAUSE_MID_WRITE_ENV] = pause_in
    return subprocess.Popen([sys.executable, "-m", "mindyouzhi.train.cli", "--config", str(recipe)], env=env,
                            cwd=recipe.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_when(process, condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert process.poll() is None, f"train exited ({process.returncode}) before {what}: " \
                                       f"{process.stderr.read().decode()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {WAIT} s"
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-3000:]


def _mid_write(out, name: str):
    """True once ``name``'s temporary directory holds the weights (the writer is paused after them)."""
    return lambda: any((tmp / "model.safetensors").is_file() for tmp in out.glob(f".{name}.tmp-*"))


def _logged_steps(out) -> int:
    path = out / "train_log.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


@pytest.mark.parametrize("mode", ["gkd", "sft"])
def test_kill_at_any_point_and_resume_reproduces_the_uninterrupted_run(tmp_path, models, mode):
    reference = train(load_recipe(_recipe(tmp_path, models, mode, "straight")), show_progress=False)
    assert reference["steps_run"] == STEPS

    recipe = _recipe(tmp_path, models, mode, "killed")
    out = tmp_path / "killed"
    checkpoint = lambda step: out / f"checkpoint-{step:06d}"  # noqa: E731

    # 1. during the first steps: a step logged, no checkpoint yet
    _kill_when(_start(recipe), lambda: _logged_steps(out) >= 1, "first logged step")
    assert not list(out.glob("checkpoint-*")) and _logged_steps(out) < SAVE_EVERY

    # 2. right after checkpoint 4 is published
    _kill_when(_start(recipe), checkpoint(SAVE_EVERY).is_dir, "checkpoint 4")

    # 3. halfway through writing a checkpoint
    pause_in = checkpoint(2 * SAVE_EVERY).name if mode == "gkd" else "final"
    _kill_when(_start(recipe, pause_in=pause_in), _mid_write(out, pause_in), f"{pause_in} mid-write")
    assert list(out.glob(f".{pause_in}.tmp-*")) and not (out / pause_in).exists()

    resumed = train(load_recipe(recipe), show_progress=False)
    assert resumed["start_step"] == (SAVE_EVERY if mode == "gkd" else STEPS)

    want, got = final_weights(tmp_path / "straight"), final_weights(out)
    assert sorted(want) == sorted(got)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-7, rtol=0, err_msg=name)
    curve, replayed = log_records(tmp_path / "straight"), log_records(out)
    assert [r["step"] for r in replayed] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm", "lr"):
        np.testing.assert_allclose([r[key] for r in replayed], [r[key] for r in curve], rtol=1e-6, atol=0,
                                   err_msg=key)
    for key in ("loss_tokens", "on_policy"):
        assert [r.get(key) for r in replayed] == [r.get(key) for r in curve], key

    # nothing a kill interrupted is left behind, and only the newest checkpoints are kept
    leftovers = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert leftovers == [], leftovers
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [checkpoint(8).name, checkpoint(STEPS).name]
