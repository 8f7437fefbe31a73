"""The bf16 dense kernel (ops/bf16) against PyTorch's bfloat16, and --forward-precision."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mindspore import Tensor

from hf_fixtures import tiny_convertible, write_text
from mindyouzhi.cli import main
from mindyouzhi.errors import UserError
from mindyouzhi.models.config import ModelConfig
from mindyouzhi.models.decoder import RopeTables, layer_function, read_layer_weights
from mindyouzhi.convert_weights.safetensors_io import SafetensorsStore
from mindyouzhi.models.layers import causal_mask, to_tensor
from mindyouzhi.ops import bf16, build
from mindyouzhi.transition import calibration

RNG = np.random.default_rng(7)

pytestmark = pytest.mark.skipif(bf16.unavailable() is not None,
                                reason=f"bf16 dense kernel unavailable here: {bf16.unavailable()}")


def torch_bf16(array: np.ndarray) -> np.ndarray:
    """The independent reference of the rounding: PyTorch's float32 → bfloat16 (nearest even)."""
    return torch.from_numpy(np.ascontiguousarray(array, np.float32)).to(torch.bfloat16).to(torch.float32).numpy()


def test_rounding_is_pytorch_bfloat16_including_ties_and_specials():
    values = np.concatenate([RNG.standard_normal(5000).astype(np.float32) * 10.0 ** RNG.integers(-30, 30, 5000),
                             np.array([0.0, -0.0, np.inf, -np.inf, 1.0, 3.4e38, 1e-40, -1e-42], np.float32),
                             # exact ties between two bf16 neighbours: round to the even one
                             (np.array([0x3F808000, 0x3F818000, 0xBF808000], np.uint32)).view(np.float32)])
    np.testing.assert_array_equal(bf16.round_to_bf16(values), torch_bf16(values))
    assert np.isnan(bf16.round_to_bf16(np.array([np.nan], np.float32)))[0]


@pytest.mark.parametrize("shape", [(7, 40, 5), (2, 33, 64, 96), (1, 1, 3), (3, 129, 576, 192)])
def test_kernel_is_the_product_of_bf16_operands_accumulated_in_fp32(shape):
    *lead, k, n = shape
    x = RNG.standard_normal((*lead, k)).astype(np.float32)
    w = RNG.standard_normal((n, k)).astype(np.float32)
    b = RNG.standard_normal(n).astype(np.float32)
    got = bf16.dense(Tensor(x), Tensor(w), Tensor(b)).asnumpy()
    assert got.shape == (*lead, n)
    reference = torch.nn.functional.linear(torch.from_numpy(torch_bf16(x)).double(),
                                           torch.from_numpy(torch_bf16(w)).double(), torch.from_numpy(b).double()).numpy()
    scale = np.sqrt(k) * np.abs(x).max() * np.abs(w).max()
    assert np.abs(got - reference).max() <= 1e-5 * scale  # fp32 accumulation of exact bf16 products
    if k > 8:  # and it really is bf16: the fp32 product differs by the rounding of the operands
        assert np.abs(got - (x @ w.T + b)).max() > 1e2 * 1e-7 * scale


def test_prerounded_weights_give_the_same_product():
    x = RNG.standard_normal((3, 17, 48)).astype(np.float32)
    w = RNG.standard_normal((20, 48)).astype(np.float32)
    packed = bf16.bf16_bits(w)
    assert packed.dtype == np.uint16
    np.testing.assert_array_equal(bf16.dense(Tensor(x), Tensor(packed)).asnumpy(), bf16.dense(Tensor(x), Tensor(w)).asnumpy())
    with pytest.raises(RuntimeError):  # int32 is neither float32 nor packed bf16
        bf16.dense(Tensor(x), Tensor(packed.astype(np.int32))).asnumpy()


