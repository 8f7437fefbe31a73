"""Data parallel through msrun on CPU: 2 workers end with identical weights, equal to a single
process over the same global batch (2 micro-batches of accumulation), also after the whole msrun
tree is killed and the run resumed."""
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from mindyouzhi.train import checkpoint as ckpt
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


def _launch(recipe: Path, log_dir: Path) -> subprocess.Popen:
    """``recipes/launch.sh`` with 2 workers; its output goes to ``<log_dir>.out`` (a pipe nobody reads
    while we poll could fill and stall msrun)."""
    command = ["bash", str(LAUNCH), "--config", str(recipe), "--master-port", str(_free_port()),
               "--log-dir", str(log_dir), "--cluster-timeout", "120"]
    with open(log_dir.with_suffix(".out"), "wb") as output:
        return subprocess.Popen(command, env=venv_env(), cwd=log_dir.parent, stdout=output,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _run_to_end(process: subprocess.Popen, log_dir: Path) -> None:
    try:
        process.wait(timeout=420)
    finally:
        _kill_tree(process)
    logs = "".join(p.read_text(errors="replace")[-3000:] for p in sorted(log_dir.glob("worker_*.log")))
    assert process.returncode == 0, log_dir.with_suffix(".out").read_text(errors="replace")[-3000:] + logs


def _data_parallel_and_single(tmp_path, tmp_path_factory, runner_config: dict, run_mode: str = "gkd",
                              **distributed_only) -> tuple[Path, Path]:
    """The same global batch of 4 as 2 workers × 2 examples, and as 1 process × 2 micro-batches × 2."""
    models = shared_models(tmp_path_factory)
    common = dict(run_mode=run_mode, model={"student": str(models["student"]), "teacher": str(models["teacher"])},
                  train_dataset={"sources": [{"path": str(models["text"]), "max_samples": 16},
                                             {"path": str(models["sft"]), "max_samples": 16}]})
    distributed = write_recipe(tmp_path / "dp.yaml", output_dir=str(tmp_path / "dp"), **common,
                               runner_config={**runner_config, "batch_size": 2, "gradient_accumulation_steps": 1},
                               parallel_config={"data_parallel": 2}, **distributed_only)
    single = write_recipe(tmp_path / "single.yaml", output_dir=str(tmp_path / "single"), **common,
                          runner_config={**runner_config, "batch_size": 2, "gradient_accumulation_steps": 2})
    return distributed, single


def _assert_same_training(tmp_path, atol: float = 1e-5) -> None:
    """``dp`` (msrun) and ``single`` end with the same weights and logged the same losses."""
    want, got = final_weights(tmp_path / "single"), final_weights(tmp_path / "dp")
    assert sorted(want) == sorted(got)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=atol, rtol=0, err_msg=name)
    reference, replayed = log_records(tmp_path / "single"), log_records(tmp_path / "dp")
    assert [r["step"] for r in replayed] == [r["step"] for r in reference]
    np.testing.assert_allclose([r["loss"] for r in replayed], [r["loss"] for r in reference], rtol=atol)


@pytest.mark.slow
@pytest.mark.parametrize("recompute", [False, True], ids=["whole-graph", "layerwise"])
def test_two_workers_match_a_single_process(tmp_path, tmp_path_factory, recompute):
    """Gradients are all-reduced inside the jitted step (whole graph) or per parameter (layer-wise);
    the single-process reference always uses the whole-graph step."""
    distributed, single = _data_parallel_and_single(tmp_path, tmp_path_factory, {"max_steps": 4},
                                                    recompute_config={"recompute": recompute})
    _run_to_end(_launch(distributed, tmp_path / "msrun_log"), tmp_path / "msrun_log")

    summary = json.loads((tmp_path / "dp" / "train_summary.json").read_text())
    worker = json.loads((tmp_path / "dp" / "worker_1.json").read_text())
    assert summary["world_size"] == 2 and summary["steps_run"] == 4
    assert worker["weights_sha256"] == summary["weights_sha256"]  # identical weights on both ranks

    reference = train(load_recipe(single), show_progress=False)
    assert reference["global_batch"] == summary["global_batch"] == 4
    _assert_same_training(tmp_path)
    if not recompute:
        _assert_shards_merge_to(tmp_path / "dp", final_weights(tmp_path / "single"), tmp_path / "merged")


