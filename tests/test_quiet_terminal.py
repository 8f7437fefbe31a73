"""The terminal shows our lines only: MindSpore's log lines stay hidden unless --verbose asks."""
import os
import subprocess
import sys

from hf_fixtures import tiny_convertible


def _generate(model, *flags):
    env = {key: value for key, value in os.environ.items() if key != "GLOG_v"}
    env["MINDYOUZHI_NO_PROGRESS"] = "1"
    return subprocess.run([sys.executable, "-m", "mindyouzhi.cli", *flags, "generate", "--model", str(model),
                           "--prompt", "the cat", "--max-new-tokens", "4"], capture_output=True, text=True, env=env,
                          timeout=600)


def _mindspore_lines(stderr: str) -> list:
    return [line for line in stderr.splitlines() if line.startswith(("[WARNING]", "[INFO]", "[DEBUG]"))]


def test_mindspore_log_lines_are_hidden_unless_verbose(tmp_path):
    model = tiny_convertible(tmp_path, "llama", 2)
    quiet = _generate(model)
    assert quiet.returncode == 0, quiet.stderr
    assert _mindspore_lines(quiet.stderr) == [], quiet.stderr
    verbose = _generate(model, "--verbose")
    assert verbose.returncode == 0, verbose.stderr
    assert _mindspore_lines(verbose.stderr), "--verbose should let MindSpore's INFO lines through"
