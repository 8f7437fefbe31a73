"""MLA factor balancing (models/balance.py): the layer computes the same function, and both factors
of every pair end with the same entry scale."""
from __future__ import annotations

import numpy as np
import pytest
from mindspore import Tensor

from mindyouzhi.models import functional as F
from mindyouzhi.models.balance import balance_mla_layer
from mindyouzhi.models.layers import causal_mask
from mindyouzhi.models.rope import cos_sin

HIDDEN, HEADS, V_DIM, RANK, T = 32, 4, 8, 12, 10


def _skewed_layer(rng, nope: int, rope: int, biases: bool) -> dict:
    """Random MLA tensors whose factor pairs carry very different scales, as a conversion leaves them
    (q × 100 against kv_b × 0.01; each RoPE pair's two rows at different scales)."""
    pair = np.concatenate([rng.uniform(0.05, 20, rope // 2), rng.uniform(0.05, 20, rope // 2)])
    wa = rng.normal(size=(RANK + rope, HIDDEN))
    wa[:RANK] *= rng.uniform(0.1, 10, RANK)[:, None]
    wa[RANK:] *= pair[:, None]
    weights = {
        "self_attn.q_proj.weight": 100 * rng.normal(size=(HEADS * (nope + rope), HIDDEN)),
        "self_attn.kv_a_proj_with_mqa.weight": wa,
        "self_attn.kv_b_proj.weight": 0.01 * rng.normal(size=(HEADS * (nope + V_DIM), RANK)),
        "self_attn.o_proj.weight": rng.normal(size=(HIDDEN, HEADS * V_DIM)) * rng.uniform(0.1, 10, HEADS * V_DIM),
    }
    if biases:
        weights["self_attn.q_proj.bias"] = 50 * rng.normal(size=HEADS * (nope + rope))
        weights["self_attn.kv_a_proj_with_mqa.bias"] = rng.normal(size=RANK + rope)
    return {name: value.astype(np.float32) for name, value in weights.items()}


def _attention(weights: dict, nope: int, rope: int, latent_norm, x: np.ndarray) -> np.ndarray:
    cos, sin = cos_sin(1.0 / (100.0 ** (np.arange(rope // 2) / (rope // 2))), np.arange(T))
    tensor = lambda name: None if name not in weights else Tensor(weights[name])  # noqa: E731
    out = F.mla_attention(Tensor(x), Tensor(cos), Tensor(sin), Tensor(causal_mask(T)), HEADS, nope, rope, V_DIM, RANK,
                          1e-6, tensor("self_attn.q_proj.weight"), tensor("self_attn.q_proj.bias"),
                          tensor("self_attn.kv_a_proj_with_mqa.weight"), tensor("self_attn.kv_a_proj_with_mqa.bias"),
                          latent_norm, tensor("self_attn.kv_b_proj.weight"), tensor("self_attn.o_proj.weight"), None)
    return out.asnumpy()


def _entry_rms(x, axis):
    return np.sqrt(np.mean(np.square(x.astype(np.float64)), axis=axis))


@pytest.mark.parametrize("nope,rope,biases,latent_norm", [(8, 8, True, False), (8, 4, False, False),
                                                         (0, 8, True, False), (8, 8, True, True)])
def test_balancing_keeps_the_function_and_equalizes_the_pairs(nope, rope, biases, latent_norm):
    rng = np.random.default_rng(nope + rope + biases)
    weights = _skewed_layer(rng, nope, rope, biases)
    norm = Tensor(rng.uniform(0.5, 2, RANK).astype(np.float32)) if latent_norm else None
    x = rng.normal(size=(2, T, HIDDEN)).astype(np.float32)
    balanced = balance_mla_layer(weights, HEADS, nope, rope, V_DIM, RANK, latent_norm)

    before, after = _attention(weights, nope, rope, norm, x), _attention(balanced, nope, rope, norm, x)
    assert np.abs(after - before).max() <= 1e-4 * np.abs(before).max()

    wq = balanced["self_attn.q_proj.weight"].reshape(HEADS, nope + rope, HIDDEN)
    wa = balanced["self_attn.kv_a_proj_with_mqa.weight"]
    wb = balanced["self_attn.kv_b_proj.weight"].reshape(HEADS, nope + V_DIM, RANK)
    wo = balanced["self_attn.o_proj.weight"].reshape(HIDDEN, HEADS, V_DIM)
    # the value pairs are balanced last in a round: exact; the others to within the alternation
    np.testing.assert_allclose(_entry_rms(wb[:, nope:], 2), _entry_rms(wo, 0), rtol=1e-6)
    if nope:
        np.testing.assert_allclose(_entry_rms(wq[:, :nope], 2), _entry_rms(wb[:, :nope], 2), rtol=0.02)
    query, key = _entry_rms(wq[:, nope:], (0, 2)), _entry_rms(wa[RANK:], 1)
    half = rope // 2
    np.testing.assert_allclose(np.hypot(query[:half], query[half:]), np.hypot(key[:half], key[half:]), rtol=1e-6)
    if not latent_norm:
        np.testing.assert_allclose(_entry_rms(wa[:RANK], 1), _entry_rms(wb, (0, 1)), rtol=0.02)
    else:  # a latent RMSNorm undoes a row scale: the latent split is left alone
        np.testing.assert_array_equal(wa[:RANK], weights["self_attn.kv_a_proj_with_mqa.weight"][:RANK])
    # the skew the conversion leaves is gone: q and kv_b (key block) entries now within a small factor
    assert not nope or _entry_rms(wq, None) / _entry_rms(wb, None) < 30 < (_entry_rms(weights["self_attn.q_proj.weight"], None)
                                                                / _entry_rms(weights["self_attn.kv_b_proj.weight"], None))


def test_scaling_rope_rows_one_by_one_would_change_the_function():
    """The guard the pairing rule exists for: a per-row RoPE scale is not a reparametrization."""
    rng = np.random.default_rng(3)
    weights = _skewed_layer(rng, 8, 8, False)
    x = rng.normal(size=(1, T, HIDDEN)).astype(np.float32)
    broken = dict(weights)
    scale = np.ones(RANK + 8, np.float32)
    scale[RANK] = 4.0  # row p of the shared key without its partner p + r/2
    broken["self_attn.kv_a_proj_with_mqa.weight"] = weights["self_attn.kv_a_proj_with_mqa.weight"] * scale[:, None]
    q = broken["self_attn.q_proj.weight"].reshape(HEADS, 16, HIDDEN).copy()
    q[:, 8] /= 4.0
    broken["self_attn.q_proj.weight"] = q.reshape(-1, HIDDEN)
    before, after = _attention(weights, 8, 8, None, x), _attention(broken, 8, 8, None, x)
    assert np.abs(after - before).max() > 1e-2 * np.abs(before).max()
