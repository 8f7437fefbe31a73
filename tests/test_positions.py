"""Expected rotation of the position-free key components (``--nope-rotation mean|auto``).

The distance profile is checked against the attention probabilities of HF ``transformers`` (eager),
the rotation algebra against an independent RoPE written here, the stage-1 plumbing against
TransMLA's Δ = 0 layer, and ``auto``'s scores against the perplexity of the models it chooses between.
"""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from hf_fixtures import build_hf_model, tiny_convertible, write_text
from mindyouzhi.cli import main
from mindyouzhi.convert_weights.safetensors_io import SafetensorsStore
from mindyouzhi.models.config import ModelConfig
from mindyouzhi.models.decoder import read_layer_weights
from mindyouzhi.transition.calibration import GramCache, layer_gram
from mindyouzhi.transition.layers import convert_stage1
from mindyouzhi.transition.positions import distance_profile, expected_rotation
from mindyouzhi.transition.rorope import rotate_queries

HEADS, HEAD_DIM, THETA = 4, 16, 10000.0


def config_with(rope_scaling=None) -> ModelConfig:
    data = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128, "hidden_size": 64,
            "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": HEADS, "num_key_value_heads": 2,
            "head_dim": HEAD_DIM, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": THETA}
    if rope_scaling:
        data["rope_scaling"] = rope_scaling
    return ModelConfig.from_dict(data)


def rope(vector, position, scale=1.0):
    """Rotate-half RoPE at one position, θ_j = THETA^(−2j/d) / scale (independent of mindyouzhi)."""
    half = HEAD_DIM // 2
    angle = position * THETA ** (-np.arange(half) * 2.0 / HEAD_DIM) / scale
    re, im = vector[:half], vector[half:]
    return np.concatenate([re * np.cos(angle) - im * np.sin(angle), re * np.sin(angle) + im * np.cos(angle)])


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0}])
def test_expected_rotation_is_the_attention_weighted_relative_rotation(scaling):
    """q' = Mᵀq gives q'·k = Σ_Δ p(Δ) RoPE(q, t)·RoPE(k, t − Δ) for any profile p (here 3 distances)."""
    config = config_with(scaling)
    scale = scaling["factor"] if scaling else 1.0
    rng = np.random.default_rng(0)
    profile = np.zeros((HEADS, 64))
    distances, weights = [0, 5, 37], [0.5, 0.3, 0.2]
    profile[:, distances] = weights
    cbar, sbar = expected_rotation(profile, config)
    for head in range(HEADS):
        q, k = rng.normal(size=HEAD_DIM), rng.normal(size=HEAD_DIM)
        t = 50
        expected = sum(w * rope(q, t, scale) @ rope(k, t - d, scale) for d, w in zip(distances, weights))
        rotated = rotate_queries(q[:, None], cbar[head], sbar[head])[:, 0]
        np.testing.assert_allclose(rotated @ k, expected, rtol=1e-6)  # float32 frequencies
        assert abs(q @ k - expected) > 1e-3  # TransMLA's Δ = 0 differs: the check above is not vacuous


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # qwen2: q/k biases
def test_distance_profile_equals_transformers_attention(kind, tmp_path):
    """Per head, the mean over queries of the attention mass at each distance, from HF's own probabilities."""
    import torch
    import transformers

    model_dir = build_hf_model(kind, tmp_path / kind)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    ids = np.random.default_rng(1).integers(4, 124, size=(3, 24))
    with torch.no_grad():
        out = model(torch.tensor(ids), output_attentions=True, output_hidden_states=True)
    config = ModelConfig.from_dir(model_dir)
    store = SafetensorsStore(model_dir)
    for layer in range(config.num_hidden_layers):
        probs = out.attentions[layer].numpy()  # [B, H, S, S]
        length = probs.shape[-1]
        reference = np.zeros((config.num_attention_heads, length))
        for d in range(length):
            reference[:, d] = np.stack([np.diagonal(p, -d, axis1=-2, axis2=-1).sum(-1) for p in probs]).sum(0)
        reference /= probs.shape[0] * length
        hidden = out.hidden_states[layer].numpy()
        profile = distance_profile(hidden, read_layer_weights(store, config, layer), config)
        np.testing.assert_allclose(profile.sum(1), 1.0, atol=1e-6)
        np.testing.assert_allclose(profile, reference, atol=2e-6)


