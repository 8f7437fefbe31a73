"""Stage-1 bases on a random GQA layer: exact with RoPE everywhere, and the score basis keeps more score energy."""
import numpy as np
import pytest

from mindyouzhi.transition.rorope import augmented, rorope_rotation

HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 4, 2, 8, 32
HALF = HEAD_DIM // 2


def layer(seed=0):
    rng = np.random.default_rng(seed)
    # anisotropic queries: what the key PCA ignores and the score basis uses
    q = rng.normal(size=(HEADS * HEAD_DIM, HIDDEN)) * rng.uniform(0.05, 3, size=(HEADS * HEAD_DIM, 1))
    k = rng.normal(size=(KV_HEADS * HEAD_DIM, HIDDEN)) * rng.uniform(0.2, 2, size=(KV_HEADS * HEAD_DIM, 1))
    x = rng.normal(size=(3000, HIDDEN)) * rng.uniform(0.2, 2, size=HIDDEN)
    xa = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    return augmented(q, None), augmented(k, None), xa


def rope(vectors, positions):
    """Rotate-half RoPE with frequencies θ_j = 10000^(−2j/d) on [n, d] rows."""
    theta = 10000.0 ** (-np.arange(HALF) * 2 / HEAD_DIM)
    angle = positions[:, None] * theta
    re, im = vectors[:, :HALF], vectors[:, HALF:]
    return np.concatenate([re * np.cos(angle) - im * np.sin(angle), re * np.sin(angle) + im * np.cos(angle)], axis=1)


