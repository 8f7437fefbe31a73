"""Stage-2 low-rank methods on a random full-latent layer: exactness, optimality, TransMLA's BKV."""
import numpy as np
import pytest

from mindyouzhi.transition.lowrank import HeadGeometry, output_metric, stage2_attention
from mindyouzhi.transition.rorope import augmented

HEADS, NOPE, ROPE, V, HIDDEN, KV_HEADS = 4, 8, 4, 8, 24, 2
LATENT = KV_HEADS * NOPE  # merged key (and value) width
FULL = 2 * LATENT - ROPE
GEOMETRY = HeadGeometry(HEADS, NOPE, ROPE, V)


def layer(seed=0, biased=False):
    """A stage-1-shaped attention: selector up-projections, random projections, skewed inputs;
    ``biased``: query and latent biases (a Qwen2 model's q/k/v biases after stage 1)."""
    rng = np.random.default_rng(seed)
    nope_latent = LATENT - ROPE
    kv_b = []
    rotation = np.linalg.qr(rng.normal(size=(LATENT, LATENT)))[0]
    for h in range(HEADS):
        g = h // (HEADS // KV_HEADS)
        k_up = np.zeros((NOPE, FULL))
        k_up[:, :nope_latent] = rotation[ROPE:, g * NOPE:(g + 1) * NOPE].T
        v_up = np.zeros((V, FULL))
        v_up[np.arange(V), nope_latent + g * V + np.arange(V)] = 1
        kv_b += [k_up, v_up]
    attn = {"q_proj.weight": rng.normal(size=(HEADS * (NOPE + ROPE), HIDDEN)),
            "kv_a_proj_with_mqa.weight": rng.normal(size=(FULL + ROPE, HIDDEN)) * np.r_[np.full(nope_latent, 3.0), np.ones(LATENT + ROPE)][:, None],
            "kv_b_proj.weight": np.concatenate(kv_b),
            "o_proj.weight": rng.normal(size=(HIDDEN, HEADS * V)) * rng.uniform(0.2, 2, size=HEADS * V)}
    if biased:
        attn["q_proj.bias"] = rng.normal(size=HEADS * (NOPE + ROPE))
        attn["kv_a_proj_with_mqa.bias"] = 3 * rng.normal(size=FULL + ROPE)
    x = rng.normal(size=(4000, HIDDEN)) * rng.uniform(0.1, 3, size=HIDDEN) + rng.normal(size=HIDDEN)
    xa = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    return attn, xa.T @ xa, nope_latent


def kv_map(attn):
    """x ↦ per-head [k_nope ; v] (augmented): the function stage 2 must preserve."""
    return np.asarray(attn["kv_b_proj.weight"]) @ augmented(attn["kv_a_proj_with_mqa.weight"], attn.get("kv_a_proj_with_mqa.bias"))[:-ROPE]


@pytest.mark.parametrize("biased", [False, True])
@pytest.mark.parametrize("method", ["output", "bkv", "care"])
def test_full_rank_is_exact_and_truncation_is_not(method, biased):
    attn, gram, nope_latent = layer(biased=biased)
    full, info = stage2_attention(attn, nope_latent, ROPE, gram, None, GEOMETRY, method)
    np.testing.assert_allclose(kv_map(full), kv_map(attn), atol=1e-8)
    if biased:  # the latent bias is rewritten with the rows; the RoPE key's bias and the query's stay
        np.testing.assert_array_equal(full["kv_a_proj_with_mqa.bias"][-ROPE:], attn["kv_a_proj_with_mqa.bias"][-ROPE:])
        np.testing.assert_array_equal(full["q_proj.bias"], attn["q_proj.bias"])
    cut, _ = stage2_attention(attn, nope_latent, ROPE, gram, 10, GEOMETRY, method)
    assert np.abs(kv_map(cut) - kv_map(attn)).max() > 1e-3
    assert cut["kv_a_proj_with_mqa.weight"].shape == (10 + ROPE, HIDDEN) and cut["kv_b_proj.weight"].shape[1] == 10
    np.testing.assert_array_equal(cut["kv_a_proj_with_mqa.weight"][10:], attn["kv_a_proj_with_mqa.weight"][FULL:])


@pytest.mark.parametrize("method", ["output", "bkv", "care"])
def test_latent_rows_the_data_never_reach_do_not_break_the_full_rank(method):
    """Key components that are zero on every calibration input (e.g. a stride-1 RoPE slice over keys
    with no energy at the slow frequencies): at full rank the latent moment is singular, and the
    up-projection still reproduces every latent the data can produce."""
    attn, gram, nope_latent = layer(3)
    attn = dict(attn)
    weight = attn["kv_a_proj_with_mqa.weight"].copy()
    weight[:3] = 0.0  # three position-free key components that never fire
    attn["kv_a_proj_with_mqa.weight"] = weight
    full, _ = stage2_attention(attn, nope_latent, ROPE, gram, None, GEOMETRY, method)
    np.testing.assert_allclose(kv_map(full), kv_map(attn), atol=1e-8)


def weighted_error(original, converted, gram, metric):
    """E (c − ĉ)ᵀ M (c − ĉ) over the calibration inputs, in the full latent's coordinates."""
    b = np.asarray(original["kv_b_proj.weight"])
    lift = np.linalg.pinv(b)  # per-head outputs → full latent (b has full column rank here)
    delta = lift @ (kv_map(converted) - kv_map(original))
    return float(np.einsum("ij,jk,ik->", metric @ delta, gram, delta))


@pytest.mark.parametrize("rank", [6, 14])
def test_output_method_minimises_its_metric_better_than_bkv_and_care(rank):
    attn, gram, nope_latent = layer(1)
    latent_rows = augmented(attn["kv_a_proj_with_mqa.weight"], None)[:FULL]
    metric = output_metric(attn, latent_rows, gram, GEOMETRY, key_weight=1.0)
    errors = {m: weighted_error(attn, stage2_attention(attn, nope_latent, ROPE, gram, rank, GEOMETRY, m)[0], gram, metric)
              for m in ("output", "bkv", "care")}
    assert errors["output"] < 0.95 * min(errors["bkv"], errors["care"]), errors


def test_bkv_matches_transmla_balanced_pca():
    """TransMLA: scale K_nope by 1/α, PCA of [K_nope/α ; V], down = R_rᵀ S A, up = kv_b S⁻¹ R_r."""
    attn, gram, nope_latent = layer(2)
    a = augmented(attn["kv_a_proj_with_mqa.weight"], None)[:FULL]
    moment = a @ gram @ a.T
    norms = np.sqrt(np.diag(moment))
    alpha = norms[:nope_latent].mean() / norms[nope_latent:].mean()
    scale = np.r_[np.full(nope_latent, 1 / alpha), np.ones(FULL - nope_latent)]
    _, vectors = np.linalg.eigh(scale[:, None] * moment * scale[None, :])
    kept = vectors[:, ::-1][:, :12]
    expected = attn["kv_b_proj.weight"] @ (kept / scale[:, None]) @ (kept.T * scale) @ a
    out, info = stage2_attention(attn, nope_latent, ROPE, gram, 12, GEOMETRY, "bkv")
    assert info["alpha"] == pytest.approx(alpha)
    np.testing.assert_allclose(kv_map(out), expected, atol=1e-8)