def test_all_attention_at_distance_zero_is_transmla_stage1(tmp_path):
    """With every head attending only to itself the expected rotation is the identity: same layer as none."""
    model_dir = build_hf_model("llama", tmp_path / "llama")
    config = ModelConfig.from_dir(model_dir)
    layer = read_layer_weights(SafetensorsStore(model_dir), config, 0)
    hidden = np.random.default_rng(2).normal(size=(4, 32, config.hidden_size)).astype(np.float32)
    gram = layer_gram(hidden, layer, config.rms_norm_eps)[0]
    at_zero = np.zeros((config.num_attention_heads, 32))
    at_zero[:, 0] = 1.0
    plain = convert_stage1(config, layer, gram, 2, 8)
    same = convert_stage1(config, layer, gram, 2, 8, profile=at_zero)
    spread = convert_stage1(config, layer, gram, 2, 8, profile=distance_profile(hidden, layer, config))
    for name, value in plain.weights.items():
        np.testing.assert_allclose(same.weights[name], value, atol=1e-12)
        if name != "self_attn.q_proj.weight":  # only the position-free query rows move
            np.testing.assert_array_equal(spread.weights[name], value)
    assert np.abs(spread.weights["self_attn.q_proj.weight"] - plain.weights["self_attn.q_proj.weight"]).max() > 1e-3


def test_gram_cache_keeps_profiles_next_to_grams(tmp_path):
    cache = GramCache(tmp_path / "grams")
    cache[0] = np.eye(3)
    assert cache.profile(0) is None
    cache.set_profile(0, np.full((2, 5), 0.2))
    np.testing.assert_array_equal(GramCache(tmp_path / "grams").profile(0), np.full((2, 5), 0.2))
    assert 0 in cache and 1 not in cache


def test_cli_reports_the_choice_and_none_keeps_the_partial_rope_layer(tmp_path):
    """mean and none differ only in the query rows; auto (the default) scores both plans and writes the
    better one exactly (calibration windows here: a fixed fold runs no search)."""
    model = tiny_convertible(tmp_path, "llama")
    calib = write_text(tmp_path / "calib.txt", 3000, seed=0)
    reports = {}
    for choice in ("mean", "none", "auto"):
        args = ["convert", "--model", str(model), "--out", str(tmp_path / choice), "--calib", str(calib),
                "--calib-tokens", "1024", "--calib-seq-len", "64", "--rope-dim", "8", "--freqfold", "2",
                "--stage", "1", "--search-tokens", "512", "--rope-stride", "2", "--json"] + (
                    [] if choice == "auto" else ["--nope-rotation", choice])
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        reports[choice] = json.loads(result.stdout)
        assert reports[choice]["nope_rotation"] == choice or choice == "auto"
    stores = {c: SafetensorsStore(tmp_path / c) for c in reports}
    name = "model.layers.0.self_attn.q_proj.weight"
    assert np.abs(stores["mean"].get(name) - stores["none"].get(name)).max() > 1e-3
    kv = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    np.testing.assert_array_equal(stores["mean"].get(kv), stores["none"].get(kv))
    choice = reports["auto"]["position_choice"]
    human = CliRunner().invoke(main, args[:-1] + ["--overwrite"])  # the same conversion, summary for people
    assert human.exit_code == 0 and (f"position layout: auto → RoPE stride 2, position-free rotation "
                                     f"{choice['chosen']['nope_rotation']}") in human.output
    assert choice["windows"] == [8, 64] and choice["requested"] == {"rope_stride": 2, "nope_rotation": "auto"}
    assert [(c["rope_stride"], c["nope_rotation"], c["fold"]) for c in choice["candidates"]] == [(2, "mean", 2),
                                                                                                (2, "none", 2)]
    scores = {c["nope_rotation"]: c["score"] for c in choice["candidates"]}
    assert scores["mean"] != scores["none"]
    chosen = min(scores, key=scores.get)
    assert choice["chosen"] == {"rope_stride": 2, "nope_rotation": chosen}
    assert reports["auto"]["nope_rotation"] == chosen
    for key in stores["auto"].keys():
        np.testing.assert_array_equal(stores["auto"].get(key), stores[chosen].get(key))
    bad = CliRunner().invoke(main, ["convert", "--model", str(model), "--out", str(tmp_path / "bad"), "--calib",
                                    str(calib), "--nope-rotation", "median"])
    assert bad.exit_code == 2 and "--nope-rotation" in bad.output
    assert not (tmp_path / "bad").exists()


