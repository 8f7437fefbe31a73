"""`eval ppl --stream-layers`: one layer in memory at a time, the same perplexity and per-window NLLs as
the loaded model; the default streams when the weights would not fit in half the available memory."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from hf_fixtures import tiny_convertible, write_text
from mindyouzhi.cli import main
from mindyouzhi.eval import ppl as ppl_module
from mindyouzhi.models.config import ModelConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppl-stream")
    model = tiny_convertible(root, "qwen2", 3)  # q/k/v biases, untied head
    return model, write_text(root / "text.txt", 3000, seed=4)


def _ppl(model, text, *flags):
    result = CliRunner().invoke(main, ["eval", "ppl", "--model", str(model), "--data", str(text), "--seq-len", "64",
                                       "--max-windows", "5", "--batch-size", "2", "--forward-precision", "fp32",
                                       "--json", *flags])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_streamed_layers_give_the_loaded_models_figures(setup):
    model, text = setup
    loaded = _ppl(model, text, "--no-stream-layers")
    streamed = _ppl(model, text, "--stream-layers")
    assert (loaded["streamed_layers"], streamed["streamed_layers"]) == (False, True)
    assert len(streamed["window_nll"]) == 5
    np.testing.assert_allclose(streamed["window_nll"], loaded["window_nll"], rtol=1e-5)
    assert streamed["ppl"] == pytest.approx(loaded["ppl"], rel=1e-6)
    assert sum(loaded["window_nll"]) == pytest.approx(loaded["nll"], rel=1e-9)


def test_default_streams_only_when_the_weights_do_not_fit(setup, monkeypatch):
    model, text = setup
    config = ModelConfig.from_dir(model)
    stream, loaded = ppl_module.should_stream(config, "fp32", available_bytes=10 ** 12)
    assert not stream and loaded > 0
    assert ppl_module.should_stream(config, "fp32", available_bytes=loaded)[0]
    assert ppl_module.should_stream(config, "bf16", available_bytes=2 * loaded)[0]  # bf16 keeps a second copy
    monkeypatch.setattr(ppl_module, "available_memory_bytes", lambda: loaded)
    result = CliRunner().invoke(main, ["eval", "ppl", "--model", str(model), "--data", str(text), "--seq-len", "64",
                                       "--max-windows", "2", "--forward-precision", "fp32", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["streamed_layers"] is True
    assert "note: streaming layers" in result.stderr
