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

# Skipped where the kernel cannot run (no compiler, no oneDNN, a CPU oneDNN refuses); a kernel that
# runs but fails its probe with a wrong result is a bug, and the tests below must show it.
_UNAVAILABLE = bf16.unavailable()
pytestmark = pytest.mark.skipif(_UNAVAILABLE is not None and "wrong result" not in _UNAVAILABLE,
                                reason=f"bf16 dense kernel unavailable here: {_UNAVAILABLE}")


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


@pytest.mark.parametrize("shape", [(7, 40, 5), (2, 33, 64, 96), (1, 1, 3), (3, 129, 576, 192), (2, 8, 577, 130), (17, 70, 9)])
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


@pytest.mark.parametrize("lead,k,n", [((8, 1), 576, 130), ((1, 40), 96, 70), ((3,), 33, 5)])
def test_norm_dense_is_rms_norm_then_the_bf16_product(lead, k, n):
    x = (RNG.standard_normal((*lead, k)) * 3).astype(np.float32)
    g = RNG.uniform(0.5, 1.5, k).astype(np.float32)
    w = RNG.standard_normal((n, k)).astype(np.float32)
    eps = 1e-5
    got = bf16.graph_norm_dense()(Tensor(x), Tensor(g), Tensor(bf16.bf16_bits(w)), eps).asnumpy()
    normed = x.astype(np.float64) / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps) * g
    reference = torch_bf16(normed.astype(np.float32)).astype(np.float64) @ torch_bf16(w).astype(np.float64).T
    scale = np.sqrt(k) * np.abs(normed).max() * np.abs(w).max()
    assert got.shape == (*lead, n)
    # the norm in float32 may flip a rounding of its output to bf16 (2^-8 of a few elements)
    assert np.abs(got - reference).max() <= 4e-3 * scale
    assert np.abs(got - reference).mean() <= 1e-5 * scale
    assert np.abs(got - normed @ w.T).max() > 1e-5 * scale  # bf16 operands, not fp32


@pytest.mark.parametrize("lead,d,f", [((8, 1), 64, 150), ((2, 20), 24, 40)])
def test_swiglu_down_is_the_mlp_second_half_plus_the_residual(lead, d, f):
    h = RNG.standard_normal((*lead, d)).astype(np.float32)
    gate_up = (RNG.standard_normal((*lead, 2 * f)) * 2).astype(np.float32)
    w = RNG.standard_normal((d, f)).astype(np.float32)
    got = bf16.graph_swiglu_down()(Tensor(h), Tensor(gate_up), Tensor(bf16.bf16_bits(w))).asnumpy()
    gate, up = torch.from_numpy(gate_up[..., :f]).double(), torch.from_numpy(gate_up[..., f:]).double()
    act = (torch.nn.functional.silu(gate) * up).numpy()
    reference = h + torch_bf16(act.astype(np.float32)).astype(np.float64) @ torch_bf16(w).astype(np.float64).T
    scale = np.sqrt(f) * np.abs(act).max() * np.abs(w).max()
    assert np.abs(got - reference).max() <= 4e-3 * scale and np.abs(got - reference).mean() <= 1e-5 * scale
    assert np.abs(got - (h + act @ w.T)).max() > 1e-5 * scale


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


# -- the runner (eval ppl, log-probabilities) in bf16 -----------------------------------------------
@pytest.fixture(scope="module")
def serve_models(tmp_path_factory):
    from serve_models import build_serve_models

    return build_serve_models(tmp_path_factory.getbasetemp() / "serve-models")


@pytest.mark.parametrize("name", ["gqa", "mla"])
def test_bf16_runner_scores_like_fp32_up_to_bf16_rounding(serve_models, name):
    from mindyouzhi.models.runner import ModelRunner

    runners = {p: ModelRunner.from_dir(serve_models[name], precision=p) for p in ("fp32", "bf16")}
    assert runners["bf16"].precision == "bf16"
    ids = RNG.integers(4, 124, (2, 41)).astype(np.int32)
    nll = {p: r.token_nll(ids[:, :-1], ids[:, 1:]) for p, r in runners.items()}
    assert nll["bf16"].shape == (2, 40)
    # bf16 operands (relative rounding 2^-9 each) through every layer: ~1 % of the scale, no more
    difference = np.abs(nll["bf16"] - nll["fp32"])
    assert difference.max() < 0.03 * nll["fp32"].max() and abs(nll["bf16"].sum() / nll["fp32"].sum() - 1) < 5e-3
    assert difference.max() > 1e-6  # and it really ran in bf16
    spans = [(3, 20), (0, 41)]
    rows = {p: r.logprobs_rows([ids[0, :20].tolist(), ids[1].tolist()], spans) for p, r in runners.items()}
    for low, exact in zip(rows["bf16"], rows["fp32"]):
        np.testing.assert_allclose(np.exp(low).sum(-1), 1.0, rtol=1e-4)  # log-softmax in fp32
        assert np.abs(low - exact).max() < 0.03 * np.abs(exact).max()
    # the bf16 head alone: the kernel's product of the bf16-rounded normed states and head matrix
    hidden = runners["bf16"].hidden(ids[:, :8])
    config = runners["bf16"].config
    head = runners["fp32"]._head.asnumpy()
    normed = hidden.asnumpy().astype(np.float64)
    normed = normed / np.sqrt((normed ** 2).mean(-1, keepdims=True) + config.rms_norm_eps) * runners["fp32"]._norm.asnumpy()
    reference = torch_bf16(normed.astype(np.float32)).astype(np.float64) @ torch_bf16(head).astype(np.float64).T
    got = runners["bf16"].head_logits(hidden).asnumpy()
    assert np.abs(got - reference).max() < 1e-4 * np.abs(reference).max()


def test_eval_ppl_cli_reports_the_precision_that_ran(serve_models, tmp_path, monkeypatch):
    data = write_text(tmp_path / "text.txt", 800, seed=3)
    out = {}
    for precision in ("bf16", "fp32", "auto"):
        result = CliRunner().invoke(main, ["eval", "ppl", "--model", str(serve_models["mla"]), "--data", str(data),
                                           "--seq-len", "32", "--max-windows", "3", "--forward-precision", precision,
                                           "--json"])
        assert result.exit_code == 0, result.output
        out[precision] = json.loads(result.stdout)
    assert out["bf16"]["forward_precision"] == {"used": "bf16", "requested": "bf16", "fallback_reason": None}
    assert out["fp32"]["forward_precision"]["used"] == "fp32"
    assert out["auto"]["forward_precision"]["used"] == ("bf16" if bf16.native_bf16() else "fp32")
    assert out["bf16"]["ppl"] != out["fp32"]["ppl"]
    assert abs(out["bf16"]["ppl"] / out["fp32"]["ppl"] - 1) < 1e-2
    monkeypatch.setattr(bf16, "native_bf16", lambda: False)
    result = CliRunner().invoke(main, ["eval", "ppl", "--model", str(serve_models["mla"]), "--data", str(data),
                                       "--seq-len", "32", "--max-windows", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["forward_precision"]
    assert report["used"] == "fp32" and "avx512_bf16" in report["fallback_reason"]