def rope_last(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [B, T, N, d] with its last 2·half components turned (rotate-half pairing), in float64."""
    half = cos.shape[1]
    x = x.astype(np.float64)
    if half == 0:
        return x
    plain = x.shape[-1] - 2 * half
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    x1, x2 = x[..., plain:plain + half], x[..., plain + half:]
    return np.concatenate([x[..., :plain], x1 * c - x2 * s, x2 * c + x1 * s], -1)


@pytest.mark.parametrize("batch,heads,groups,length,dk,dv,half", [(2, 4, 2, 100, 24, 16, 12), (1, 3, 3, 64, 40, 40, 4),
                                                                   (3, 9, 3, 130, 64, 64, 32), (1, 2, 1, 1, 8, 8, 0)])
def test_causal_attention_is_torch_sdpa_on_bf16_operands(batch, heads, groups, length, dk, dv, half):
    q = RNG.standard_normal((batch, length, heads, dk)).astype(np.float32)
    k = RNG.standard_normal((batch, length, groups, dk)).astype(np.float32)
    v = RNG.standard_normal((batch, length, groups, dv)).astype(np.float32)
    angles = RNG.uniform(0, 6.3, (length, half))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    scale = 1.0 / np.sqrt(dk)
    got = bf16.causal_attention(*(Tensor(a) for a in (q, k, v, cos, sin)), scale).asnumpy()
    assert got.shape == (batch, length, heads * dv)
    repeat = heads // groups  # head h reads group h // (H / G), as in transformers' repeat_kv

    def sdpa(q, k, v):  # [B, T, N, d] float64 → [B, T, H·dv]
        q, k, v = (torch.from_numpy(np.ascontiguousarray(a.transpose(0, 2, 1, 3))) for a in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(repeat, 1),
                                                               v.repeat_interleave(repeat, 1), is_causal=True, scale=scale)
        return out.transpose(1, 2).reshape(batch, length, heads * dv).numpy()

    turned_q, turned_k = rope_last(q, cos, sin), rope_last(k, cos, sin)
    reference = sdpa(torch_bf16(turned_q).astype(np.float64), torch_bf16(turned_k).astype(np.float64),
                     torch_bf16(v).astype(np.float64))
    # the probabilities are rounded to bf16 for the second product (relative 2^-9 each)
    assert np.abs(got - reference).max() <= 1e-2 * np.abs(v).max()
    exact = sdpa(turned_q, turned_k, v.astype(np.float64))
    if length > 1:
        assert np.abs(got - exact).max() > 1e-4  # bf16 operands, not fp32
    first = torch_bf16(v)[:, 0][:, np.arange(heads) // repeat].reshape(batch, heads * dv)  # row 0 sees key 0 only
    np.testing.assert_allclose(got[:, 0], first, rtol=1e-6, atol=1e-6)


def test_kernel_rejects_mismatched_shapes():
    with pytest.raises(RuntimeError):
        bf16.dense(Tensor(np.ones((2, 8), np.float32)), Tensor(np.ones((4, 9), np.float32))).asnumpy()


def test_a_bf16_layer_is_the_fp32_layer_up_to_bf16_rounding(tmp_path):
    model = tiny_convertible(tmp_path, "qwen2")  # biases too
    config = ModelConfig.from_dir(model)
    weights = read_layer_weights(SafetensorsStore(model), config, 0)
    tables = [to_tensor(t) for t in RopeTables(config)(16)]
    x = to_tensor(RNG.standard_normal((2, 16, config.hidden_size)).astype(np.float32))
    mask = to_tensor(causal_mask(16))
    fp32 = layer_function(config, 0, weights, "fp32")(x, *tables, mask).asnumpy() - x.asnumpy()  # the layer's update
    low = layer_function(config, 0, weights, "bf16")(x, *tables, mask).asnumpy() - x.asnumpy()
    difference = np.abs(fp32 - low).max() / np.abs(fp32).max()
    assert 1e-5 < difference < 2e-2


def test_a_bf16_mla_layer_is_the_fp32_layer_up_to_bf16_rounding(tmp_path):
    from mindyouzhi.transition.layers import convert_stage1, full_rank, hybrid_config
    from mindyouzhi.transition.calibration import layer_gram

    model = tiny_convertible(tmp_path, "llama")
    config = ModelConfig.from_dir(model)
    weights = read_layer_weights(SafetensorsStore(model), config, 0)
    x = RNG.standard_normal((2, 16, config.hidden_size)).astype(np.float32)
    stage1 = convert_stage1(config, weights, layer_gram(x, weights, config.rms_norm_eps)[0], 2, 8)
    layers = config.num_hidden_layers
    mla = hybrid_config(config, [2] * layers, [full_rank(config, 8)] * layers, 8, stage=1)
    tables = [to_tensor(t) for t in RopeTables(mla)(16)]
    mask = to_tensor(causal_mask(16))
    fp32 = layer_function(mla, 0, stage1.weights, "fp32")(to_tensor(x), *tables, mask).asnumpy() - x  # the update
    low = layer_function(mla, 0, stage1.weights, "bf16")(to_tensor(x), *tables, mask).asnumpy() - x
    difference = np.abs(fp32 - low).max() / np.abs(fp32).max()
    assert 1e-5 < difference < 2e-2


def test_auto_falls_back_to_fp32_with_the_reason_and_bf16_refuses(monkeypatch):
    assert calibration.resolve_forward_precision("fp32") == ("fp32", None)
    with pytest.raises(UserError, match="--forward-precision fp16"):
        calibration.resolve_forward_precision("fp16")
    monkeypatch.setattr(bf16, "native_bf16", lambda: False)
    precision, reason = calibration.resolve_forward_precision("auto")
    assert precision == "fp32" and "avx512_bf16" in reason
    assert calibration.resolve_forward_precision("bf16") == ("bf16", None)  # asked for: emulated, but allowed
    monkeypatch.setattr(bf16, "unavailable", lambda: "g++ not found: …")
    assert calibration.resolve_forward_precision("auto") == ("fp32", "g++ not found: …")
    with pytest.raises(UserError, match="--forward-precision bf16: g\\+\\+ not found"):
        calibration.resolve_forward_precision("bf16")


def test_missing_compiler_makes_the_kernel_unavailable(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    monkeypatch.setenv("MINDYOUZHI_CACHE_DIR", str(tmp_path / "cache"))
    for cached in (bf16.kernel_library, bf16.primitive, bf16.unavailable):
        cached.cache_clear()
    try:
        assert bf16.unavailable().startswith("g++ not found")
        with pytest.raises(build.KernelBuildError):
            bf16.kernel_library()
    finally:
        for cached in (bf16.kernel_library, bf16.primitive, bf16.unavailable):
            cached.cache_clear()


def test_cli_records_the_precision_and_full_rank_stays_exact_with_bf16_streams(tmp_path):
    from mindyouzhi.models.runner import ModelRunner

    model = tiny_convertible(tmp_path, "llama")
    calib = write_text(tmp_path / "calib.txt", 3000, seed=0)
    ids = RNG.integers(4, 124, (2, 24)).astype(np.int32)

    def convert(out, precision, *args):
        result = CliRunner().invoke(main, ["convert", "--model", str(model), "--out", str(out), "--calib", str(calib),
                                           "--calib-tokens", "1024", "--calib-seq-len", "64", "--rope-dim", "8",
                                           "--freqfold", "2", "--forward-precision", precision, "--json", *args])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["forward_precision"] == {"used": precision, "requested": precision, "fallback_reason": None}
        return ModelRunner.from_dir(out, with_tokenizer=False).logits(ids)

    stage1 = {p: convert(tmp_path / f"s1-{p}", p, "--stage", "1") for p in ("bf16", "fp32")}
    stage2 = convert(tmp_path / "s2-bf16", "bf16", "--kv-lora-rank", "full")
    np.testing.assert_allclose(stage2, stage1["bf16"], atol=1e-4, rtol=0)  # stage 2 at full rank: a change of basis
    assert np.abs(stage1["bf16"] - stage1["fp32"]).max() > 1e-5  # the statistics did come from bf16 streams
