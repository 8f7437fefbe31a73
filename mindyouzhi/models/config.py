"""Model configuration: the HF ``config.json`` fields we use, validated, plus the MLA section.

A model directory is an HF-layout directory.  A converted (or partially converted) model keeps the
source config and adds an ``mla`` section: ``rope_dim``, ``kv_lora_rank``, the per-layer
``fold_plan`` (``null`` = layer left as GQA), ``latent_norm`` and the per-layer latent widths.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mindyouzhi.convert_weights import architectures
from mindyouzhi.errors import UserError


@dataclass
class MLAConfig:
    """How each layer was converted.  Per-layer lists have one entry per decoder layer."""

    rope_dim: int
    kv_lora_rank: list[Optional[int]]  # latent width per layer (None for a GQA layer)
    fold_plan: list[Optional[int]]  # FreqFold f per layer, 0 = RoPE kept on every component (exactness mode), None = GQA
    latent_norm: bool = False
    rope_all: bool = False  # exactness mode: every rotated key component keeps RoPE at its own frequency
    stage: int = 2  # 1 = partial-RoPE model (full latent), 2 = low-rank
    # RoPE pair p rotates at the source frequency θ_{s·p} (transition/folds.py); None: s = head_dim/rope_dim
    rope_stride: Optional[int] = None
    extra: dict = field(default_factory=dict)

    def is_mla(self, layer: int) -> bool:
        return self.fold_plan[layer] is not None

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.update(data.pop("extra"))
        if data["rope_stride"] is None:  # TransMLA's: configs written before the option stay as they were
            del data["rope_stride"]
        return data

    @classmethod
    def from_dict(cls, data: dict, num_layers: int, where: str) -> "MLAConfig":
        if not isinstance(data, dict):
            raise UserError(f"{where}: 'mla' must be a JSON object (rope_dim, kv_lora_rank, fold_plan, …), "
                            f"got {data!r}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        try:
            mla = cls(**{k: v for k, v in data.items() if k in known}, extra={k: v for k, v in data.items() if k not in known})
        except TypeError as exc:
            raise UserError(f"{where}: invalid 'mla' section ({exc})") from None
        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        for name in ("kv_lora_rank", "fold_plan"):
            value = getattr(mla, name)
            if not isinstance(value, list) or len(value) != num_layers:
                raise UserError(f"{where}: mla.{name} must be a list with one entry per layer ({num_layers})")
            if not all(v is None or (is_int(v) and v >= 0) for v in value):
                raise UserError(f"{where}: mla.{name} entries must be non-negative integers or null, got {value!r}")
        if not is_int(mla.rope_dim) or mla.rope_dim < 1:
            raise UserError(f"{where}: mla.rope_dim must be a positive integer, got {mla.rope_dim!r}")
        if mla.rope_stride is not None and (not is_int(mla.rope_stride) or mla.rope_stride < 1):
            raise UserError(f"{where}: mla.rope_stride must be a positive integer or absent, got {mla.rope_stride!r}")
        if mla.stage not in (1, 2) or not is_int(mla.stage):
            raise UserError(f"{where}: mla.stage must be 1 or 2, got {mla.stage!r}")
        for name in ("latent_norm", "rope_all"):
            if not isinstance(getattr(mla, name), bool):
                raise UserError(f"{where}: mla.{name} must be true or false, got {getattr(mla, name)!r}")
        return mla


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict]
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    bos_token_id: Optional[int]
    eos_token_id: Optional[int]
    mla: Optional[MLAConfig] = None
    mlp_bias: bool = False
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def family(self) -> str:
        return self.model_type

    def is_mla(self, layer: int) -> bool:
        return self.mla is not None and self.mla.is_mla(layer)

    def kv_values_per_token(self, layer: int) -> int:
        """Cached values per token for one layer (K+V for GQA, latent + k_pe for MLA)."""
        if self.is_mla(layer):
            return int(self.mla.kv_lora_rank[layer]) + self.mla_rope_width(layer)
        return 2 * self.num_key_value_heads * self.head_dim

    def mla_rope_width(self, layer: int) -> int:
        if self.mla.rope_all:
            return self.num_key_value_heads * self.head_dim
        return self.mla.rope_dim

    def to_hf_dict(self) -> dict:
        """The config.json to write: the source config with our updates and the mla section."""
        data = dict(self.raw)
        if self.mla is not None:
            data["mla"] = self.mla.to_dict()
        else:
            data.pop("mla", None)
        return data

    @classmethod
    def from_dict(cls, data: dict, where: str = "config.json") -> "ModelConfig":
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected a JSON object")
        family = architectures.family(data.get("model_type"), where)
        parts = family.parts(data, where)

        def need(key, kind=int):
            if key not in data or data[key] is None:
                raise UserError(f"{where}: missing required field {key!r}")
            try:
                return kind(data[key])
            except (TypeError, ValueError):
                raise UserError(f"{where}: field {key!r} must be {kind.__name__}, got {data[key]!r}") from None

        def positive(key, value):
            if isinstance(value, bool) or value < 1:
                raise UserError(f"{where}: field {key!r} must be a positive integer, got {data[key]!r}")
            return value

        def optional(key, default):
            """An optional positive integer: absent or null → ``default``."""
            if data.get(key) is None:
                return default
            return positive(key, need(key))

        hidden = positive("hidden_size", need("hidden_size"))
        heads = positive("num_attention_heads", need("num_attention_heads"))
        kv_heads = optional("num_key_value_heads", heads)
        head_dim = optional("head_dim", hidden // heads)
        if head_dim < 1:
            raise UserError(f"{where}: hidden_size {hidden} is smaller than num_attention_heads {heads}")
        if heads % kv_heads:
            raise UserError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        if head_dim % 2:
            raise UserError(f"{where}: head_dim {head_dim} must be even for RoPE")
        rope_params = data.get("rope_parameters") or {}
        rope_scaling = data.get("rope_scaling") or None
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = dict(rope_params)
        rope_theta = float(data.get("rope_theta") or rope_params.get("rope_theta") or 10000.0)
        if rope_scaling is not None:
            rope_scaling = dict(rope_scaling)
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if rope_type not in ("default", "linear", "dynamic", "llama3", "yarn"):
                raise UserError(f"{where}: unsupported rope_scaling type {rope_type!r}; supported: linear, dynamic, llama3, yarn")
            rope_scaling["rope_type"] = rope_type
            if rope_type == "default":
                rope_scaling = None
        if str(data.get("hidden_act", "silu")) not in ("silu", "swish"):
            raise UserError(f"{where}: unsupported hidden_act {data.get('hidden_act')!r}; supported: silu")
        def token_id(key):
            value = data.get(key)
            if isinstance(value, list):
                value = value[0] if value else None
            return None if value is None else int(value)

        config = cls(
            model_type=family.model_type,
            vocab_size=positive("vocab_size", need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=positive("intermediate_size", need("intermediate_size")),
            num_hidden_layers=positive("num_hidden_layers", need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=optional("max_position_embeddings", 2048),
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
            qkv_bias=architectures.QKV_BIAS in parts,
            o_bias=architectures.O_BIAS in parts,
            qk_norm=architectures.QK_NORM in parts,
            mlp_bias=architectures.MLP_BIAS in parts,
            bos_token_id=token_id("bos_token_id"),
            eos_token_id=token_id("eos_token_id"),
            raw=dict(data),
        )
        if data.get("mla") is not None:
            config.mla = MLAConfig.from_dict(data["mla"], config.num_hidden_layers, where)
        return config

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise UserError(f"--model {model_dir}: not a directory")
        path = model_dir / "config.json"
        if not path.is_file():
            raise UserError(f"{path}: config.json not found (expected an HF-layout model directory)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: invalid JSON ({exc})") from None
        return cls.from_dict(data, str(path))

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def window_length(value: Optional[int], default: int, flag: str, config: ModelConfig, minimum: int = 2,
                  notice: bool = True) -> int:
    """A window length: ``value`` as given (refused when longer than the model's context), or for
    ``None`` the ``default`` clamped to the context (one line says so when it is, with ``notice``)."""
    if value is not None:
        check_window(value, flag, config, minimum)
        return value
    if default > config.max_position_embeddings:
        if notice:
            print(f"note: {flag} defaults to {default}, longer than the model's context; using "
                  f"{config.max_position_embeddings} (max_position_embeddings)", file=sys.stderr)
        return config.max_position_embeddings
    return default


def check_window(value: int, flag: str, config: ModelConfig, minimum: int = 2) -> None:
    """A window length: at least ``minimum`` tokens and no longer than the model's context."""
    if value < minimum:
        raise UserError(f"{flag} {value}: must be at least {minimum} tokens")
    if value > config.max_position_embeddings:
        raise UserError(f"{flag} {value}: longer than the model's context (max_position_embeddings "
                        f"{config.max_position_embeddings}); pass at most {config.max_position_embeddings}")
