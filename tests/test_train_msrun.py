"""Data parallel through msrun on CPU: 2 workers end with identical weights, equal to a single
process over the same global batch (2 micro-batches of accumulation)."""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mindyouzhi.train.config import load_recipe
from mindyouzhi.train.trainer import train
from test_train_fixtures import shared_models, final_weights, log_records, venv_env, write_recipe


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_workers_match_a_single_process(tmp_path, tmp_path_factory):
    models = shared_models(tmp_path_factory)
    common = dict(model={"student": str(models["student"]), "teacher": str(models["teacher"])},
                  train_dataset={"sources": [{"path": str(models["text"]), "max_samples": 16},
                                             {"path": str(models["sft"]), "max_samples": 16}]})
    distributed = write_recipe(tmp_path / "dp.yaml", output_dir=str(tmp_path / "dp"), **common,
                               runner_config={"batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": 4},
                               parallel_config={"data_parallel": 2})
    single = write_recipe(tmp_path / "single.yaml", output_dir=str(tmp_path / "single"), **common,
                          runner_config={"batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 4})

    msrun = Path(sys.executable).parent / "msrun"
    task = Path(__import__("mindyouzhi.train.__main__", fromlist=["_"]).__file__)
    command = [str(msrun), "--worker_num=2", "--local_worker_num=2", f"--master_port={_free_port()}", "--join=True",
               f"--log_dir={tmp_path / 'msrun_log'}", "--cluster_time_out=120", str(task), "--config", str(distributed)]
    process = subprocess.Popen(command, env=venv_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=420)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
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
