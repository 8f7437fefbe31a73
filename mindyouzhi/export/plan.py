"""What an export needs to know about a converted model, and every reason to refuse one.

All checks run before anything is written: a refused export leaves no trace on disk.  The rules
come from what stock DeepSeek-V3 implementations build (transformers ``DeepseekV3Attention``,
vLLM ``DeepseekV2MLAAttention``, MindFormers ``MLASelfAttention``), see docs/deployment.md:

* every layer is MLA with one ``kv_lora_rank`` (the config has a single value);
* ``kv_a_layernorm`` always exists in those engines.  A model converted with ``--latent-norm``
  brings its own; for one converted without (the default, and the exact conversion) the export
  makes the engine's norm *linear* — see "linear latent norm" below;
* with ``q_lora_rank: null`` the query projection has no bias anywhere, and a query bias adds a
  key-dependent term ``b_q · k_j`` to the scores that no other weight can absorb.  A non-zero
  ``q_proj.bias`` (Qwen2) is therefore exported through the low-rank query path instead, which
  does carry a bias (``q_a_proj``, under ``attention_bias``): see ``query_factorisation`` below.
  MindFormers' concatenated MLA carries q/kv biases directly (``export/mindformers.py``), so
  ``--format mindformers`` keeps ``q_proj`` (no factorisation) and only records ``q_bias``;
* the RoPE slice must get the same frequencies from a DeepSeek-V3 engine, which builds its table
  over ``qk_rope_head_dim`` from ``rope_theta``/``rope_scaling``.

One more difference is absorbed rather than refused: the RMSNorm epsilon of ``kv_a_layernorm``.
transformers (and DeepSeek's reference code) build it with a fixed ``eps=1e-6``, vLLM and
MindFormers with the config's ``rms_norm_eps``; our model uses the source's ``rms_norm_eps``
(1e-5 for Llama).  Since ``RMSNorm(s·x; ε) = RMSNorm(x; ε/s²)``, scaling every input of a norm by
``s = sqrt(1e-6 / ε_source)`` makes a norm with ε = 1e-6 compute exactly the source norm.  So the
export writes ``rms_norm_eps: 1e-6`` and scales the latent rows of ``kv_a_proj_with_mqa`` and the
whole residual stream (embeddings, ``o_proj``, ``down_proj``) by ``s``; the explicit ``lm_head``
reads the normed stream and is unchanged.  Every engine then agrees, whichever epsilon it reads.

**Linear latent norm (models converted without ``--latent-norm``).**  The engine computes
``w ⊙ c / sqrt(mean(c²) + ε)`` on the latent.  Writing the latent rows (and bias) of
``kv_a_proj_with_mqa`` scaled by a tiny ``σ`` makes ``mean((σc)²) ≤ δ ε`` for every token, so the
norm divides by ``sqrt(ε)`` within a relative ``δ/2`` and ``w = sqrt(ε)/σ`` gives back ``c``: the
norm is the identity and the export is exact.  The bound is a worst case, not a calibration
average: ``c = D x̂ + b`` with ``‖x̂‖² ≤ D_in · max γ²`` as above, so
``‖c‖ ≤ ‖D‖₂ sqrt(D_in) max γ + ‖b‖`` and ``σ² = δ ε r / bound²``.  The latent *before* the norm is
then ~1e-7 in size, which fp32 and bf16 represent with full relative precision (same exponent
range as fp32) but fp16 does not (subnormal below 6e-5): such exports must be served in bf16 or
fp32, never fp16.  Engines cache the *normed* latent, which is at the model's own scale.

**Query biases through ``q_a_proj`` → ``q_a_layernorm`` → ``q_b_proj``.**  The engine computes
``q = B · RMSNorm(A x̂ + a₀)``.  With ``q_lora_rank = D + k`` we set ``A = [α·I_D ; 0]`` and
``a₀ = [0 ; c·1_k]``, so the normed vector is ``v = [α x̂ ; c…c]`` and
``mean(v²) = (α²‖x̂‖² + k c²) / (D + k)``.  ``x̂`` is the output of the layer's input RMSNorm, so
``‖x̂‖² ≤ D · max γ²`` for every token (γ its weight); choosing ``α² = δ k c² / (D max γ²)`` pins
``mean(v²)`` to the constant ``k c² / (D + k)`` within a relative ``δ`` (1e-9 here: far below fp32
rounding), and the norm becomes a fixed scale ``g``.  Then ``B = [W_q / (α g) | b_q / (k c g) …]``
reproduces ``W_q x̂ + b_q``.  Floating point keeps relative precision under the ``α`` scaling
(fp32 and bf16 share the exponent range), so the result is exact to rounding in both.  The price:
``D (D + k)`` extra weights per layer for ``q_a_proj`` (≈ D² — about 5 % more parameters for a 7B
model), nothing in the KV cache.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from mindyouzhi.convert_weights import architectures
from mindyouzhi.convert_weights.safetensors_io import SafetensorsStore
from mindyouzhi.errors import UserError
from mindyouzhi.export import FORMATS
from mindyouzhi.models.config import ModelConfig
from mindyouzhi.models.decoder import layer_prefix, mla_frequency_indices
from mindyouzhi.models.rope import inverse_frequencies
from mindyouzhi.transition import folds

# The one RMSNorm epsilon every DeepSeek-V3 engine agrees on (transformers hard-codes it for
# kv_a_layernorm; the others read rms_norm_eps, which the export sets to it).
DEEPSEEK_NORM_EPS = 1e-6

# Relative difference allowed between our RoPE-slice frequencies and the ones a DeepSeek-V3 engine
# derives from the exported config: both are float32 tables of the same formula, so anything
# above float32 rounding means a different schedule, not noise.
_ROPE_RTOL = 1e-6

# Query factorisation (see the module docstring): constant channels c = 1, padded so that
# q_lora_rank = hidden + k is a multiple of 64 (k ≥ 1), and the norm pinned within δ.
_Q_PAD_MULTIPLE = 64
_Q_PIN_DELTA = 1e-9
# Linear latent norm: the largest possible mean square of the scaled latent, as a fraction of ε.
_LATENT_PIN_DELTA = 1e-7


@dataclass(frozen=True)
class QueryFactorisation:
    """How a biased query projection becomes q_a_proj (+bias) → q_a_layernorm → q_b_proj."""

    rank: int  # q_lora_rank = hidden_size + constant_channels
    constant_channels: int  # k

    @staticmethod
    def for_hidden(hidden: int) -> "QueryFactorisation":
        k = _Q_PAD_MULTIPLE - hidden % _Q_PAD_MULTIPLE
        return QueryFactorisation(hidden + k, k)

    def input_scale(self, max_norm_weight: float) -> float:
        """α of the module docstring, for a layer whose input-norm weights are at most ``max_norm_weight``."""
        hidden = self.rank - self.constant_channels
        return math.sqrt(_Q_PIN_DELTA * self.constant_channels / (hidden * max(max_norm_weight, 1e-30) ** 2))

    def norm_gain(self, eps: float) -> float:  # noqa: D102 (documented above)
        """g: what q_a_layernorm (weight 1) multiplies by once its mean square is pinned."""
        return 1.0 / math.sqrt(self.constant_channels / self.rank + eps)


@dataclass(frozen=True)
class ExportPlan:
    """The validated facts an exporter writes from (all layers MLA, one rank)."""

    model_dir: Path
    config: ModelConfig
    fmt: str
    num_layers: int
    num_heads: int
    head_dim: int  # qk_nope_head_dim = v_head_dim
    rope_dim: int  # qk_rope_head_dim
    kv_lora_rank: int
    kv_a_bias: bool  # write kv_a_proj_with_mqa.bias (some layer has a non-zero one)
    o_bias: bool  # write o_proj.bias (some layer has a non-zero one)
    q_bias: bool  # some q_proj.bias is non-zero
    query: Optional[QueryFactorisation]  # deepseek-v3 with q_bias: the q_a/q_b path
    linear_latent_norm: bool  # converted without --latent-norm: the export adds an exact, linear one
    source_kv_values_per_token: int  # the GQA cache of the source model, all layers
    norm_scale: float  # s = sqrt(DEEPSEEK_NORM_EPS / source eps): residual stream and latent scale (1 = unchanged)

    @property
    def attention_bias(self) -> bool:
        # DeepSeek-V3's single flag switches the bias on q_a_proj, kv_a_proj_with_mqa and o_proj together.
        return self.kv_a_bias or self.o_bias or self.q_bias

    @property
    def q_lora_rank(self) -> Optional[int]:
        return self.query.rank if self.query else None

    @property
    def kv_values_per_token_per_layer(self) -> int:
        return self.kv_lora_rank + self.rope_dim

    @property
    def kv_values_per_token(self) -> int:
        return self.num_layers * self.kv_values_per_token_per_layer


def plan_export(model_dir: str | Path, fmt: str) -> ExportPlan:
    """Validate ``model_dir`` for ``fmt`` and return the plan; raise ``UserError`` otherwise."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: unknown export format; choose one of {', '.join(FORMATS)}")
    model_dir = Path(model_dir)
    config = ModelConfig.from_dir(model_dir)
    where = model_dir / "config.json"
    mla = _check_mla_section(config, where)
    _check_side_files(model_dir)
    store = SafetensorsStore(model_dir)
    _check_tensor_set(config, store, model_dir)
    _check_rope(config, where)
    q_bias, kv_a_bias, o_bias = _nonzero_biases(config, store)
    mlp_bias = next((name for name in store.keys() if architectures.part_of(name) == architectures.MLP_BIAS
                     and np.any(store.get(name) != 0)), None)
    if mlp_bias:
        raise UserError(f"{model_dir}: MLP bias {mlp_bias} is non-zero, but DeepSeek-V3's dense MLP has no biases "
                        f"(transformers, vLLM and MindFormers build gate/up/down without them), so no stock engine "
                        f"can reproduce this model; all-zero MLP biases are dropped exactly")
    if not config.rms_norm_eps > 0:
        raise UserError(f"{where}: rms_norm_eps {config.rms_norm_eps} must be positive to be re-expressed as "
                        f"DeepSeek-V3's {DEEPSEEK_NORM_EPS}")
    rank = int(mla.kv_lora_rank[0])
    kv_heads = config.num_key_value_heads
    return ExportPlan(
        model_dir=model_dir, config=config, fmt=fmt, num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads, head_dim=config.head_dim, rope_dim=int(mla.rope_dim),
        kv_lora_rank=rank, kv_a_bias=bool(kv_a_bias), o_bias=bool(o_bias), q_bias=bool(q_bias),
        query=QueryFactorisation.for_hidden(config.hidden_size) if q_bias and fmt == "deepseek-v3" else None,
        linear_latent_norm=not mla.latent_norm,
        source_kv_values_per_token=config.num_hidden_layers * 2 * kv_heads * config.head_dim,
        norm_scale=math.sqrt(DEEPSEEK_NORM_EPS / config.rms_norm_eps))


