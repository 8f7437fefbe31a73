"""The table "MindSpore parallel features on CPU" in docs/training.md, re-checked: each row is one
run of tests/parallel_probe.py (alone, or under msrun with 2 workers).  If a MindSpore upgrade
changes a row, this test fails and the table (and the trainer's refusals) must follow."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_train_fixtures import venv_env
from test_train_msrun import _free_port, _kill_tree

PROBE = Path(__file__).resolve().parent / "parallel_probe.py"
SEMI_AUTO_ON_CPU = "Invalid backend: CPU"


def _probe(feature: str, workers: int, tmp_path: Path) -> list[dict]:
    if workers == 1:
        command = [sys.executable, str(PROBE), feature]
    else:
        command = ["msrun", f"--worker_num={workers}", f"--local_worker_num={workers}",
                   f"--master_port={_free_port()}", "--join=True", "--cluster_time_out=60",
                   f"--log_dir={tmp_path / 'log'}", str(PROBE), feature]
    process = subprocess.Popen(command, env=venv_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=120)
    finally:
        _kill_tree(process)
    texts = [output.decode(errors="replace")]
    texts += [p.read_text(errors="replace") for p in sorted((tmp_path / "log").glob("worker_*.log"))]
    reports = [json.loads(line.split(" ", 1)[1]) for text in texts[min(1, workers - 1):]
               for line in text.splitlines() if line.startswith("PROBE ")]
    assert len(reports) == workers, "\n".join(t[-2000:] for t in texts)
    return reports


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _probe("single", 1, tmp_path_factory.mktemp("single"))[0]


@pytest.mark.parametrize("feature", ["recompute", "fp16_functional"])
def test_runs_on_cpu_and_matches_the_plain_step(feature, single, tmp_path):
    report, = _probe(feature, 1, tmp_path)
    tolerance = 1e-6 if feature == "recompute" else 2e-3  # fp16 compute on fp32 master weights
    assert report["losses"] == pytest.approx(single["losses"], rel=tolerance)


@pytest.mark.parametrize("feature, message", [
    ("fp16_amp_cell", "NPUGetFloatStatusV2"),        # TrainOneStepWithLossScaleCell's overflow check
    ("bf16_amp", "MatMul"),                           # no bf16 MatMul kernel on CPU
])
def test_fails_on_cpu(feature, message, tmp_path):
    report, = _probe(feature, 1, tmp_path)
    assert message in report.get("error", ""), report


@pytest.mark.slow
@pytest.mark.parametrize("feature", ["semi_auto_shard", "hsdp", "pipeline"])
def test_semi_auto_parallel_does_not_compile_on_cpu(feature, tmp_path):
    for report in _probe(feature, 2, tmp_path):
        assert SEMI_AUTO_ON_CPU in report.get("error", ""), report


@pytest.mark.slow
def test_parallel_optimizer_in_data_parallel_mode_shards_nothing_on_cpu(single, tmp_path):
    for report in _probe("dp_parallel_optimizer", 2, tmp_path):
        assert report["losses"] == pytest.approx(single["losses"], rel=1e-6)
        assert report["state_shapes"] == report["param_shapes"]  # full-size moments on every rank
