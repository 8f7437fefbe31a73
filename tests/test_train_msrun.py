"""Data parallel through msrun on CPU: 2 workers end with identical weights, equal to a single
process over the same global batch (2 micro-batches of accumulation)."""
import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mindyouzhi.train.config import load_recipe
from mindyouzhi.train.trainer import train
from test_train_fixtures import shared_models, final_weights, log_records, venv_env, write_recipe


LAUNCH = Path(__file__).resolve().parents[1] / "recipes" / "launch.sh"


def _kill_tree(process: subprocess.Popen) -> None:
    """msrun, its scheduler and its workers (which run in sessions of their own)."""
    import psutil

    if process.poll() is not None:
        return
    try:
        family = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    os.killpg(process.pid, signal.SIGKILL)
    for child in family:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("recompute", [False, True], ids=["whole-graph", "layerwise"])
def test_two_workers_match_a_single_process(tmp_path, tmp_path_factory, recompute):
    """Gradients are all-reduced inside the jitted step (whole graph) or per parameter (layer-wise);
    the single-process reference always uses the whole-graph step."""
    models = shared_models(tmp_path_factory)
    common = dict(model={"student": str(models["student"]), "teacher": str(models["teacher"])},
                  train_dataset={"sources": [{"path": str(models["text"]), "max_samples": 16},
                                             {"path": str(models["sft"]), "max_samples": 16}]})
    distributed = write_recipe(tmp_path / "dp.yaml", output_dir=str(tmp_path / "dp"), **common,
                               runner_config={"batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": 4},
                               parallel_config={"data_parallel": 2}, recompute_config={"recompute": recompute})
    single = write_recipe(tmp_path / "single.yaml", output_dir=str(tmp_path / "single"), **common,
                          runner_config={"batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 4})

    command = ["bash", str(LAUNCH), "--config", str(distributed), "--master-port", str(_free_port()),
               "--log-dir", str(tmp_path / "msrun_log"), "--cluster-timeout", "120"]
    process = subprocess.Popen(command, env=venv_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=420)
    finally:
        _kill_tree(process)
    logs = "".join(p.read_text(errors="replace")[-3000:] for p in sorted((tmp_path / "msrun_log").glob("worker_*.log")))
    assert process.returncode == 0, output.decode(errors="replace")[-3000:] + logs

    summary = json.loads((tmp_path / "dp" / "train_summary.json").read_text())
    worker = json.loads((tmp_path / "dp" / "worker_1.json").read_text())
    assert summary["world_size"] == 2 and summary["steps_run"] == 4
    assert worker["weights_sha256"] == summary["weights_sha256"]  # identical weights on both ranks

    reference = train(load_recipe(single), show_progress=False)
    assert reference["global_batch"] == summary["global_batch"] == 4
    want, got = final_weights(tmp_path / "single"), final_weights(tmp_path / "dp")
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=0, err_msg=name)
    np.testing.assert_allclose([r["loss"] for r in log_records(tmp_path / "dp")],
                               [r["loss"] for r in log_records(tmp_path / "single")], rtol=1e-5)


def test_launch_script_validates_before_starting_workers(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", run_mode="sft", model={"student": str(tmp_path / "missing")},
                          train_dataset={"sources": [str(tmp_path / "t.txt")]}, parallel_config={"data_parallel": 2})
    result = subprocess.run(["bash", str(LAUNCH), "--config", str(recipe)], env=venv_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "model.student" in result.stderr and "msrun" not in result.stdout
    result = subprocess.run(["bash", str(LAUNCH), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "--master-addr" in result.stdout
