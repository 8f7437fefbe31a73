"""One CLI: fast to start, the shared flags spelled and behaving the same in every command."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from mindyouzhi import cli_support
from mindyouzhi.cli import main
from mindyouzhi.cli_support import KV_LORA_RANK, RenamedOption, renamed_options, walk_commands
from mindyouzhi.progress import progress_bar, progress_choice

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("mindspore", "matplotlib", "transformers", "torch", "numpy", "scipy", "tokenizers", "safetensors")
COMMANDS = {" ".join(path[1:]): command for path, command in walk_commands(main) if not isinstance(command, click.Group)}
# Commands that draw progress bars (directly or deep in the library code they call).
WITH_BARS = {"eval ppl", "eval bench", "eval kl", "eval suite", "convert", "analyze layers", "train", "capacity",
             "data compress", "data refusal", "data augment", "data amounts generate", "data ifeval generate",
             "data ifeval verify", "data banking generate", "data banking eval", "data annotate"}


def _option(command: click.Command, flag: str):
    return next((p for p in command.params if isinstance(p, click.Option) and flag in p.opts
                 and not isinstance(p, RenamedOption)), None)


def _run(args, **env):
    return CliRunner().invoke(main, [str(a) for a in args], env=env or None)


def _subprocess_env():
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # what a user has: compiled modules are cached
    env.setdefault("PYTHONPYCACHEPREFIX", str(Path(tempfile.gettempdir()) / "mindyouzhi-pycache"))
    return env


# -- fast start -----------------------------------------------------------------------------------
def test_no_heavy_import_before_a_command_needs_it():
    """Importing the CLI and rendering every command's --help loads none of the heavy libraries."""
    script = ("import sys, click\n"
              "from mindyouzhi.cli import main\n"
              "from mindyouzhi.cli_support import walk_commands\n"
              "for path, command in walk_commands(main):\n"
              "    with click.Context(command, info_name=' '.join(path)) as ctx:\n"
              "        command.get_help(ctx)\n"
              f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))\n")
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", script], capture_output=True, text=True,
                          env=_subprocess_env(), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
    imported = {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
    assert "click" in imported and not imported & set(HEAVY)


@pytest.mark.parametrize("args", [["--help"], ["convert", "--help"], ["eval", "bench", "--help"], ["train", "--help"],
                                  ["capacity", "--help"], ["export", "--help"], ["data", "compress", "--help"],
                                  ["data", "amounts", "to-upper", "1.5"]], ids=" ".join)
def test_commands_start_quickly(args):
    command = [sys.executable, "-m", "mindyouzhi.cli", *args]
    subprocess.run(command, capture_output=True, env=_subprocess_env(), timeout=120)  # warm the module cache
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=_subprocess_env(), timeout=120)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    assert seconds < 2.0, f"{' '.join(args)} took {seconds:.2f} s (target 0.4 s; bound generous for loaded CI)"


# -- shared flags ---------------------------------------------------------------------------------
def test_shared_flags_have_one_spelling_and_one_help():
    for name, command in COMMANDS.items():
        for flag, text in (("--json", cli_support.JSON_HELP), ("--overwrite", cli_support.OVERWRITE_HELP),
                           ("--progress", cli_support.PROGRESS_HELP)):
            option = _option(command, flag)
            if option is not None:
                assert option.help == text, f"{name} {flag}"
        progress = _option(command, "--progress")
        assert (progress is not None) == (name in WITH_BARS), name
        if progress is not None:
            assert progress.secondary_opts == ["--no-progress"] and progress.default is None, name
        if _option(command, "--out") is not None and _option(command, "--out").required:
            assert _option(command, "--overwrite") is not None, f"{name} writes --out but has no --overwrite"
    assert all(_option(command, "--json") for name, command in COMMANDS.items() if name != "serve")


def test_the_shared_options_are_declared_in_one_place():
    """No command module declares --json/--progress/--overwrite or prints JSON itself."""
    sources = [p for p in (REPO / "mindyouzhi").rglob("*.py") if p.name in ("cli.py", "commands_import.py")]
    assert len(sources) >= 8
    for path in sources:
        text = path.read_text(encoding="utf-8")
        for twin in ('option("--json"', 'option("--overwrite"', '"--progress/--no-progress"', "json.dumps("):
            assert twin not in text, f"{path.relative_to(REPO)} declares {twin} again: use mindyouzhi.cli_support"


def test_required_options_are_marked():
    assert _option(COMMANDS["convert"], "--calib").required
    result = _run(["convert", "--model", "m", "--out", "o"])
    assert result.exit_code == 2 and "Missing option '--calib'" in result.output


