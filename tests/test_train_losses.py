"""The training losses, AdamW and the learning-rate schedule against plain numpy references."""
import math

import numpy as np
import pytest

from mindyouzhi.train.losses import generalized_jsd, generalized_jsd_numpy, token_cross_entropy
from mindyouzhi.train.schedule import CosineWithWarmUp, warmup_steps_for


def _ms(array, dtype=None):
    import mindspore as ms

    from mindyouzhi.models.runner import ensure_device

    ensure_device()
    return ms.Tensor(np.asarray(array), dtype or ms.float32)


def _masked_mean(per_token, mask):
    return float((per_token.asnumpy().astype(np.float64) * mask).sum() / mask.sum())


@pytest.mark.parametrize("beta,temperature", [(0.0, 1.0), (0.0, 2.0), (0.5, 1.0), (0.1, 0.7), (1.0, 1.0)])
def test_generalized_jsd_matches_numpy_reference(beta, temperature):
    from mindspore import ops

    rng = np.random.default_rng(0)
    student = rng.normal(0, 2, size=(2, 5, 11)).astype(np.float32)
    teacher = rng.normal(0, 2, size=(2, 5, 11)).astype(np.float32)
    mask = rng.random((2, 5)) < 0.6
    mask[0, 0] = True
    teacher_logprobs = ops.log_softmax(_ms(teacher) / temperature, -1)
    got = _masked_mean(generalized_jsd(_ms(student), teacher_logprobs, beta, temperature), mask)
    want = generalized_jsd_numpy(student, teacher, mask, beta, temperature)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert want > 0


def test_forward_kl_is_the_textbook_formula_and_zero_for_equal_models():
    from mindspore import ops

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(1, 3, 7)).astype(np.float32)
    per_token = generalized_jsd(_ms(logits), ops.log_softmax(_ms(logits), -1), 0.0, 1.0).asnumpy()
    assert np.abs(per_token).max() < 1e-6
    other = rng.normal(size=(1, 3, 7))
    p = np.exp(logits - logits.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
    q = np.exp(other - other.max(-1, keepdims=True)); q /= q.sum(-1, keepdims=True)
    textbook = (p * np.log(p / q)).sum(-1).mean()
    assert generalized_jsd_numpy(other, logits, np.ones((1, 3)), 0.0) == pytest.approx(textbook, rel=1e-6)


def test_token_cross_entropy():
    import mindspore as ms

    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 4, 9)).astype(np.float32)
    targets = rng.integers(0, 9, size=(2, 4))
    got = token_cross_entropy(_ms(logits), _ms(targets, ms.int32)).asnumpy()
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_adamw_matches_torch_formula_with_decay_on_matrices_only():
    import mindspore as ms
    from mindspore import Parameter

    from mindyouzhi.train.optim import AdamW
    rng = np.random.default_rng(3)
    matrix0, vector0 = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)
    params = [Parameter(_ms(matrix0.copy()), name="m.weight"), Parameter(_ms(vector0.copy()), name="norm.weight")]
    lr, betas, eps, wd = 1e-2, (0.9, 0.99), 1e-8, 0.1
    optimizer = AdamW(params, betas, eps, wd)

    @ms.jit
    def step_fn(grads, lr_fused, eps_fused, decay_fused):
        return optimizer(grads, lr_fused, eps_fused, decay_fused)

    reference = [matrix0.astype(np.float64), vector0.astype(np.float64)]
    moments = [[np.zeros_like(r), np.zeros_like(r)] for r in reference]
    for step in range(1, 5):
        grads = [rng.normal(size=r.shape).astype(np.float32) for r in reference]
        step_fn(ms.mutable(tuple(_ms(g) for g in grads)), *optimizer.scalars(step, lr))
        for index, (ref, g) in enumerate(zip(reference, grads)):
            m, v = moments[index]
            if index == 0:
                ref *= 1 - lr * wd  # torch.optim.AdamW: decoupled decay (matrices only here)
            m[:] = betas[0] * m + (1 - betas[0]) * g
            v[:] = betas[1] * v + (1 - betas[1]) * g * g
            ref -= lr * (m / (1 - betas[0] ** step)) / (np.sqrt(v / (1 - betas[1] ** step)) + eps)
        np.testing.assert_allclose(params[0].asnumpy(), reference[0], atol=2e-6)
        np.testing.assert_allclose(params[1].asnumpy(), reference[1], atol=2e-6)
    state = optimizer.state_arrays()
    assert set(state) == {"exp_avg.m.weight", "exp_avg.norm.weight", "exp_avg_sq.m.weight", "exp_avg_sq.norm.weight"}


def test_cosine_with_warmup_reaches_lr_end_one_past_the_last_step():
    section = {"learning_rate": 1e-3, "lr_end": 0.0, "warmup_ratio": 0.01, "warmup_steps": None,
               "warmup_lr_init": 0.0, "total_steps": -1}
    schedule = CosineWithWarmUp.from_recipe(section, 300)
    assert schedule.warmup_steps == 3 == warmup_steps_for(0.01, 300)
    rates = [schedule(s) for s in range(300)]
    assert rates[0] == pytest.approx(1e-3 / 3) and rates[2] == pytest.approx(1e-3)
    assert 0 < rates[-1] < 1e-7  # the last step still updates the weights
    assert all(a >= b for a, b in zip(rates[2:], rates[3:]))  # monotone after warmup
    assert schedule(300) == pytest.approx(0.0, abs=1e-15)
    assert CosineWithWarmUp(1.0, 10, 0, 0.1)(9) > 0.1 and math.isclose(CosineWithWarmUp(1.0, 10, 0, 0.1)(10), 0.1)


def test_cosine_decay_matches_transformers_schedule():
    """After warmup the curve is transformers' get_cosine_schedule_with_warmup (an independent
    reference; its warmup starts at 0, ours at one step's worth, so only the decay is compared)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    total, warmup, peak = 37, 4, 2e-4
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=peak)
    reference = transformers.get_cosine_schedule_with_warmup(optimizer, warmup, total)
    ours = CosineWithWarmUp(peak, total, warmup)
    for step in range(total):
        if step >= warmup:
            assert ours(step) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9, abs=1e-15), step
        optimizer.step()
        reference.step()
