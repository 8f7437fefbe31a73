"""The CPU train step in bf16 (``context.cpu_precision``, train/bf16_ops.py): the custom bprop against
float64 products of the bf16-rounded operands, a whole model's gradients against fp32, a short run,
fp32 untouched, resume."""
import shutil

import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore import Tensor, ops

from mindyouzhi.errors import UserError
from mindyouzhi.ops import bf16
from mindyouzhi.train import bf16_ops
from mindyouzhi.train.config import load_recipe
from mindyouzhi.train.trainer import train
from test_train_fixtures import final_weights, log_records, shared_models, write_recipe

_UNAVAILABLE = bf16.unavailable()
pytestmark = pytest.mark.skipif(_UNAVAILABLE is not None and "wrong result" not in _UNAVAILABLE,
                                reason=f"bf16 dense kernel unavailable here: {_UNAVAILABLE}")
RNG = np.random.default_rng(11)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return shared_models(tmp_path_factory)


def torch_bf16(array: np.ndarray) -> torch.Tensor:
    """The independent rounding reference (PyTorch float32 → bfloat16), as float64."""
    return torch.from_numpy(np.ascontiguousarray(array, np.float32)).to(torch.bfloat16).double()


def gradients(matmul, x, w, upstream, jit: bool):
    """(y, dx, dW) of Σ matmul(x, w) · upstream."""
    def objective(x, w, upstream):
        return (matmul(x, w) * upstream).sum()

    grad = ms.grad(objective, grad_position=(0, 1))
    grad = ms.jit(grad) if jit else grad
    dx, dw = grad(Tensor(x), Tensor(w), Tensor(upstream))
    return matmul(Tensor(x), Tensor(w)).asnumpy(), dx.asnumpy(), dw.asnumpy()


def check_bf16_gradients(matmul, m: int, k: int, n: int, jit: bool) -> None:
    """y, dx = dy W and dW = dyᵀ x equal the float64 products of the bf16-rounded operands (fp32
    accumulation: error ≤ 1e-5 of the products' scale), and differ from the fp32 products."""
    x = RNG.standard_normal((m, k)).astype(np.float32)
    w = RNG.standard_normal((n, k)).astype(np.float32)
    dy = RNG.standard_normal((m, n)).astype(np.float32)
    y, dx, dw = gradients(matmul, x, w, dy, jit)
    X, W, DY = torch_bf16(x), torch_bf16(w), torch_bf16(dy)
    for got, want, depth in ((y, X @ W.T, k), (dx, DY @ W, n), (dw, DY.T @ X, m)):
        assert got.shape == tuple(want.shape)
        scale = np.sqrt(depth) * 4.0 * 4.0  # |operands| ≤ ~4 (normal samples)
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-5 * scale)
    fp32 = (x @ w.T, dy @ w, dy.T @ x)
    for got, exact in zip((y, dx, dw), fp32):  # really bf16: off the fp32 product by the operands' rounding
        assert np.abs(got - exact).max() > 1e-3


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("shape", [(37, 50, 23), (130, 96, 200), (5, 64, 64)])
def test_bf16_matmul_and_its_bprop_are_the_products_of_bf16_operands(shape, jit):
    check_bf16_gradients(bf16_ops.bf16_matmul("bf16"), *shape, jit)


