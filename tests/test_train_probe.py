"""``mindyouzhi probe compare``: msprobe dumps of teacher and student, per-layer comparison."""
import importlib.util
import json

import pytest
from click.testing import CliRunner

from mindyouzhi.cli import main
from mindyouzhi.probe.cli import probe
from test_train_fixtures import shared_models

needs_msprobe = pytest.mark.skipif(importlib.util.find_spec("msprobe") is None
                                   or importlib.util.find_spec("msprobe.mindspore") is None,
                                   reason="mindstudio-probe not installed (pip install 'mindyouzhi[probe]')")


@needs_msprobe
@pytest.mark.slow
def test_probe_finds_the_converted_layer(tmp_path, tmp_path_factory):
    models = shared_models(tmp_path_factory)
    hybrid = tmp_path / "hybrid"  # only layer 1 converted: layer 0 is the teacher's own GQA layer
    result = CliRunner().invoke(main, ["convert", "--model", str(models["teacher"]), "--out", str(hybrid), "--calib",
                                       str(models["text"]), "--calib-tokens", "1024", "--calib-seq-len", "64",
                                       "--search-tokens", "512", "--search-seq-len", "64", "--rope-dim", "8",
                                       "--kv-lora-rank", "24", "--freqfold", "2", "--layers", "1", "--json"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(probe, ["compare", "--teacher", str(models["teacher"]), "--student", str(hybrid),
                                        "--data", str(models["text"]), "--out", str(tmp_path / "probe"),
                                        "--seq-len", "24", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    first, second = report["layers"]
    assert (first["type"], second["type"]) == ("gqa", "mla")
    assert first["isolated_attention"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert first["isolated_attention"]["max_abs_err"] < 1e-5
    assert second["isolated_attention"]["cosine"] < 0.999
    assert second["isolated_attention"]["rel_err"] > 1e-3
    assert report["worst_layer_isolated_attention"] == 1
    # the chained comparison sees layer 1's own error on top of an identical layer 0
    assert second["chained_attention"]["cosine"] == pytest.approx(second["isolated_attention"]["cosine"], abs=1e-5)
    assert all(path.endswith(".csv") for path in report["compare_csv"].values())
    assert (tmp_path / "probe" / "probe_report.json").is_file()


def test_without_mindstudio_probe_the_command_names_the_package(tmp_path, monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name.split(".")[0] == "msprobe" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    models = tmp_path / "models"  # not the working directory, where the default --out goes
    models.mkdir()
    result = CliRunner().invoke(probe, ["compare", "--teacher", str(models), "--student", str(models),
                                        "--data", str(models / "x.txt")])
    assert result.exit_code == 2
    assert "mindstudio-probe" in result.output and "pip install" in result.output
