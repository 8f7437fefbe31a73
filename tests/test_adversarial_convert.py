"""`mindyouzhi convert` as an adversarial user tries it (issue 24): the source model, the data and a
work directory the user names are never deleted or modified; outputs that would overwrite an input,
or that cannot be written, are refused before any work; cached statistics are never reused for
other inputs; every refusal is exit 2 + one line, nothing written, every input byte-identical."""
import os
from pathlib import Path

import numpy as np
import pytest

from adversarial_support import assert_refused, damaged_copy, leftovers, run, snapshot, unwritable_outs
from hf_fixtures import tiny_convertible, write_text

FIXED = ["--rope-dim", "8", "--freqfold", "2", "--calib-tokens", "512", "--calib-seq-len", "64", "--no-progress"]
SEARCH = ["--rope-dim", "8", "--freqfold", "uniform", "--folds", "2,4", "--calib-tokens", "512", "--calib-seq-len", "64",
          "--search-tokens", "256", "--search-seq-len", "128", "--no-progress"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("adv-convert")
    model = tiny_convertible(root, "llama")  # max_position_embeddings 256
    return dict(root=root, model=model, calib=write_text(root / "calib.txt", 3000, seed=0))


def convert(env, out, *args, model=None, calib=None):
    return run("convert", "--model", model or env["model"], "--out", out, "--calib", calib or env["calib"], *args)


def inputs(env):
    return snapshot(env["model"], env["calib"])


def test_named_work_dir_survives_success_and_keeps_its_contents(env, tmp_path):
    before = inputs(env)
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("the user's file")
    code, output = convert(env, tmp_path / "o", *FIXED, "--work-dir", work)
    assert code == 0, output
    assert sorted(p.name for p in work.iterdir()) == ["mine.txt"]  # only what the run created is gone
    assert (work / "mine.txt").read_text() == "the user's file"
    assert inputs(env) == before


def test_restart_on_a_symlinked_work_dir_keeps_the_targets_contents(env, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "unrelated.bin").write_bytes(b"\x01\x02")
    (target / "sub").mkdir()
    (target / "sub" / "kept.txt").write_text("kept")
    link = tmp_path / "work-link"
    link.symlink_to(target)
    before = snapshot(target)
    code, output = convert(env, tmp_path / "o", *FIXED, "--work-dir", link, "--restart")
    assert code == 0, output
    assert snapshot(target) == before and sorted(p.name for p in target.iterdir()) == ["sub", "unrelated.bin"]


@pytest.mark.parametrize("where", ["model", "inside-model"])
def test_work_dir_in_the_model_is_refused(env, tmp_path, where):
    before = inputs(env)
    work = env["model"] if where == "model" else env["model"] / "state"
    assert_refused(*convert(env, tmp_path / "o", *FIXED, "--work-dir", work), "--work-dir", "--model")
    assert inputs(env) == before and not (env["model"] / "state").exists()
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("relation", ["same", "parent", "inside", "link-to-model", "calib-parent"])
def test_out_overlapping_an_input_is_refused_even_with_overwrite(env, tmp_path, relation):
    before = inputs(env)
    if relation == "same":
        out = env["model"]
    elif relation == "parent":
        out = env["model"].parent
    elif relation == "inside":
        out = env["model"] / "converted"
    elif relation == "calib-parent":
        out = env["calib"].parent
    else:
        out = tmp_path / "link"
        out.symlink_to(env["model"])
    line = assert_refused(*convert(env, out, *FIXED, "--overwrite"), "--out")
    assert "--model" in line or "--calib" in line
    assert inputs(env) == before
    assert not (env["model"] / "converted").exists()
    assert not [p for p in env["root"].iterdir() if p.name.startswith(".") and ".tmp-" in p.name]


def test_unwritable_out_is_refused_before_any_work(env, tmp_path):
    for out, words in unwritable_outs(tmp_path):
        assert_refused(*convert(env, out, *FIXED), "--out", words)


def test_dangling_symlink_out_is_refused_and_leaves_nothing(env, tmp_path):
    out = tmp_path / "o"
    out.symlink_to(tmp_path / "missing" / "target")
    assert_refused(*convert(env, out, *FIXED), "--out", "does not exist")
    assert leftovers(tmp_path, "o") == ["o"] and out.is_symlink()


@pytest.mark.parametrize("args, words", [
    (["--calib-seq-len", "0"], ["--calib-seq-len 0", "at least"]),
    (["--batch-size", "0"], ["--batch-size 0", "at least 1"]),
    (["--calib-seq-len", "512"], ["--calib-seq-len 512", "max_position_embeddings 256"]),
    (["--search-seq-len", "4096"], ["--search-seq-len 4096", "max_position_embeddings 256"]),
    (["--eval-seq-len", "1024", "--eval-data", "generate:2048"], ["--eval-seq-len 1024", "context"]),
    (["--search-tokens", "0"], ["--search-tokens 0"]),
])
def test_bad_window_and_batch_flags_are_named(env, tmp_path, args, words):
    before = inputs(env)
    base = [a for a in SEARCH if a not in ("--search-seq-len", "128")] if "--search-seq-len" in args else SEARCH
    line = assert_refused(*convert(env, tmp_path / "o", *base, *args), *words)
    assert "--search-data" not in line
    assert inputs(env) == before and leftovers(tmp_path, "o") == []


def test_default_search_window_longer_than_the_context_is_clamped_with_a_notice(env, tmp_path):
    args = [a for a in SEARCH if a not in ("--search-seq-len", "128")]
    code, output = convert(env, tmp_path / "o", *args, "--search-tokens", "512")
    assert code == 0, output
    assert "--search-seq-len defaults to 2048" in output and "using 256" in output
    assert leftovers(tmp_path, "o") == ["o"]


def test_data_errors_are_found_before_the_work_dir_exists(env, tmp_path):
    short = write_text(tmp_path / "short.txt", 50, seed=3)
    assert_refused(*convert(env, tmp_path / "o", *SEARCH, "--eval-data", short, "--eval-seq-len", "128"),
                   "--eval-data", "shorter than one window")
    assert_refused(*convert(env, tmp_path / "o", *SEARCH, "--search-data", short), "--search-data", "shorter")
    assert leftovers(tmp_path, "o") == []  # no .o.work (and no lone lock in it)


def test_work_dir_equal_to_out_is_refused(env, tmp_path):
    assert_refused(*convert(env, tmp_path / "o", *FIXED, "--work-dir", tmp_path / "o"), "--work-dir", "--out")
    assert leftovers(tmp_path, "o") == []


def test_calibration_file_of_nul_bytes_is_refused(env, tmp_path):
    calib = tmp_path / "nul.txt"
    calib.write_bytes(b"\x00" * 5000)
    before = snapshot(calib)
    assert_refused(*convert(env, tmp_path / "o", *FIXED, calib=calib), "--calib", "NUL")
    assert snapshot(calib) == before and leftovers(tmp_path, "o") == []


def test_non_finite_weights_are_named_and_leave_no_work_dir(env, tmp_path):
    name = "model.layers.1.self_attn.k_proj.weight"
    model = damaged_copy(env["model"], tmp_path / "nan-model", tensor=name)
    before = snapshot(model)
    for args in (FIXED, SEARCH):
        assert_refused(*convert(env, tmp_path / "o", *args, model=model), name, "non-finite")
        assert snapshot(model) == before
        assert leftovers(tmp_path, "o") == []  # no .o.work/lock, no .o.tmp-*


def test_stale_temporaries_of_a_killed_run_are_removed_by_the_next(env, tmp_path):
    stale = tmp_path / ".o.tmp-k1lled00"
    stale.mkdir()
    (stale / ".model.safetensors.partial").write_bytes(b"\0" * 100)
    code, output = convert(env, tmp_path / "o", *FIXED)
    assert code == 0, output
    assert leftovers(tmp_path, "o") == ["o"]


def test_changed_calibration_inputs_never_reuse_cached_statistics(env, tmp_path, monkeypatch):
    """A run killed after its search (statistics and search state cached), then rerun with other
    --calib-tokens, gives exactly what a fresh run with those tokens gives (issue 24, item 4)."""
    import mindyouzhi.transition.convert as convert_module

    class Killed(Exception):
        pass

    def die(*args, **kwargs):
        raise Killed()

    adaptive = [a if a != "uniform" else "adaptive" for a in SEARCH] + ["--no-trajectories"]
    work = tmp_path / "work"
    with monkeypatch.context() as patch:
        patch.setattr(convert_module, "convert_streaming", die)  # killed while writing the model
        code, output = convert(env, tmp_path / "o", *adaptive, "--calib-tokens", "1024", "--work-dir", work)
    assert code == 1 and "Killed" in output
    cached = [p for p in work.rglob("*") if p.is_file() and not p.name.endswith(".fingerprint.json")]
    assert any(p.name == "search_state.json" for p in cached) and len(cached) > 2

    code, output = convert(env, tmp_path / "o", *adaptive, "--calib-tokens", "512", "--work-dir", work)
    assert code == 0, output
    notes = [line for line in output.splitlines() if line.startswith("note:") and "other inputs" in line]
    assert notes and all("calib_tokens 1024 → 512" in line for line in notes), output
    assert any("search state" in line for line in notes), output
    code, fresh = convert(env, tmp_path / "fresh", *adaptive, "--calib-tokens", "512")
    assert code == 0, fresh
    assert snapshot(tmp_path / "o" / "model.safetensors").popitem()[1] == \
        snapshot(tmp_path / "fresh" / "model.safetensors").popitem()[1]
    assert list(work.iterdir()) == []  # the run's state is gone, the named dir stays


def test_a_fingerprint_mismatch_removes_the_artefact_and_names_the_change(tmp_path):
    """The mechanism itself: no record or another record → rebuilt, the same record → reused."""
    from mindyouzhi.fingerprint import reuse_or_reset

    state = tmp_path / "search_state.json"
    state.write_text('{"fingerprint": {}}')
    assert reuse_or_reset(state, {"calib_seq_len": 64}, "the search state", say=print) is False
    assert not state.exists()
    state.write_text('{"fingerprint": {}}')
    assert reuse_or_reset(state, {"calib_seq_len": 64}, "the search state", say=print) is True
    messages = []
    assert reuse_or_reset(state, {"calib_seq_len": 128}, "the search state", say=messages.append) is False
    assert not state.exists() and "calib_seq_len 64 → 128" in messages[0]