def test_the_head_variant_has_fp32_gradients_of_a_bf16_forward():
    x, w, dy = (RNG.standard_normal(s).astype(np.float32) for s in ((40, 48), (300, 48), (40, 300)))
    y, dx, dw = gradients(bf16_ops.bf16_matmul("fp32"), x, w, dy, jit=True)
    np.testing.assert_allclose(y, (torch_bf16(x) @ torch_bf16(w).T).numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(dx, dy.astype(np.float64) @ w, rtol=0, atol=1e-3)
    np.testing.assert_allclose(dw, dy.T.astype(np.float64) @ x, rtol=0, atol=1e-3)


def test_a_wrong_bprop_is_caught():
    """The check above fails for a bprop that forgets to transpose W (dy Wᵀ instead of dy W)."""
    product = bf16.primitive()

    def bprop(x, w, out, dout):
        return product(dout, w), product(ops.transpose(dout, (1, 0)), ops.transpose(x, (1, 0)))

    mutant = ops.Custom(f"{bf16.kernel_library()}:DenseBf16", out_shape=lambda x, w: [x[0], w[0]],
                        out_dtype=lambda x, w: x, func_type="aot", bprop=bprop)
    with pytest.raises(AssertionError):
        check_bf16_gradients(mutant, 20, 32, 32, jit=True)


def _net_gradients(student, precision: str):
    """Gradients of a cross-entropy over the student's tokens through the training cells (the
    whole-graph step's network), its Projections switched to bf16 or left fp32."""
    from mindyouzhi.convert_weights.safetensors_io import SafetensorsStore
    from mindyouzhi.models.config import ModelConfig
    from mindyouzhi.models.decoder import CausalLM, RopeTables
    from mindyouzhi.models.layers import causal_mask, to_tensor
    from mindyouzhi.train.losses import token_cross_entropy

    config = ModelConfig.from_dir(student)
    net = CausalLM(config, SafetensorsStore(student))
    switched = bf16_ops.use_bf16_projections(net) if precision == "bf16" else 0
    seq = 24
    tables = tuple(to_tensor(t) for t in RopeTables(config)(seq)) + (to_tensor(causal_mask(seq)),)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, seq + 1))
    inputs, targets = to_tensor(ids[:, :-1], ms.int32), to_tensor(ids[:, 1:], ms.int32)
    params = net.trainable_params()

    def loss_fn(inputs, targets):
        return token_cross_entropy(net(inputs, *tables), targets).mean()

    loss, grads = ms.jit(ms.value_and_grad(loss_fn, None, params))(inputs, targets)
    return float(loss.asnumpy()), {p.name: g.asnumpy() for p, g in zip(params, grads)}, switched


def test_bf16_model_gradients_are_fp32_gradients_within_bf16_rounding(models):
    loss32, grads32, _ = _net_gradients(models["student"], "fp32")
    loss16, grads16, switched = _net_gradients(models["student"], "bf16")
    assert switched >= 2 * 7 + 1  # 2 MLA layers × (4 attention + 3 MLP projections) + the head
    assert abs(loss16 - loss32) < 2e-2 * abs(loss32)
    worst = 0.0
    for name, want in grads32.items():
        error = np.linalg.norm(grads16[name] - want) / max(np.linalg.norm(want), 1e-12)
        worst = max(worst, error)
        assert error < 3e-2, (name, error)  # bf16 operands: 2^-8 relative per element, averaged over sums
    assert worst > 1e-4  # and they are not the fp32 gradients


def _recipe(tmp_path, models, name, precision, **runner):
    return write_recipe(tmp_path / f"{name}.yaml", output_dir=str(tmp_path / name),
                        model={"student": str(models["student"]), "teacher": str(models["teacher"])},
                        train_dataset={"sources": [{"path": str(models["text"]), "max_samples": 40}],
                                       "seq_length": 32},
                        runner_config={"batch_size": 2, **runner},
                        lr_schedule={"learning_rate": 5.0e-3},
                        context={"cpu_precision": precision})


@pytest.mark.parametrize("recompute", [False, True])
def test_a_short_bf16_run_lowers_the_loss_and_records_its_precision(tmp_path, models, recompute):
    path = write_recipe(tmp_path / "bf16.yaml", output_dir=str(tmp_path / "bf16"),
                        model={"student": str(models["student"]), "teacher": str(models["teacher"])},
                        train_dataset={"sources": [{"path": str(models["text"]), "max_samples": 8},
                                                   {"path": str(models["sft"]), "max_samples": 8}]},
                        runner_config={"epochs": 3, "batch_size": 2, "gradient_accumulation_steps": 2},
                        lr_schedule={"learning_rate": 3.0e-3, "warmup_ratio": 0.05},
                        recompute_config={"recompute": recompute}, context={"cpu_precision": "bf16"})
    summary = train(load_recipe(path), show_progress=False)
    assert summary["precision"] == {"projections": "bf16", "context.cpu_precision": "bf16", "fallback_reason": None}
    losses = [r["loss"] for r in log_records(tmp_path / "bf16")]
    assert len(losses) == 12
    epochs = [np.mean(losses[i:i + 4]) for i in range(0, 12, 4)]
    assert epochs[-1] < 0.8 * epochs[0], epochs