def _check_mla_section(config: ModelConfig, where: Path):
    mla = config.mla
    if mla is None or all(f is None for f in mla.fold_plan):
        raise UserError(f"{where}: no converted (MLA) layers: this is not a converted model; "
                        f"run `mindyouzhi convert` first")
    gqa = [i for i, f in enumerate(mla.fold_plan) if f is None]
    if gqa:
        raise UserError(f"{where}: layers {gqa} are still GQA (mla.fold_plan null): a DeepSeek-V3 model needs every "
                        f"layer in MLA form; re-run convert without --layers")
    if mla.rope_all:
        raise UserError(f"{where}: converted in exactness mode (--rope-all): its RoPE key is "
                        f"{config.num_key_value_heads * config.head_dim} wide with per-component frequencies, "
                        f"which no DeepSeek-V3 engine can express; re-run convert without --rope-all")
    if mla.stage != 2:
        raise UserError(f"{where}: a stage-{mla.stage} (partial-RoPE, full-latent) model; export needs the low-rank "
                        f"stage: re-run convert with --stage 2")
    ranks = sorted({int(r) for r in mla.kv_lora_rank})
    if len(ranks) != 1:
        raise UserError(f"{where}: mla.kv_lora_rank differs across layers ({mla.kv_lora_rank}); DeepSeek-V3 has one "
                        f"kv_lora_rank for all layers: re-run convert with a single --kv-lora-rank")
    if config.qk_norm:
        raise UserError(f"{where}: model_type {config.model_type} has per-head QK norms, which DeepSeek-V3 lacks")
    if config.head_dim % mla.rope_dim or mla.rope_dim % 2:
        raise UserError(f"{where}: mla.rope_dim {mla.rope_dim} must be even and divide head_dim {config.head_dim}")
    return mla