def test_auto_scores_the_plans_it_chooses_between(tmp_path):
    """Each score of the choice — every RoPE stride × rotation — is the perplexity of that layout's
    written model on the same windows, and the chosen layout's model is the one written."""
    from mindyouzhi.eval.ppl import perplexity
    from mindyouzhi.models.runner import ModelRunner
    from mindyouzhi.tokenizer import load_tokenizer
    from mindyouzhi.transition.calibration import text_windows

    model = tiny_convertible(tmp_path, "llama")
    calib = write_text(tmp_path / "calib.txt", 3000, seed=0)
    common = ["--calib", str(calib), "--calib-tokens", "1024", "--calib-seq-len", "64", "--rope-dim", "8",
              "--freqfold", "uniform", "--folds", "4", "--kv-lora-rank", "24", "--search-tokens", "256",
              "--search-seq-len", "64", "--forward-precision", "fp32", "--json"]
    auto = CliRunner().invoke(main, ["convert", "--model", str(model), "--out", str(tmp_path / "auto"), *common])
    assert auto.exit_code == 0, auto.output
    report = json.loads(auto.stdout)
    choice = report["position_choice"]
    assert [(c["rope_stride"], c["nope_rotation"]) for c in choice["candidates"]] == [
        (2, "mean"), (2, "none"), (1, "mean"), (1, "none")]
    # the uniform search took the chosen layout's plan over: its score, and no stream of its own
    chosen_score = next(c["score"] for c in choice["candidates"]
                        if {"rope_stride": c["rope_stride"], "nope_rotation": c["nope_rotation"]} == choice["chosen"])
    assert report["search"]["uniform_scores"] == {"4": chosen_score}
    assert report["search"]["calibration_streams"] == 0
    windows = text_windows(load_tokenizer(model), calib, 256, 64, 43, "--calib")  # the search windows
    assert list(windows.shape) == [4, 64] and choice["windows"] == [4, 64]
    for candidate in choice["candidates"]:
        stride, rotation = candidate["rope_stride"], candidate["nope_rotation"]
        out = tmp_path / f"{stride}-{rotation}"
        result = CliRunner().invoke(main, ["convert", "--model", str(model), "--out", str(out), *common,
                                           "--rope-stride", str(stride), "--nope-rotation", rotation])
        assert result.exit_code == 0, result.output
        ppl = perplexity(ModelRunner.from_dir(out, with_tokenizer=False), windows).ppl
        assert candidate["score"] == pytest.approx(ppl, rel=1e-4)
        if {"rope_stride": stride, "nope_rotation": rotation} == choice["chosen"]:  # written from its statistics
            written = SafetensorsStore(tmp_path / "auto")
            for key in written.keys():
                np.testing.assert_array_equal(written.get(key), SafetensorsStore(out).get(key))
