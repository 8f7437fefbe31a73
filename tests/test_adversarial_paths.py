"""The shared output-safety rules (mindyouzhi/paths.py, io_utils) on their own (issue 24): overlap
of outputs and inputs through links, work directories the user names, stale temporaries."""
import os

import pytest

from mindyouzhi.errors import UserError
from mindyouzhi.io_utils import locked_work_dir, remove_stale_temporaries
from mindyouzhi.paths import check_outputs, check_work_dir


def test_outputs_overlapping_inputs_through_links_are_refused(tmp_path):
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    alias = tmp_path / "alias"
    alias.symlink_to(tmp_path / "models")
    for out, word in ((alias, "holds"), (alias / "m", "is --model"), (alias / "m" / "x", "inside")):
        with pytest.raises(UserError, match=word):
            check_outputs({"--out": out}, {"--model": model}, overwrite=True, directories={"--out"})
    check_outputs({"--out": tmp_path / "models" / "m2"}, {"--model": model}, directories={"--out"})  # a sibling is fine
    with pytest.raises(UserError, match="--report .* --out"):
        check_outputs({"--out": tmp_path / "o", "--report": tmp_path / "o" / "r.json"}, {})


def test_generated_sources_and_unset_values_are_not_paths(tmp_path):
    check_outputs({"--out": tmp_path / "o", "--report": None}, {"--calib": "generate:100", "--data": None})


def test_work_dir_rules(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    for work in (model, model / "state"):
        with pytest.raises(UserError, match="--work-dir"):
            check_work_dir(work, tmp_path / "o", {"--model": model})
    with pytest.raises(UserError, match="--out"):
        check_work_dir(tmp_path / "o" / "w", tmp_path / "o", {})
    check_work_dir(tmp_path, tmp_path / "o", {"--model": model})  # holding both is fine: only a subdir is used


def test_named_work_dir_restart_and_failure_touch_only_the_runs_state(tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    (work / "user.txt").write_text("mine")
    with locked_work_dir(work, tmp_path / "o", named=True) as state:
        (state / "grams").mkdir()
        (state / "grams" / "gram_0000.npy").write_bytes(b"x")
        (state / "hidden").mkdir()
    with locked_work_dir(work, tmp_path / "o", restart=True, named=True, scratch=("hidden",)) as again:
        assert again == state and sorted(p.name for p in state.iterdir()) == ["lock"]
    with pytest.raises(RuntimeError):
        with locked_work_dir(work, tmp_path / "o", named=True, remove_on_success=True) as state:
            (state / "x.fingerprint.json").write_text("{}")
            raise RuntimeError("failed before anything resumable")
    assert sorted(p.name for p in work.iterdir()) == ["user.txt"]  # no lone lock left
    with pytest.raises(RuntimeError):
        with locked_work_dir(work, tmp_path / "o", named=True, remove_on_success=True) as state:
            (state / "search_state.json").write_text("{}")
            raise RuntimeError("failed after saving state")
    assert (state / "search_state.json").is_file()  # resumable: kept
    with locked_work_dir(work, tmp_path / "o", named=True, remove_on_success=True):
        pass
    assert sorted(p.name for p in work.iterdir()) == ["user.txt"]


def test_only_unheld_temporaries_of_the_same_output_are_removed(tmp_path):
    import fcntl

    stale, live = tmp_path / ".o.tmp-aaaaaaaa", tmp_path / ".o.tmp-bbbbbbbb"
    for directory in (stale, live):
        directory.mkdir()
        (directory / ".model.safetensors.partial").write_bytes(b"\0")
    keep = [tmp_path / "o.tmp-notes.txt", tmp_path / ".other.tmp-cccccccc", tmp_path / ".o.old-dddddddd"]
    keep[0].write_text("the user's notes")
    keep[1].mkdir()
    keep[2].mkdir()
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert remove_stale_temporaries(tmp_path / "o") == [stale]
    finally:
        os.close(fd)
    assert live.is_dir() and all(path.exists() for path in keep)
