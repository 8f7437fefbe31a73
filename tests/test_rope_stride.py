"""``--rope-stride``: which source frequencies the MLA RoPE slice rotates at (pair p at θ_{s·p}).

Checked three ways: the fold groups partition the frequencies and feed every pair once; a layer
whose keys live in the span's frequencies only is reproduced exactly by the stride-1 slice (and
not by TransMLA's stride, so the check can fail); and the converted model, its DeepSeek-V3 export
in transformers and the paged engine all rotate the slice at the same frequencies.
"""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from hf_fixtures import add_word_tokenizer, build_hf_model, write_text
from test_transition_exact import convert as _convert
from mindyouzhi.cli import main
from mindyouzhi.errors import UserError
from mindyouzhi.models.runner import ModelRunner
from mindyouzhi.transition.folds import fold_groups, frequency_indices, legal_folds, paper_label, rope_stride
from mindyouzhi.transition.rorope import augmented, rorope_rotation

IDS = np.random.default_rng(11).integers(4, 124, size=(2, 48))
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


# --- the fold groups ------------------------------------------------------------------------------

@pytest.mark.parametrize("head_dim,rope_dim,stride", [(16, 8, 1), (16, 8, 2), (64, 32, 1), (64, 16, 3), (64, 16, 4)])
def test_fold_groups_partition_the_frequencies_and_feed_every_pair_once(head_dim, rope_dim, stride):
    half, pairs = head_dim // 2, rope_dim // 2
    for fold in legal_folds(head_dim, rope_dim, stride=stride):
        groups = fold_groups(head_dim, rope_dim, fold, 2, stride=stride)
        frequencies = [j for g in groups for j in g.frequencies]
        assert sorted(frequencies) == list(range(half)), (fold, groups)
        fed = sorted(p for g in groups for p in g.pairs)
        assert fed == list(range(pairs)), (fold, groups)
        for group in groups:  # a pair rotates at a frequency of its own group: the first s·(pairs kept) of it
            for t, pair in enumerate(group.pairs):
                assert stride * pair in group.frequencies
        beyond = [g for g in groups if min(g.frequencies) >= stride * pairs]
        assert all(not g.pairs for g in beyond)
    assert frequency_indices(head_dim, rope_dim, stride) == [stride * p for p in range(pairs)]


def test_legal_folds_and_labels_follow_the_stride():
    assert legal_folds(64, 32) == [1, 2, 4, 8, 16, 32] == legal_folds(64, 32, stride=2)
    assert legal_folds(64, 32, stride=1) == [1, 2, 4, 8, 16]
    assert [paper_label(f, 64, 32) for f in (1, 2, 4)] == ["exact", "1", "2"]
    assert [paper_label(f, 64, 32, 1) for f in (1, 2, 4)] == ["1", "2", "4"]
    assert rope_stride(64, 32) == 2 and rope_stride(64, 16, 3) == 3
    for bad in (0, 3, True, 1.0):
        with pytest.raises(UserError, match="--rope-stride"):
            rope_stride(64, 32, bad)


# --- exactness on one layer -----------------------------------------------------------------------

def _rope(rows, positions, theta):
    half = rows.shape[1] // 2
    angle = positions[:, None] * theta[None]
    re, im = rows[:, :half], rows[:, half:]
    return np.concatenate([re * np.cos(angle) - im * np.sin(angle), re * np.sin(angle) + im * np.cos(angle)], 1)