def _check_side_files(model_dir: Path) -> None:
    """The files that travel with the weights must be readable: a damaged tokenizer or JSON side
    file is refused instead of being copied into the export as it is."""
    import json

    from mindyouzhi.tokenizer import HF_TOKENIZER_FILE, LLAMA2C_TOKENIZER_FILE, load_tokenizer

    for path in sorted(model_dir.glob("*.json")):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: invalid JSON ({exc}); the export copies it, so it must be readable") from None
    if (model_dir / HF_TOKENIZER_FILE).is_file() or (model_dir / LLAMA2C_TOKENIZER_FILE).is_file():
        load_tokenizer(model_dir)


def _check_tensor_set(config: ModelConfig, store: SafetensorsStore, model_dir: Path) -> None:
    """Every checkpoint tensor must be one the family spec consumes, with the shape the config implies."""
    architectures.check_tensors({name: store.shape(name) for name in store.keys()}, config, model_dir)


def engine_rope_theta(config: ModelConfig) -> float:
    """The ``rope_theta`` whose standard table of width rope_dim is our RoPE slice: pair p rotates at the
    source θ_{s·p} = base^(−2sp/head_dim) = (base^(s·rope_dim/head_dim))^(−2p/rope_dim) — the source's
    base at TransMLA's stride s = head_dim/rope_dim."""
    stride = folds.rope_stride(config.head_dim, config.mla.rope_dim, config.mla.rope_stride, flag="mla.rope_stride")
    return float(config.rope_theta) ** (stride * config.mla.rope_dim / config.head_dim)