def _assert_shards_merge_to(run_dir: Path, expected: dict, merged: Path) -> None:
    """The last checkpoint of a 2-worker run: each rank wrote its own share (weights and moments,
    disjoint, neither the whole), and `train merge` makes one model directory equal to ``expected``."""
    from click.testing import CliRunner
    from safetensors.numpy import load_file

    from mindyouzhi.cli import main

    checkpoint = ckpt.latest_checkpoint(run_dir)
    assert ckpt.is_sharded(checkpoint) and not (checkpoint / "model.safetensors").exists()
    shares = [{name for f in ("model.safetensors", "optimizer.safetensors")
               for name in load_file(str(checkpoint / f"rank_{rank}" / f))} for rank in (0, 1)]
    assert shares[0] and shares[1] and not shares[0] & shares[1]
    assert {n for n in shares[0] | shares[1] if not n.startswith("exp_avg")} == set(expected)
    assert sum(n.startswith(("exp_avg.", "exp_avg_sq.")) for n in shares[0] | shares[1]) == 2 * len(expected)
    result = CliRunner().invoke(main, ["train", "merge", "--checkpoint", str(checkpoint), "--out", str(merged)])
    assert result.exit_code == 0, result.output
    got = load_file(str(merged / "model.safetensors"))
    assert sorted(got) == sorted(expected)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-5, rtol=0, err_msg=name)
    assert (merged / "config.json").is_file() and (merged / "tokenizer.json").is_file()


@pytest.mark.slow
def test_killed_two_worker_run_resumes_identically(tmp_path, tmp_path_factory):
    """SIGKILL to msrun, its scheduler and both workers once the first checkpoint is on disk; msrun
    again resumes both ranks from it and ends where an uninterrupted single process does.  SFT: the
    GKD teacher would only add time (the other test runs it under msrun)."""
    total = 6
    distributed, single = _data_parallel_and_single(tmp_path, tmp_path_factory, {"max_steps": total, "save_steps": 2},
                                                    run_mode="sft")
    out = tmp_path / "dp"
    process = _launch(distributed, tmp_path / "killed_log")
    deadline = time.time() + 300
    while not ckpt.list_checkpoints(out) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    _kill_tree(process)
    written = ckpt.list_checkpoints(out)
    assert written, (tmp_path / "killed_log.out").read_text(errors="replace")[-3000:]
    killed_at = ckpt.read_state(written[-1])["step"]
    assert killed_at < total and not (out / "final").exists() and not (out / "worker_1.json").exists()

    _run_to_end(_launch(distributed, tmp_path / "resumed_log"), tmp_path / "resumed_log")
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["resumed_from"] == str(written[-1])
    assert summary["start_step"] == killed_at and summary["steps_run"] == total - killed_at
    worker = json.loads((out / "worker_1.json").read_text())
    assert worker["weights_sha256"] == summary["weights_sha256"]  # both ranks resumed the same state

    train(load_recipe(single), show_progress=False)
    _assert_same_training(tmp_path)


def test_launch_script_validates_before_starting_workers(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", run_mode="sft", model={"student": str(tmp_path / "missing")},
                          train_dataset={"sources": [str(tmp_path / "t.txt")]}, parallel_config={"data_parallel": 2})
    result = subprocess.run(["bash", str(LAUNCH), "--config", str(recipe)], env=venv_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "model.student" in result.stderr and "msrun" not in result.stdout
    result = subprocess.run(["bash", str(LAUNCH), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "--master-addr" in result.stdout