@pytest.mark.parametrize("stride", [1, 2])
def test_keys_in_the_span_are_scored_exactly_by_the_stride_one_slice(stride):
    """One KV head, head_dim 8, rope_dim 4: keys with no energy at frequencies 2 and 3.  Stride 1
    rotates the slice at θ_0, θ_1 — the keys' frequencies — so fold 1 reproduces every score;
    TransMLA's stride 2 rotates at θ_0, θ_2 and loses frequency 1's rotation."""
    head_dim, rope_dim, hidden = 8, 4, 12
    rng = np.random.default_rng(0)
    q = rng.normal(size=(head_dim, hidden))
    k = rng.normal(size=(head_dim, hidden))
    k[[2, 3, 6, 7]] = 0.0  # re and im rows of frequencies 2, 3 (rotate-half layout)
    x = np.concatenate([rng.normal(size=(500, hidden)), np.ones((500, 1))], 1)
    q_aug, k_aug = augmented(q, None), augmented(k, None)
    forward, inverse, width = rorope_rotation(k_aug, x.T @ x, 1, head_dim, rope_dim, 1, stride=stride)
    theta = 10000.0 ** (-np.arange(head_dim // 2) * 2 / head_dim)
    positions = np.arange(30, dtype=float) * 37
    tokens = x[:30]
    query, keys = tokens @ q_aug.T, tokens @ k_aug.T
    original = _rope(query, positions, theta) @ _rope(keys, positions, theta).T
    k_lat, q_lat = keys @ forward.T, query @ inverse
    slice_theta = theta[frequency_indices(head_dim, rope_dim, stride)]
    rope_part = _rope(q_lat[:, :width], positions, slice_theta) @ _rope(k_lat[:, :width], positions, slice_theta).T
    scores = rope_part + q_lat[:, width:] @ k_lat[:, width:].T  # position-free components at Δ = 0
    error = np.abs(scores - original).max()
    if stride == 1:
        assert error < 1e-9 * np.abs(original).max()
    else:
        assert error > 1e-2 * np.abs(original).max()


# --- the model, its export and the engine ---------------------------------------------------------

def _slow_keys_zeroed(model_dir, span: int, head_dim: int):
    """Zero every k_proj row (and bias) at frequencies ≥ ``span``: keys that live in the span."""
    from safetensors.numpy import load_file, save_file

    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    half = head_dim // 2
    for name in [n for n in tensors if n.endswith("k_proj.weight") or n.endswith("k_proj.bias")]:
        rows = tensors[name].reshape(-1, head_dim, *tensors[name].shape[1:]).copy()
        rows[:, span:half] = 0.0
        rows[:, half + span:] = 0.0
        tensors[name] = rows.reshape(tensors[name].shape)
    save_file(tensors, path, metadata={"format": "pt"})
    return model_dir


@pytest.fixture(scope="module")
def mqa_models(tmp_path_factory):
    """Tiny one-KV-head models (llama; qwen2 with biases) whose keys live in the 4 fastest of 8 frequencies."""
    root = tmp_path_factory.mktemp("stride")
    calib = write_text(root / "calib.txt", 3000, seed=0)
    models = {kind: add_word_tokenizer(_slow_keys_zeroed(build_hf_model(kind, root / kind, num_key_value_heads=1,
                                                                        **extra), 4, 16))
              for kind, extra in (("llama", {"rope_parameters": LLAMA3_ROPE}), ("qwen2", {}))}
    return models, calib


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_stride_one_stage1_reproduces_a_model_whose_keys_live_in_the_span(mqa_models, kind, tmp_path):
    models, calib = mqa_models
    original = ModelRunner.from_dir(models[kind], with_tokenizer=False).logits(IDS)
    # fp32 forward passes: the auto choice below must see a KL of 0 for the exact plan, which bf16 passes
    # (`auto` on a CPU with native bf16) would blur to ~1e-4
    fp32 = ("--forward-precision", "fp32")
    report = _convert(models[kind], tmp_path / "s1", calib, "--rope-dim", "8", "--rope-stride", "1", "--freqfold", "1",
                      "--stage", "1", "--nope-rotation", "none", *fp32)
    assert report["rope_stride"] == 1 and report["fold_plan"] == [1, 1]
    assert json.loads((tmp_path / "s1" / "config.json").read_text())["mla"]["rope_stride"] == 1
    stride1 = ModelRunner.from_dir(tmp_path / "s1", with_tokenizer=False).logits(IDS)
    np.testing.assert_allclose(stride1, original, atol=1e-4, rtol=0)
    report = _convert(models[kind], tmp_path / "s2", calib, "--rope-dim", "8", "--rope-stride", "2", "--freqfold", "1",
                      "--stage", "1", "--nope-rotation", "none")
    assert report["rope_stride"] == 2 and "position_choice" not in report
    assert "rope_stride" not in json.loads((tmp_path / "s2" / "config.json").read_text())["mla"]
    transmla = ModelRunner.from_dir(tmp_path / "s2", with_tokenizer=False).logits(IDS)
    assert np.abs(transmla - original).max() > 1e-2  # TransMLA's slice drops frequency 1's rotation: not vacuous
    # auto (the default) scores both strides' plans as written and keeps the exact one (KL 0; perplexity
    # would not do: on the random text of an untrained model a lossy conversion may score lower)
    report = _convert(models[kind], tmp_path / "auto", calib, "--rope-dim", "8", "--freqfold", "uniform", "--folds", "1",
                      "--stage", "1", "--nope-rotation", "none", "--search-tokens", "512", "--criterion", "kl", *fp32)
    choice = report["position_choice"]
    assert choice["chosen"] == {"rope_stride": 1, "nope_rotation": "none"} and report["rope_stride"] == 1
    assert [c["rope_stride"] for c in choice["candidates"]] == [2, 1]
    assert choice["requested"] == {"rope_stride": "auto", "nope_rotation": "none"}
    scores = {c["rope_stride"]: c["score"] for c in choice["candidates"]}
    assert scores[1] < 1e-6 < scores[2]
    auto = ModelRunner.from_dir(tmp_path / "auto", with_tokenizer=False).logits(IDS)
    np.testing.assert_array_equal(auto, stride1)


def test_stride_one_export_and_paged_decode_rotate_at_the_same_frequencies(mqa_models, tmp_path):
    """A stride-1 low-rank conversion of a llama3-scaled model: transformers' DeepSeek-V3 on the export
    (rope_theta = base^(rope_dim/head_dim)) and our paged decode both give the converted model's logits."""
    from test_export_deepseek import _assert_paged_decode_equals_forward, transformers_logits

    from mindyouzhi.export.deepseek import export_deepseek_v3

    models, calib = mqa_models
    out = tmp_path / "mla"
    _convert(models["llama"], out, calib, "--rope-dim", "8", "--rope-stride", "1", "--freqfold", "2",
             "--kv-lora-rank", "12")
    export_deepseek_v3(out, tmp_path / "ds")
    config = json.loads((tmp_path / "ds" / "config.json").read_text())
    source = json.loads((models["llama"] / "config.json").read_text())
    theta = (source.get("rope_parameters") or {}).get("rope_theta") or source["rope_theta"]
    assert config["rope_theta"] == pytest.approx(theta ** 0.5, rel=1e-12)
    runner = ModelRunner.from_dir(out)
    np.testing.assert_allclose(transformers_logits(tmp_path / "ds", IDS), runner.logits(IDS), atol=1e-4, rtol=0)
    _assert_paged_decode_equals_forward(runner, IDS[0, :20].tolist(), "custom")


def test_bad_stride_and_a_plan_for_another_stride_are_refused(mqa_models, tmp_path):
    models, calib = mqa_models
    args = ["convert", "--model", str(models["llama"]), "--calib", str(calib), "--rope-dim", "8",
            "--calib-tokens", "1024", "--calib-seq-len", "64"]
    result = CliRunner().invoke(main, args + ["--out", str(tmp_path / "a"), "--rope-stride", "3", "--freqfold", "2"])
    assert result.exit_code == 2 and "--rope-stride 3" in result.output and not (tmp_path / "a").exists()
    result = CliRunner().invoke(main, args + ["--out", str(tmp_path / "b"), "--rope-stride", "1", "--freqfold", "32"])
    assert result.exit_code == 2 and "--freqfold 32" in result.output and "stride 1" in result.output
    _convert(models["llama"], tmp_path / "c", calib, "--rope-dim", "8", "--rope-stride", "1", "--freqfold", "2",
             "--stage", "1")
    plan = ["--plan", str(tmp_path / "c" / "report.json")]
    result = CliRunner().invoke(main, args + ["--out", str(tmp_path / "d"), "--rope-stride", "2", *plan])
    assert result.exit_code == 2 and "--rope-stride 1" in result.output and not (tmp_path / "d").exists()
    report = _convert(models["llama"], tmp_path / "e", calib, "--rope-dim", "8", "--stage", "1", *plan)  # auto: the plan's
    assert report["rope_stride"] == 1 and report["fold_plan"] == [2, 2]