def test_fp32_selected_leaves_the_step_untouched(tmp_path, models):
    """``cpu_precision: fp32`` (the default) = MindSpore's MatMul in every projection: the same
    weights, bit for bit, as a recipe without the key."""
    explicit = train(load_recipe(_recipe(tmp_path, models, "explicit", "fp32", max_steps=3)), show_progress=False)
    path = write_recipe(tmp_path / "default.yaml", output_dir=str(tmp_path / "default"),
                        model={"student": str(models["student"]), "teacher": str(models["teacher"])},
                        train_dataset={"sources": [{"path": str(models["text"]), "max_samples": 40}],
                                       "seq_length": 32},
                        runner_config={"batch_size": 2, "max_steps": 3}, lr_schedule={"learning_rate": 5.0e-3})
    default = train(load_recipe(path), show_progress=False)
    assert default["precision"]["projections"] == explicit["precision"]["projections"] == "fp32"
    assert default["weights_sha256"] == explicit["weights_sha256"]


def test_fp32_cells_keep_their_matmul_primitives(models):
    from mindyouzhi.convert_weights.safetensors_io import SafetensorsStore
    from mindyouzhi.models.config import ModelConfig
    from mindyouzhi.models.decoder import CausalLM
    from mindyouzhi.models.layers import Projection

    net = CausalLM(ModelConfig.from_dir(models["student"]), SafetensorsStore(models["student"]))
    cells = [cell for _, cell in net.cells_and_names() if isinstance(cell, Projection)]
    assert cells and all(type(cell.matmul) is ops.MatMul for cell in cells)
    bf16_ops.use_bf16_projections(net)
    assert all(isinstance(cell.matmul, ops.Custom) for cell in cells)


def test_resume_with_bf16_reproduces_the_uninterrupted_run(tmp_path, models):
    """A run stopped after its step-4 checkpoint (its later checkpoints removed, as a kill leaves it)
    and resumed ends with the uninterrupted bf16 run's weights and losses."""
    straight = _recipe(tmp_path, models, "straight", "bf16", max_steps=8, save_steps=4, keep_checkpoints=3)
    train(load_recipe(straight), show_progress=False)
    resumed_recipe = _recipe(tmp_path, models, "resumed", "bf16", max_steps=8, save_steps=4, keep_checkpoints=3)
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-000004", tmp_path / "resumed" / "checkpoint-000004")
    records = log_records(tmp_path / "straight")
    (tmp_path / "resumed" / "train_log.jsonl").write_text(
        "".join(line + "\n" for line in (tmp_path / "straight" / "train_log.jsonl").read_text().splitlines()[:4]))
    summary = train(load_recipe(resumed_recipe), show_progress=False)
    assert summary["start_step"] == 4 and summary["steps_run"] == 4
    want, got = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-6, rtol=0, err_msg=name)
    np.testing.assert_allclose([r["loss"] for r in log_records(tmp_path / "resumed")], [r["loss"] for r in records],
                               rtol=1e-6)


def test_bf16_where_the_kernel_cannot_run_is_refused_naming_the_key(monkeypatch):
    from mindyouzhi.ops import dispatch

    monkeypatch.setattr(dispatch, "device_target", lambda: "Ascend")
    with pytest.raises(UserError, match=r"recipe r\.yaml: context\.cpu_precision bf16: .*CPU kernel"):
        bf16_ops.resolve("bf16", "recipe r.yaml")
    assert bf16_ops.resolve("auto", "recipe r.yaml")[0] == "fp32"  # auto falls back (Ascend keeps its own path)
    assert bf16_ops.resolve("fp32", "recipe r.yaml") == ("fp32", None)


def test_an_unknown_precision_is_refused(tmp_path, models):
    path = _recipe(tmp_path, models, "bad", "fp16", max_steps=1)
    with pytest.raises(UserError, match=r"context\.cpu_precision must be one of 'auto', 'bf16', 'fp32'"):
        load_recipe(path)
