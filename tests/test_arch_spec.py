"""The family spec (convert_weights/architectures.py) against transformers, and what it refuses."""
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from hf_fixtures import TINY, build_hf_model, hf_logits, tiny_convertible, write_text
from mindyouzhi.cli import main
from mindyouzhi.convert_weights import architectures
from mindyouzhi.convert_weights.safetensors_io import SafetensorsStore
from mindyouzhi.models import functional as F
from mindyouzhi.models.config import ModelConfig
from mindyouzhi.models.runner import ModelRunner

IDS = np.random.default_rng(5).integers(4, 124, size=(2, 24))
BIASED = {"mlp_bias": True, "attention_bias": True}


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def assert_refused(code, output, *words):
    assert code == 2, output
    lines = [line for line in output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in output, output
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("kind, overrides", [
    ("llama", BIASED), ("llama", {"tie_word_embeddings": True}), ("qwen2", {}), ("qwen3", {"attention_bias": True}),
    ("mistral", {}),
])
def test_checkpoint_shapes_are_the_transformers_parameters(kind, overrides):
    import transformers

    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                  "mistral": transformers.MistralConfig, "qwen3": transformers.Qwen3Config}[kind]
    model_cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                 "mistral": transformers.MistralForCausalLM, "qwen3": transformers.Qwen3ForCausalLM}[kind]
    hf_config = config_cls(**dict(TINY, **overrides))
    params = {name: tuple(p.shape) for name, p in model_cls(hf_config).named_parameters()}
    ours = architectures.checkpoint_shapes(ModelConfig.from_dict(hf_config.to_dict()))
    assert ours == params


def test_layer_functions_take_the_spec_order():
    assert F.GQA_LAYER_WEIGHTS == tuple(s.local for s in architectures.GQA_LAYER_TENSORS)
    assert "mlp.down_proj.bias" in F.MLA_LAYER_WEIGHTS and "self_attn.kv_b_proj.weight" in F.MLA_LAYER_WEIGHTS


def test_mlp_bias_model_matches_transformers_in_the_cells(tmp_path):
    """The training cells (CausalLM) load the MLP biases and match transformers, like the runner
    does in test_parity_hf."""
    from mindyouzhi.models.decoder import CausalLM, RopeTables
    from mindyouzhi.models.layers import causal_mask, to_tensor

    model_dir = build_hf_model("llama", tmp_path / "m", **BIASED)
    config = ModelConfig.from_dir(model_dir)
    net = CausalLM(config, SafetensorsStore(model_dir))
    names = {name for name, _ in net.parameters_and_names()}
    assert {"model.layers.1.mlp.gate_proj.bias", "model.layers.1.mlp.down_proj.bias"} <= names
    tables = [to_tensor(t) for t in RopeTables(config)(IDS.shape[1])]
    logits = net(to_tensor(IDS.astype(np.int32), dtype=__import__("mindspore").int32), *tables,
                 to_tensor(causal_mask(IDS.shape[1]))).asnumpy()
    np.testing.assert_allclose(logits, hf_logits(model_dir, IDS), atol=1e-4, rtol=0)


def test_mlp_biases_flow_through_the_conversion_and_the_export_refuses_them(tmp_path):
    model = tiny_convertible(tmp_path, "llama", **BIASED)
    calib = write_text(tmp_path / "calib.txt", 2000, seed=0)
    exact = tmp_path / "exact"
    code, output = run("convert", "--model", model, "--out", exact, "--calib", calib, "--calib-tokens", 512,
                       "--calib-seq-len", 64, "--rope-all", "--freqfold", 1, "--kv-lora-rank", "full", "--stage", 1)
    assert code == 0, output
    assert "model.layers.0.mlp.up_proj.bias" in SafetensorsStore(exact)
    converted = ModelRunner.from_dir(exact, with_tokenizer=False).logits(IDS)
    np.testing.assert_allclose(converted, hf_logits(model, IDS), atol=1e-4, rtol=0)

    low_rank = tmp_path / "lowrank"
    code, output = run("convert", "--model", model, "--out", low_rank, "--calib", calib, "--calib-tokens", 512,
                       "--calib-seq-len", 64, "--rope-dim", 8, "--freqfold", 2, "--kv-lora-rank", 16)
    assert code == 0, output
    out = tmp_path / "export"
    assert_refused(*run("export", "--model", low_rank, "--out", out), "MLP bias", "mlp.")
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    return tiny_convertible(root, "llama"), write_text(root / "text.txt", 400, seed=1)


def _variant(tiny, tmp_path, config_changes=None, extra_tensors=None):
    model = tmp_path / "variant"
    shutil.copytree(tiny[0], model)
    if config_changes:
        config = json.loads((model / "config.json").read_text())
        config.update(config_changes)
        (model / "config.json").write_text(json.dumps(config))
    if extra_tensors:
        weights = load_file(model / "model.safetensors")
        weights.update(extra_tensors)
        save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    return model


def _ppl(model, text):
    return run("eval", "ppl", "--model", model, "--data", text, "--seq-len", 16)


def test_a_tensor_the_spec_does_not_consume_is_refused(tiny, tmp_path):
    bias = {"model.layers.0.mlp.gate_proj.bias": np.zeros(TINY["intermediate_size"], np.float32)}
    assert_refused(*_ppl(_variant(tiny, tmp_path, extra_tensors=bias), tiny[1]),
                   "model.layers.0.mlp.gate_proj.bias", "mlp_bias")


def test_a_flag_switched_on_without_its_tensors_is_refused(tiny, tmp_path):
    assert_refused(*_ppl(_variant(tiny, tmp_path, {"mlp_bias": True}), tiny[1]),
                   "model.layers.0.mlp.gate_proj.bias is missing")


@pytest.mark.parametrize("changes, words", [
    ({"model_type": "qwen2", "mlp_bias": True}, ("flag mlp_bias=true", "qwen2")),
    ({"model_type": "mistral", "attention_bias": True}, ("flag attention_bias=true", "mistral")),
    ({"model_type": "qwen2", "use_sliding_window": True}, ("use_sliding_window",)),
    ({"mlp_bias": "yes"}, ("mlp_bias must be true or false",)),
])
def test_a_flag_the_family_does_not_support_is_refused(tiny, tmp_path, changes, words):
    assert_refused(*_ppl(_variant(tiny, tmp_path, changes), tiny[1]), "config.json", *words)


def test_derived_rope_buffers_are_accepted(tiny, tmp_path):
    buffer = {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}
    model = _variant(tiny, tmp_path, extra_tensors=buffer)
    runner = ModelRunner.from_dir(model, with_tokenizer=False)
    np.testing.assert_array_equal(runner.logits(IDS), ModelRunner.from_dir(tiny[0], with_tokenizer=False).logits(IDS))