# -- --json ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ["data", "amounts", "to-upper", "1680.32", "--json"],
    ["data", "amounts", "to-lower", "壹佰伍拾元整", "--json"],
    ["capacity", "--model-config", "llama-3-8b", "--memory", "64GiB", "--json"],
    ["data", "banking", "generate", "--count", "4", "--out", "{tmp}/banking.jsonl", "--json", "--progress"],
], ids=lambda args: " ".join(args[:2]))
def test_json_prints_exactly_one_object(args, tmp_path, monkeypatch):
    monkeypatch.delenv("MINDYOUZHI_NO_PROGRESS", raising=False)
    result = _run([a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and isinstance(json.loads(lines[0]), dict)


# -- progress -------------------------------------------------------------------------------------
def _banking(tmp_path, *flags, **env):
    return _run(["data", "banking", "generate", "--count", "5", "--out", tmp_path / f"b{len(os.listdir(tmp_path))}.jsonl",
                 *flags], **env)


def test_progress_flag_env_and_default(tmp_path, monkeypatch):
    monkeypatch.delenv("MINDYOUZHI_NO_PROGRESS", raising=False)
    shown = _banking(tmp_path, "--progress")
    assert shown.exit_code == 0 and "banking:" in shown.stderr and "/5 [" in shown.stderr
    for result in (_banking(tmp_path, "--no-progress"),  # explicit off
                   _banking(tmp_path),  # default: stderr is not a terminal here
                   _banking(tmp_path, "--progress", MINDYOUZHI_NO_PROGRESS="1")):  # the CI switch wins
        assert result.exit_code == 0 and result.stderr == ""


def test_progress_bar_follows_the_running_commands_choice(monkeypatch):
    """The flag reaches bars drawn deep in library code, which only call progress_bar()."""
    monkeypatch.delenv("MINDYOUZHI_NO_PROGRESS", raising=False)
    with progress_choice(True):
        assert not progress_bar(3, "on").disable
        with progress_choice(False):
            assert progress_bar(3, "off").disable
        assert not progress_bar(3, "restored").disable
    monkeypatch.setenv("MINDYOUZHI_NO_PROGRESS", "1")
    with progress_choice(True):
        assert progress_bar(3, "ci").disable


# -- renamed flags --------------------------------------------------------------------------------
def test_renamed_flags_are_hidden_and_still_work(tmp_path):
    renamed = {name: [(o.old, o.new) for o in renamed_options(c)] for name, c in COMMANDS.items() if renamed_options(c)}
    assert renamed == {"capacity": [("--config", "--model-config")], "eval bench": [("--out", "--report")],
                       "eval kl": [("--out", "--report")], "data compress": [("--batch-size", "--round-size")]}
    for name, pairs in renamed.items():
        with click.Context(COMMANDS[name], info_name=name) as ctx:
            listed = {opt for line in COMMANDS[name].get_help(ctx).splitlines() for opt in line.split()[:1]}
        for old, new in pairs:
            assert new in listed and old not in listed, name

    args = ["capacity", "--memory", "64GiB", "--json"]
    new = _run(args + ["--model-config", "llama-3-8b"])
    old = _run(args + ["--config", "llama-3-8b"])
    assert old.exit_code == 0 and json.loads(old.stdout) == json.loads(new.stdout)
    assert "--config is now --model-config" in old.stderr
    both = _run(args + ["--config", "llama-3-8b", "--model-config", "llama-3-8b"])
    assert both.exit_code == 2 and "pass only --model-config" in both.output


def test_renamed_compress_batch_size(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"instruction": f"问题{i}：房贷{i * 37}元怎么还？", "output": "等额本息。" * (i % 4 + 1)},
                                       ensure_ascii=False) + "\n" for i in range(12)), encoding="utf-8")
    outputs = []
    for flag in ("--round-size", "--batch-size"):
        out = tmp_path / f"{flag.strip('-')}.jsonl"
        result = _run(["data", "compress", pool, "--out", out, "--budget", 5, flag, 2])
        assert result.exit_code == 0, result.output
        outputs.append(out.read_text(encoding="utf-8"))
    assert outputs[0] == outputs[1] and len(outputs[0].splitlines()) == 5


# -- --kv-lora-rank -------------------------------------------------------------------------------
def test_kv_lora_rank_is_one_type_everywhere():
    users = [name for name, command in COMMANDS.items() if _option(command, "--kv-lora-rank")]
    assert sorted(users) == ["capacity", "convert"]
    assert all(_option(COMMANDS[name], "--kv-lora-rank").type is KV_LORA_RANK for name in users)
    assert [KV_LORA_RANK.convert(v, None, None) for v in ("96", " 512 ", "full", "FULL", 7)] == [96, 512, "full", "full", 7]
    for bad in ("0", "-3", "abc", "1.5"):
        with pytest.raises(click.BadParameter, match="positive integer or 'full'"):
            KV_LORA_RANK.convert(bad, None, None)
    for name in users:
        result = _run([*name.split(), "--kv-lora-rank", "abc"])
        assert result.exit_code == 2 and "Invalid value for '--kv-lora-rank'" in result.output, name


def test_capacity_full_rank_keeps_every_key_value(tmp_path):
    """'full' = no truncation: 2·kv_heads·head_dim − rope_dim latent + rope_dim = the GQA cache size."""
    result = _run(["capacity", "--model-config", "llama-3-8b", "--memory", "64GiB", "--kv-lora-rank", "full",
                   "--rope-dim", "64", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["converted"]["kv_bytes_per_token"] == payload["original"]["kv_bytes_per_token"]
    assert _run(["capacity", "--model-config", "llama-3-8b", "--memory", "64GiB", "--kv-lora-rank", "0"]).exit_code == 2