def _check_rope(config: ModelConfig, where: Path) -> None:
    """The engine's table (width rope_dim, theta ``engine_rope_theta``, same scaling) must equal our RoPE-slice table."""
    scaling = config.rope_scaling or {}
    if scaling.get("mscale_all_dim"):
        raise UserError(f"{where}: rope_scaling.mscale_all_dim is set; DeepSeek-V3 engines also rescale the softmax "
                        f"by it, which the converted model does not do")
    engine = config.replace(head_dim=config.mla.rope_dim, rope_theta=engine_rope_theta(config))
    index = mla_frequency_indices(config)
    # Two lengths: dynamic scaling only changes the table beyond max_position_embeddings.
    for length in (config.max_position_embeddings, 4 * config.max_position_embeddings):
        ours, ours_factor = inverse_frequencies(config, length)
        theirs, their_factor = inverse_frequencies(engine, length)
        ours = ours[index]
        error = np.abs(theirs.astype(np.float64) - ours) / np.abs(ours.astype(np.float64))
        if error.max() > _ROPE_RTOL or abs(ours_factor - their_factor) > _ROPE_RTOL * abs(ours_factor):
            kind = scaling.get("rope_type", "default")
            raise UserError(
                f"{where}: rope_scaling {kind!r} is not reproduced by DeepSeek-V3 engines, which compute it over "
                f"qk_rope_head_dim={config.mla.rope_dim} instead of head_dim={config.head_dim} (at {length} tokens the "
                f"RoPE frequencies differ by up to {error.max():.2e} relative, attention factor {ours_factor:.6f} vs "
                f"{their_factor:.6f}); only default, linear and llama3 scaling export exactly")


def latent_scale(norm_weight: np.ndarray, down: np.ndarray, bias: Optional[np.ndarray], eps: float) -> float:
    """σ of the linear latent norm for one layer: ``mean((σc)²) ≤ δ ε`` for any input (module docstring).

    ``norm_weight`` is the layer's input-norm weight, ``down`` [r, D] the latent rows of
    ``kv_a_proj_with_mqa`` and ``bias`` their bias (or None)."""
    rows = np.asarray(down, np.float64)
    bound = np.linalg.norm(rows, 2) * math.sqrt(rows.shape[1]) * float(np.abs(norm_weight).max())
    if bias is not None:
        bound += float(np.linalg.norm(np.asarray(bias, np.float64)))
    return math.sqrt(_LATENT_PIN_DELTA * eps * rows.shape[0]) / max(bound, 1e-30)


def _nonzero_biases(config: ModelConfig, store: SafetensorsStore) -> tuple[Optional[str], Optional[str], Optional[str]]:
    """First non-zero q / kv_a / o bias name (None when all are zero or absent).

    Biases are tiny, so reading them all up front costs nothing and lets every refusal happen
    before the output directory exists.  All-zero biases are dropped on export (exactly)."""
    found = [None, None, None]
    for layer in range(config.num_hidden_layers):
        prefix = layer_prefix(layer) + "self_attn."
        for slot, proj in enumerate(("q_proj", "kv_a_proj_with_mqa", "o_proj")):
            name = f"{prefix}{proj}.bias"
            if found[slot] is None and name in store and np.any(store.get(name) != 0):
                found[slot] = name
    return found[0], found[1], found[2]
