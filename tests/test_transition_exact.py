"""Exactness of every lossless step of the GQA → MLA transition, against the original model."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from hf_fixtures import tiny_convertible, write_text
from mindyouzhi.cli import main
from mindyouzhi.models.generation import DecodeState, forward_cached
from mindyouzhi.models.runner import ModelRunner

IDS = np.random.default_rng(3).integers(4, 124, size=(2, 48))


def convert(model, out, calib, *args):
    result = CliRunner().invoke(main, ["convert", "--model", str(model), "--out", str(out), "--calib", str(calib),
                                       "--calib-tokens", "1024", "--calib-seq-len", "64", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("exact")
    calib = write_text(root / "calib.txt", 3000, seed=0)
    return {kind: tiny_convertible(root / kind, kind) for kind in ("llama", "qwen2")}, calib


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_rorope_with_rope_on_every_component_is_exact(models, kind, tmp_path):
    """(a) rope_dim = head_dim, f = 1, RoPE kept on every rotated component ⇒ original logits."""
    dirs, calib = models
    report = convert(dirs[kind], tmp_path / "out", calib, "--rope-all", "--freqfold", "1", "--kv-lora-rank", "full",
                     "--stage", "1")
    original = ModelRunner.from_dir(dirs[kind], with_tokenizer=False).logits(IDS)
    converted = ModelRunner.from_dir(tmp_path / "out", with_tokenizer=False).logits(IDS)
    assert report["fold_plan"] == [1, 1]
    np.testing.assert_allclose(converted, original, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("fold,lowrank", [(1, "output"), (2, "output"), (4, "output"), (2, "bkv"), (2, "care")])
def test_stage2_at_full_rank_reproduces_stage1(models, kind, fold, lowrank, tmp_path):
    """(b) the joint low-rank step at full rank is an invertible change of basis: logits unchanged."""
    dirs, calib = models
    convert(dirs[kind], tmp_path / "s1", calib, "--rope-dim", "8", "--freqfold", str(fold), "--stage", "1")
    convert(dirs[kind], tmp_path / "s2", calib, "--rope-dim", "8", "--freqfold", str(fold), "--kv-lora-rank", "full",
            "--lowrank", lowrank)
    stage1 = ModelRunner.from_dir(tmp_path / "s1", with_tokenizer=False).logits(IDS)
    stage2 = ModelRunner.from_dir(tmp_path / "s2", with_tokenizer=False).logits(IDS)
    original = ModelRunner.from_dir(dirs[kind], with_tokenizer=False).logits(IDS)
    assert np.abs(stage1 - original).max() > 1e-2  # partial RoPE is lossy: the check below is not vacuous
    np.testing.assert_allclose(stage2, stage1, atol=1e-4, rtol=0)


def test_sequential_statistics_full_rank_reproduces_its_stage1(models, tmp_path):
    """One stream through the converted layers (--statistics sequential): at full rank every layer is
    its stage-1 layer, so the stream and the statistics — profile included — match the stage-1 run."""
    dirs, calib = models
    # fp32 forward passes: the stream runs through the final layers, equal to stage 1 only in exact
    # arithmetic (bf16 would round their different matrices differently)
    args = ("--rope-dim", "8", "--freqfold", "2", "--statistics", "sequential", "--forward-precision", "fp32")
    report = convert(dirs["llama"], tmp_path / "s1", calib, *args, "--stage", "1")
    convert(dirs["llama"], tmp_path / "s2", calib, *args, "--kv-lora-rank", "full")
    two_stream = convert(dirs["llama"], tmp_path / "ts", calib, "--rope-dim", "8", "--freqfold", "2", "--stage", "1",
                         "--forward-precision", "fp32", "--statistics", "two-stream")
    assert report["statistics"] == "sequential"
    assert report["position_choice"]["requested"] == {"rope_stride": "auto", "nope_rotation": "auto"}
    stage1 = ModelRunner.from_dir(tmp_path / "s1", with_tokenizer=False).logits(IDS)
    stage2 = ModelRunner.from_dir(tmp_path / "s2", with_tokenizer=False).logits(IDS)
    other = ModelRunner.from_dir(tmp_path / "ts", with_tokenizer=False).logits(IDS)
    assert two_stream["statistics"] == "two-stream" and np.abs(other - stage1).max() > 1e-4  # the streams differ
    np.testing.assert_allclose(stage2, stage1, atol=1e-4, rtol=0)


@pytest.mark.parametrize("latent_norm", [False, True])
def test_absorbed_decode_equals_expanded_forward_and_cache_size(models, latent_norm, tmp_path):
    """(c) token-by-token absorbed decode = expanded forward; (e) cache = kv_lora_rank + rope_dim."""
    dirs, calib = models
    args = ["--rope-dim", "8", "--freqfold", "2", "--kv-lora-rank", "24"] + (["--latent-norm"] if latent_norm else [])
    report = convert(dirs["qwen2"], tmp_path / "mla", calib, *args)
    runner = ModelRunner.from_dir(tmp_path / "mla", with_tokenizer=False)
    expanded = runner.logits(IDS[:1])
    state = DecodeState()
    steps = [forward_cached(runner, IDS[:1, :7], state)]
    steps += [forward_cached(runner, IDS[:1, t:t + 1], state) for t in range(7, IDS.shape[1])]
    np.testing.assert_allclose(np.concatenate(steps, 1), expanded, atol=1e-4, rtol=0)
    assert [cache.values_per_token() for cache in state.caches] == [24 + 8, 24 + 8]
    assert [cache.tokens() for cache in state.caches] == [IDS.shape[1]] * 2
    assert report["kv_values_per_token_per_layer"] == {"before": [64, 64], "after": [32, 32]}


def test_save_load_roundtrip_reproduces_in_memory_model(models, tmp_path):
    """(d) the written dir reproduces the converted weights exactly (float32 on disk)."""
    from mindyouzhi.convert_weights.safetensors_io import SafetensorsStore
    from mindyouzhi.models.config import ModelConfig
    from mindyouzhi.transition.calibration import GramCache, text_windows
    from mindyouzhi.transition.pipeline import ConversionPlan, convert_streaming
    from mindyouzhi.tokenizer import load_tokenizer

    dirs, calib = models
    out = tmp_path / "mem"
    out.mkdir()
    windows = text_windows(load_tokenizer(dirs["llama"]), calib, 1024, 64, 42, "--calib")
    plan = ConversionPlan(rope_dim=8, fold_plan=[4, 2], kv_lora_rank=40)
    result = convert_streaming(dirs["llama"], out, plan, windows, keep_stage1=True)
    (out / "config.json").write_text(json.dumps(result.config.to_hf_dict()))
    loaded = ModelConfig.from_dir(out)
    assert loaded.mla.fold_plan == [4, 2] and loaded.mla.kv_lora_rank == [40, 40]
    store = SafetensorsStore(out)
    assert "model.layers.0.self_attn.kv_b_proj.weight" in store
    assert store.shape("model.layers.1.self_attn.kv_a_proj_with_mqa.weight") == (40 + 8, 64)
    on_disk = ModelRunner.from_dir(out, with_tokenizer=False).logits(IDS)
    in_memory = ModelRunner.from_weights(loaded, {k: store.get(k) for k in store.keys()}).logits(IDS)
    np.testing.assert_array_equal(on_disk, in_memory)


@pytest.mark.shared
def test_exactness_ladder_on_stories260k(shared_dir, tmp_path):
    """(a) and (b) on a real pretrained model (stories260K, 5 layers, head_dim 8, 4 KV heads)."""
    from mindyouzhi.convert_weights.llama2c import import_llama2c

    base = shared_dir / "models" / "stories260K"
    model = tmp_path / "stories"
    import_llama2c(base / "stories260K.bin", base / "tok512.bin", model)
    calib = shared_dir / "data" / "wikitext-2" / "wiki.valid.tokens"
    ids = np.random.default_rng(5).integers(3, 512, size=(1, 96))
    original = ModelRunner.from_dir(model, with_tokenizer=False).logits(ids)
    convert(model, tmp_path / "all", calib, "--rope-all", "--freqfold", "1", "--kv-lora-rank", "full", "--stage", "1")
    np.testing.assert_allclose(ModelRunner.from_dir(tmp_path / "all", with_tokenizer=False).logits(ids), original,
                               atol=1e-4, rtol=0)
    convert(model, tmp_path / "s1", calib, "--rope-dim", "4", "--freqfold", "2", "--stage", "1")
    convert(model, tmp_path / "s2", calib, "--rope-dim", "4", "--freqfold", "2", "--kv-lora-rank", "full")
    stage1 = ModelRunner.from_dir(tmp_path / "s1", with_tokenizer=False).logits(ids)
    np.testing.assert_allclose(ModelRunner.from_dir(tmp_path / "s2", with_tokenizer=False).logits(ids), stage1,
                               atol=1e-4, rtol=0)


def test_stage1_stream_statistics_full_rank_reproduces_its_stage1(models, tmp_path):
    """One stream through the stage-1 layers (--statistics stage1-stream): stage 1 and the stage-2
    statistics of layer l both come from it, so at full rank stage 2 is a change of basis of the
    stage-1 model built from that same stream, and the stream differs from two-stream's."""
    dirs, calib = models
    args = ("--rope-dim", "8", "--freqfold", "2", "--statistics", "stage1-stream")
    report = convert(dirs["qwen2"], tmp_path / "s1", calib, *args, "--stage", "1")
    convert(dirs["qwen2"], tmp_path / "s2", calib, *args, "--kv-lora-rank", "full")
    convert(dirs["qwen2"], tmp_path / "ts", calib, "--rope-dim", "8", "--freqfold", "2", "--stage", "1",
            "--statistics", "two-stream")
    assert report["statistics"] == "stage1-stream"
    stage1 = ModelRunner.from_dir(tmp_path / "s1", with_tokenizer=False).logits(IDS)
    stage2 = ModelRunner.from_dir(tmp_path / "s2", with_tokenizer=False).logits(IDS)
    other = ModelRunner.from_dir(tmp_path / "ts", with_tokenizer=False).logits(IDS)
    assert np.abs(other - stage1).max() > 1e-4  # layer 1's stage 1 saw layer 0's stage-1 errors
    np.testing.assert_allclose(stage2, stage1, atol=1e-4, rtol=0)
