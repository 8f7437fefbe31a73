"""Balance the scales of an MLA layer's factor pairs: an exact reparametrization for training.

An MLA layer computes every product through a pair of factors whose split of the scale is free:

* a latent dimension ``i``: row ``i`` of ``kv_a_proj_with_mqa`` × ``s``, column ``i`` of
  ``kv_b_proj`` ÷ ``s`` (only without a latent RMSNorm, which would undo the row scale);
* a key dimension ``(h, j)`` of the position-free part: row ``(h, j)`` of ``q_proj`` ÷ ``t``, row
  ``(h, j)`` of ``kv_b_proj``'s key block × ``t`` (the score ``q · k`` is unchanged);
* a value dimension ``(h, j)``: row ``(h, j)`` of ``kv_b_proj``'s value block × ``u``, column
  ``(h, j)`` of ``o_proj`` ÷ ``u``;
* a RoPE pair ``(p, p + r/2)`` of the shared key: both rows of ``kv_a_proj_with_mqa`` × ``s``, the
  same two rows of every head's ``q_proj`` RoPE slice ÷ ``s`` (a scalar commutes with the pair's
  rotation, so one factor per pair keeps RoPE exact).

Biases follow their rows.  The conversion leaves these splits wherever its algebra put them — on
SmolLM2-135M the converted ``q_proj`` has entries of RMS 89 (max 6,095) while ``kv_b_proj``'s are
0.011 — and AdamW moves every entry by about the learning rate per step whatever its size: one
factor is then frozen and the other rewritten (after GKD at lr 5e-5, ``kv_b_proj`` had moved 2.8 %
relative, ``q_proj`` 0.000 %).  ``balance_mla_layer`` gives both factors of every pair the same
entry RMS (a few alternating rounds: the latent scale and the key/value scales share
``kv_b_proj``), so the relative step is the same on both sides.  The function of the layer is
unchanged up to float rounding (tests/test_balance.py).
"""
from __future__ import annotations

import numpy as np

ROUNDS = 10


def _rms(x: np.ndarray, axis) -> np.ndarray:
    return np.sqrt(np.mean(np.square(x, dtype=np.float64), axis=axis))


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """sqrt(numerator / denominator), 1 where either side is zero (nothing to balance)."""
    ok = (numerator > 0) & (denominator > 0)
    return np.where(ok, np.sqrt(np.where(ok, numerator, 1.0) / np.where(ok, denominator, 1.0)), 1.0)


def balance_mla_layer(weights: dict[str, np.ndarray], heads: int, nope: int, rope: int, v_dim: int, rank: int,
                      latent_norm: bool, rounds: int = ROUNDS) -> dict[str, np.ndarray]:
    """A copy of one MLA layer's local tensors (``self_attn.…`` names) with balanced factor scales."""
    out = dict(weights)
    hidden = weights["self_attn.q_proj.weight"].shape[1]
    wq = weights["self_attn.q_proj.weight"].astype(np.float64).reshape(heads, nope + rope, hidden)
    wa = weights["self_attn.kv_a_proj_with_mqa.weight"].astype(np.float64)
    wb = weights["self_attn.kv_b_proj.weight"].astype(np.float64).reshape(heads, nope + v_dim, rank)
    wo = weights["self_attn.o_proj.weight"].astype(np.float64).reshape(-1, heads, v_dim)
    bq = weights.get("self_attn.q_proj.bias")
    ba = weights.get("self_attn.kv_a_proj_with_mqa.bias")
    bq = None if bq is None else bq.astype(np.float64).reshape(heads, nope + rope)
    ba = None if ba is None else ba.astype(np.float64)
    half = rope // 2
    for _ in range(rounds):
        if not latent_norm:
            s = _ratio(_rms(wb, (0, 1)), _rms(wa[:rank], 1))
            wa[:rank] *= s[:, None]
            wb /= s
            if ba is not None:
                ba[:rank] *= s
        if nope:
            t = _ratio(_rms(wq[:, :nope], 2), _rms(wb[:, :nope], 2))
            wq[:, :nope] /= t[..., None]
            wb[:, :nope] *= t[..., None]
            if bq is not None:
                bq[:, :nope] /= t
        u = _ratio(_rms(wo, 0), _rms(wb[:, nope:], 2))
        wb[:, nope:] *= u[..., None]
        wo /= u
        if rope:
            query = _rms(wq[:, nope:], (0, 2))
            key = _rms(wa[rank:], 1)
            pair = _ratio(np.hypot(query[:half], query[half:]), np.hypot(key[:half], key[half:]))
            s = np.concatenate([pair, pair])
            wa[rank:] *= s[:, None]
            wq[:, nope:] /= s[:, None]
            if ba is not None:
                ba[rank:] *= s
            if bq is not None:
                bq[:, nope:] /= s
    dtype = weights["self_attn.q_proj.weight"].dtype
    out["self_attn.q_proj.weight"] = wq.reshape(heads * (nope + rope), hidden).astype(dtype)
    out["self_attn.kv_a_proj_with_mqa.weight"] = wa.astype(dtype)
    out["self_attn.kv_b_proj.weight"] = wb.reshape(heads * (nope + v_dim), rank).astype(dtype)
    out["self_attn.o_proj.weight"] = wo.reshape(-1, heads * v_dim).astype(dtype)
    if bq is not None:
        out["self_attn.q_proj.bias"] = bq.reshape(-1).astype(dtype)
    if ba is not None:
        out["self_attn.kv_a_proj_with_mqa.bias"] = ba.astype(dtype)
    return out


BALANCED_TENSORS = ("self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.kv_a_proj_with_mqa.weight",
                    "self_attn.kv_a_proj_with_mqa.bias", "self_attn.kv_b_proj.weight", "self_attn.o_proj.weight")


class BalancedStore:
    """A read-only view of a model's tensor store (``keys``/``shape``/``get``/``in``) in which every
    MLA layer's attention tensors come balanced (``balance_mla_layer``); one layer is kept at a time,
    and ``get`` returns a fresh array each call (callers may modify it).  Training reads a fresh
    student through it, and ``export`` writes from it."""

    def __init__(self, store, config):
        self.store = store
        self.config = config
        self._layer: int | None = None
        self._balanced: dict[str, np.ndarray] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.store

    def keys(self):
        return self.store.keys()

    def shape(self, name: str):
        return self.store.shape(name)

    def get(self, name: str, dtype=np.float32) -> np.ndarray:
        parts = name.split(".", 3)
        if len(parts) < 4 or parts[:2] != ["model", "layers"] or parts[3] not in BALANCED_TENSORS:
            return self.store.get(name, dtype)
        layer = int(parts[2])
        if not self.config.is_mla(layer):
            return self.store.get(name, dtype)
        if layer != self._layer:
            from .decoder import layer_prefix, mla_dims

            prefix = layer_prefix(layer)
            local = {key: self.store.get(prefix + key) for key in BALANCED_TENSORS if prefix + key in self.store}
            self._balanced = balance_mla_layer(local, *mla_dims(self.config, layer), self.config.mla.latent_norm)
            self._layer = layer
        return np.array(self._balanced[parts[3]], dtype=dtype)