@pytest.mark.parametrize("method", ["score", "key"])
def test_every_component_keeping_its_rope_reproduces_the_scores(method):
    q_aug, k_aug, xa = layer()
    gram = xa.T @ xa
    forward, inverse, width = rorope_rotation(k_aug, gram, KV_HEADS, HEAD_DIM, HEAD_DIM, 1, rope_all=True,
                                              q_aug=q_aug if method == "score" else None, heads_per_group=HEADS // KV_HEADS)
    np.testing.assert_allclose(forward @ inverse, np.eye(KV_HEADS * HEAD_DIM), atol=1e-9)
    assert width == KV_HEADS * HEAD_DIM
    rng = np.random.default_rng(1)
    tokens = xa[:40]
    positions = rng.integers(0, 500, size=40).astype(float)
    keys = (k_aug @ tokens.T).T  # [t, n_kv·d]
    for h in range(HEADS):
        g = h // (HEADS // KV_HEADS)
        cols = slice(g * HEAD_DIM, (g + 1) * HEAD_DIM)
        query = (q_aug[h * HEAD_DIM:(h + 1) * HEAD_DIM] @ tokens.T).T
        original = rope(query, positions) @ rope(keys[:, cols], positions).T
        # latent: key k' = T k, query q' = (T⁻¹[cols])ᵀ q; pair p's (re, im) = rows (p, p + width/2)
        k_lat, q_lat = keys @ forward.T, query @ inverse[cols]
        theta = 10000.0 ** (-np.arange(HALF) * 2 / HEAD_DIM)
        pairs = width // 2
        freq = np.repeat(theta, KV_HEADS)[:pairs]  # rope_all: pair p = j·n_kv + t rotates with θ_j

        def rotate(v):
            angle = positions[:, None] * freq
            re, im = v[:, :pairs], v[:, pairs:]
            return np.concatenate([re * np.cos(angle) - im * np.sin(angle), re * np.sin(angle) + im * np.cos(angle)], 1)

        np.testing.assert_allclose(rotate(q_lat) @ rotate(k_lat).T, original, atol=1e-8)


def test_score_basis_keeps_more_score_energy_in_the_rope_components_than_key_pca():
    q_aug, k_aug, xa = layer(2)
    gram = xa.T @ xa / len(xa)
    kept = {}
    for method in ("score", "key"):
        forward, inverse, width = rorope_rotation(k_aug, gram, KV_HEADS, HEAD_DIM, 4, 4, q_aug=q_aug if method == "score"
                                                  else None, heads_per_group=HEADS // KV_HEADS)
        energy = 0.0
        for h in range(HEADS):
            g = h // (HEADS // KV_HEADS)
            cols = slice(g * HEAD_DIM, (g + 1) * HEAD_DIM)
            key_moment = forward[:width] @ (k_aug @ gram @ k_aug.T) @ forward[:width].T
            q_rows = inverse[cols, :width].T @ q_aug[h * HEAD_DIM:(h + 1) * HEAD_DIM]
            energy += float(np.trace(key_moment @ (q_rows @ gram @ q_rows.T)))  # E[(q_rope·k_rope)²], q ⟂ k
        kept[method] = energy
    assert kept["score"] > 1.1 * kept["key"], kept


def gqa_attention(attn, x, positions):
    """Reference GQA attention (rotate-half RoPE over the whole head, causal softmax) on augmented x."""
    q = (np.concatenate([attn["q_proj.weight"], attn["q_proj.bias"][:, None]], 1) @ x.T).T
    k = (np.concatenate([attn["k_proj.weight"], attn["k_proj.bias"][:, None]], 1) @ x.T).T
    v = (np.concatenate([attn["v_proj.weight"], attn["v_proj.bias"][:, None]], 1) @ x.T).T
    causal = np.tril(np.ones((len(x), len(x)), bool))
    heads = []
    for h in range(HEADS):
        g = h // (HEADS // KV_HEADS)
        cols = slice(g * HEAD_DIM, (g + 1) * HEAD_DIM)
        scores = rope(q[:, h * HEAD_DIM:(h + 1) * HEAD_DIM], positions) @ rope(k[:, cols], positions).T / np.sqrt(HEAD_DIM)
        heads.append(softmax(np.where(causal, scores, -np.inf)) @ v[:, cols])
    return np.concatenate(heads, 1) @ attn["o_proj.weight"].T


def softmax(scores):
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return weights / weights.sum(-1, keepdims=True)


def mla_attention(attn, x, positions, rope_width):
    """Reference MLA attention of a stage-1 layer with RoPE on every latent key component
    (``--rope-all``): pair p = j·n_kv + t rotates with θ_j, rows (p, p + width/2)."""
    latent = (np.concatenate([attn["kv_a_proj_with_mqa.weight"], attn["kv_a_proj_with_mqa.bias"][:, None]], 1) @ x.T).T
    c, k_pe = latent[:, :-rope_width], latent[:, -rope_width:]
    q = (np.concatenate([attn["q_proj.weight"], attn["q_proj.bias"][:, None]], 1) @ x.T).T
    kv = c @ attn["kv_b_proj.weight"].T  # per head [k_nope (0 rows here) ; v]
    pairs = rope_width // 2
    angle = positions[:, None] * np.repeat(10000.0 ** (-np.arange(HALF) * 2 / HEAD_DIM), KV_HEADS)[:pairs]

    def rotate(rows):
        re, im = rows[:, :pairs], rows[:, pairs:]
        return np.concatenate([re * np.cos(angle) - im * np.sin(angle), re * np.sin(angle) + im * np.cos(angle)], 1)

    causal = np.tril(np.ones((len(x), len(x)), bool))
    heads = []
    for h in range(HEADS):
        scores = rotate(q[:, h * rope_width:(h + 1) * rope_width]) @ rotate(k_pe).T / np.sqrt(rope_width)
        heads.append(softmax(np.where(causal, scores, -np.inf)) @ kv[:, h * HEAD_DIM:(h + 1) * HEAD_DIM])
    return np.concatenate(heads, 1) @ attn["o_proj.weight"].T


@pytest.mark.parametrize("method", ["score", "key"])
def test_stage1_carries_query_key_and_value_biases_exactly(method):
    """A biased GQA attention (Qwen2: q/k/v biases, large enough to matter) converted with RoPE kept on
    every component computes the original attention output: the biases ride in the augmented
    column of q_proj and kv_a_proj_with_mqa."""
    from mindyouzhi.transition.rorope import stage1_attention

    rng = np.random.default_rng(4)
    q_aug, k_aug, xa = layer(4)
    attn = {"q_proj.weight": q_aug[:, :-1], "q_proj.bias": rng.normal(size=HEADS * HEAD_DIM) * 2,
            "k_proj.weight": k_aug[:, :-1], "k_proj.bias": rng.normal(size=KV_HEADS * HEAD_DIM) * 2,
            "v_proj.weight": rng.normal(size=(KV_HEADS * HEAD_DIM, HIDDEN)), "v_proj.bias": rng.normal(size=KV_HEADS * HEAD_DIM),
            "o_proj.weight": rng.normal(size=(HIDDEN, HEADS * HEAD_DIM))}
    result = stage1_attention(attn, xa.T @ xa, HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM, 1, rope_all=True, method=method)
    x, positions = xa[:24], np.arange(24, dtype=float) * 7
    expected = gqa_attention(attn, x, positions)
    np.testing.assert_allclose(mla_attention(result.attention, x, positions, result.rope_width), expected, atol=1e-8)
    unbiased = gqa_attention({**attn, "k_proj.bias": 0 * attn["k_proj.bias"], "v_proj.bias": 0 * attn["v_proj.bias"]},
                             x, positions)
    assert np.abs(unbiased - expected).max() > 1e-1  # the biases change the output: the check is not vacuous
