"""Per-layer conversion: one GQA decoder layer (local tensor names) → stage-1 / stage-2 MLA layer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from mindyouzhi.models.config import MLAConfig, ModelConfig

from .lowrank import DEFAULT_KEY_WEIGHT, DEFAULT_LOWRANK, HeadGeometry, stage2_attention
from .positions import nope_query_map
from .rorope import DEFAULT_RORO, stage1_attention


def split_attention(layer: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    attn = {k[len("self_attn."):]: v for k, v in layer.items() if k.startswith("self_attn.")}
    rest = {k: v for k, v in layer.items() if not k.startswith("self_attn.")}
    return attn, rest


def join_attention(attn: dict[str, np.ndarray], rest: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {f"self_attn.{k}": np.asarray(v, np.float32) for k, v in attn.items()}
    out.update(rest)
    return out


@dataclass
class ConvertedLayer:
    weights: dict[str, np.ndarray]  # local names, float32
    rank: int
    info: dict = field(default_factory=dict)


@dataclass
class Stage1Layer:
    weights: dict[str, np.ndarray]
    nope_latent: int
    rope_width: int
    rank: int  # full latent width
    geometry: HeadGeometry


def head_geometry(config: ModelConfig, rope_width: int, rope_all: bool = False) -> HeadGeometry:
    return HeadGeometry(config.num_attention_heads, 0 if rope_all else config.head_dim, rope_width, config.head_dim)


def convert_stage1(config: ModelConfig, layer: dict[str, np.ndarray], gram: np.ndarray, fold: int, rope_dim: int,
                   rope_all: bool = False, rorope: str = DEFAULT_RORO, profile: Optional[np.ndarray] = None,
                   stride: Optional[int] = None) -> Stage1Layer:
    """``profile`` ([H, S] attention mass by distance, ``positions.distance_profile``) turns on the
    expected rotation of the position-free components; None keeps TransMLA's partial-RoPE layer.
    ``stride``: the RoPE slice's (``folds.rope_stride``)."""
    attn, rest = split_attention(layer)
    result = stage1_attention(attn, gram, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                              rope_dim, fold, rope_all, rorope, nope_query_map(profile, config), stride)
    rank = result.attention["kv_a_proj_with_mqa.weight"].shape[0] - result.rope_width
    return Stage1Layer(join_attention(result.attention, rest), result.nope_latent, result.rope_width, rank,
                       head_geometry(config, result.rope_width, rope_all))


def convert_stage2(stage1: Stage1Layer, gram: np.ndarray, rank: Optional[int], method: str = DEFAULT_LOWRANK,
                   key_weight: float = DEFAULT_KEY_WEIGHT, hidden_states: Optional[np.ndarray] = None,
                   eps: float = 1e-6) -> ConvertedLayer:
    attn, rest = split_attention(stage1.weights)
    attn = {k: np.asarray(v, np.float64) for k, v in attn.items()}
    new_attn, info = stage2_attention(attn, stage1.nope_latent, stage1.rope_width, gram, rank, stage1.geometry,
                                      method, key_weight, hidden_states, eps)
    return ConvertedLayer(join_attention(new_attn, rest), info["rank"], info)


def hybrid_config(base: ModelConfig, fold_plan: list[Optional[int]], ranks: list[Optional[int]], rope_dim: int,
                  latent_norm: bool = False, rope_all: bool = False, stage: int = 2, extra: Optional[dict] = None,
                  rope_stride: Optional[int] = None) -> ModelConfig:
    """The config of a (partially) converted model: ``fold_plan[i] is None`` keeps layer i GQA."""
    if all(f is None for f in fold_plan):
        return base.replace(mla=None)
    mla = MLAConfig(rope_dim=rope_dim, kv_lora_rank=list(ranks), fold_plan=list(fold_plan), latent_norm=latent_norm,
                    rope_all=rope_all, stage=stage, extra=dict(extra or {}),
                    # None: TransMLA's stride, so configs written before the option read the same
                    rope_stride=None if rope_all or rope_stride in (None, base.head_dim // rope_dim) else rope_stride)
    return base.replace(mla=mla)


def full_rank(config: ModelConfig, rope_dim: int, rope_all: bool = False) -> int:
    latent = config.num_key_value_heads * config.head_dim
    return latent if rope_all else 2 * latent - rope_dim
