"""The streaming conversion: original model in, converted model dir out, one layer at a time.

Every converted layer is a function of the original layer, its fold and its ``LayerStatistics``
(``convert_layer``).  Where the statistics come from is ``--statistics`` (docs/conversion.md §4):
``StatisticsStream`` carries the calibration hidden states from layer to layer and takes each
layer's statistics from them.  A search instead hands over the statistics its candidates were
built from (a ``GramCache`` written by ``save_statistics``), so the written layers are the ones it
scored.  A layer is read, converted, written and dropped before the next one is read.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from mindyouzhi.convert_weights.architectures import checkpoint_shapes
from mindyouzhi.convert_weights.safetensors_io import SafetensorsStore, ShardedWriter
from mindyouzhi.errors import UserError
from mindyouzhi.io_utils import peak_rss_bytes
from mindyouzhi.models.config import ModelConfig
from mindyouzhi.models.decoder import LAYER_PRECISIONS, layer_prefix, read_global_weights, read_layer_weights
from mindyouzhi.progress import progress_bar

from .calibration import GramCache, LayerRunner, layer_gram
from .folds import check_fold, rope_stride
from .layers import convert_stage1, convert_stage2, full_rank, hybrid_config
from .lowrank import DEFAULT_KEY_WEIGHT, DEFAULT_LOWRANK
from .positions import PLAN_NOPE_ROTATION, rotation_profile
from .rorope import DEFAULT_RORO

WEIGHT_FILES = ("config.json", "report.json", "model.safetensors.index.json")

# Where each layer's statistics come from (the hidden states its Grams are taken over):
# "stage1-stream" (default): one stream through the stage-1 layers; both stages of layer l from
# it (TransMLA's stage-2 statistics; stage 1 also sees the errors of the stage-1 layers before it).
# "two-stream" (TransMLA): stage 1 from a second stream through the original layers.
# "sequential": one stream through the layers as converted (the rank truncation included).
# Chosen on validation text (SmolLM2 f=4, bf16 passes, docs/BENCHMARKS.md): r96 two-stream 57.20,
# stage1-stream 56.95, sequential 58.45.
STATISTICS = ("stage1-stream", "two-stream", "sequential")
DEFAULT_STATISTICS = "stage1-stream"


@dataclass
class ConversionPlan:
    rope_dim: int
    fold_plan: list[Optional[int]]
    kv_lora_rank: Optional[int] = None  # None = full latent (exactness checks)
    stage: int = 2
    latent_norm: bool = False
    rope_all: bool = False
    lowrank: str = DEFAULT_LOWRANK
    key_weight: float = DEFAULT_KEY_WEIGHT
    statistics: str = DEFAULT_STATISTICS
    rorope: str = DEFAULT_RORO
    nope_rotation: str = PLAN_NOPE_ROTATION
    forward_precision: str = "fp32"  # of the statistics streams' projections: "fp32" | "bf16" (LAYER_PRECISIONS)
    rope_stride: Optional[int] = None  # pair p keeps RoPE at θ_{s·p} (folds.rope_stride); None: TransMLA's

    def layer_rank(self, config: ModelConfig, layer: int) -> Optional[int]:
        if self.fold_plan[layer] is None:
            return None
        if self.stage == 1 or self.kv_lora_rank is None:
            return full_rank(config, self.rope_dim, self.rope_all)
        return self.kv_lora_rank

    def with_folds(self, fold_plan: list[Optional[int]]) -> "ConversionPlan":
        return replace(self, fold_plan=list(fold_plan))

    def stage1_config(self, config: ModelConfig) -> ModelConfig:
        """The model whose layers are the stage-1 layers of this plan (full latent)."""
        ranks = [full_rank(config, self.rope_dim, self.rope_all) if f is not None else None for f in self.fold_plan]
        return hybrid_config(config, self.fold_plan, ranks, self.rope_dim, rope_all=self.rope_all, stage=1,
                             rope_stride=self.rope_stride)

    def final_config(self, config: ModelConfig) -> ModelConfig:
        ranks = [self.layer_rank(config, i) for i in range(config.num_hidden_layers)]
        return hybrid_config(config, self.fold_plan, ranks, self.rope_dim, self.latent_norm, self.rope_all, self.stage,
                             rope_stride=self.rope_stride)


def check_convertible(config: ModelConfig, where: str) -> None:
    if config.qk_norm:
        raise UserError(f"{where}: model_type {config.model_type} applies a per-head QK RMSNorm between W_k and RoPE, "
                        "so RoRoPE is not exact there; conversion is refused")
    if config.mla is not None and any(f is not None for f in config.mla.fold_plan):
        raise UserError(f"{where}: the model is already converted (config.json has an 'mla' section); convert the original model")


def validate_plan(config: ModelConfig, plan: ConversionPlan, where: str) -> None:
    check_convertible(config, where)
    rope_stride(config.head_dim, plan.rope_dim, plan.rope_stride)
    if len(plan.fold_plan) != config.num_hidden_layers:
        raise UserError(f"fold plan has {len(plan.fold_plan)} entries, the model has {config.num_hidden_layers} layers")
    for fold in plan.fold_plan:
        if fold is not None and not plan.rope_all:
            check_fold(fold, config.head_dim, plan.rope_dim, stride=plan.rope_stride)
    limit = full_rank(config, plan.rope_dim, plan.rope_all)
    if plan.kv_lora_rank is not None and not 0 < plan.kv_lora_rank <= limit:
        raise UserError(f"--kv-lora-rank {plan.kv_lora_rank}: must be between 1 and {limit} for this model "
                        f"(2 × {config.num_key_value_heads} KV heads × head_dim {config.head_dim} − rope_dim {plan.rope_dim})")
    if plan.latent_norm and plan.stage == 1:
        raise UserError("--latent-norm applies to the low-rank stage; it cannot be combined with --stage 1")
    if plan.statistics not in STATISTICS:
        raise UserError(f"--statistics {plan.statistics}: expected one of {', '.join(STATISTICS)}")
    if plan.forward_precision not in LAYER_PRECISIONS:
        raise UserError(f"forward precision {plan.forward_precision}: expected one of {', '.join(LAYER_PRECISIONS)}")


# --- one layer -----------------------------------------------------------------------------

@dataclass
class LayerStatistics:
    """What converting one layer takes from the calibration data (docs/conversion.md §4)."""

    stage1_gram: np.ndarray  # RoRoPE/FreqFold
    stage2_gram: np.ndarray  # the low rank
    profile: Optional[np.ndarray] = None  # attention-distance profile (--nope-rotation mean), stage 1's stream
    normed: Optional[np.ndarray] = None  # stage 2's normed inputs, only for --latent-norm (never stored)


@dataclass
class ConvertedLayer:
    stage1: dict  # the stage-1 layer (local names); the original layer when kept GQA
    final: dict  # the layer as written
    info: dict


def convert_layer(config: ModelConfig, index: int, original: dict, fold: Optional[int], stats: Optional[LayerStatistics],
                  plan: ConversionPlan) -> ConvertedLayer:
    """Layer ``index`` converted with ``fold`` (None: kept GQA) from ``stats`` alone."""
    info: dict = {"layer": index, "fold": fold}
    if fold is None:
        return ConvertedLayer(original, original, info)
    stage1 = convert_stage1(config, original, np.asarray(stats.stage1_gram), fold, plan.rope_dim, plan.rope_all,
                            plan.rorope, stats.profile, plan.rope_stride)
    if plan.stage == 1:
        return ConvertedLayer(stage1.weights, stage1.weights, info)
    converted = convert_stage2(stage1, np.asarray(stats.stage2_gram), plan.kv_lora_rank, plan.lowrank, plan.key_weight,
                               stats.normed, config.rms_norm_eps)
    info.update(converted.info)
    return ConvertedLayer(stage1.weights, converted.weights, info)


def save_statistics(cache: GramCache, index: int, stats: LayerStatistics) -> None:
    """Keys: ``index`` the stage-2 Gram (and stage 1's when one stream gave both), ``stage1_<index>``
    a separate stage-1 Gram, ``profile_<index>`` the profile — ``compute_original_grams`` writes the
    same layout."""
    if stats.stage1_gram is not stats.stage2_gram:
        cache[f"stage1_{index}"] = stats.stage1_gram
    if stats.profile is not None:
        cache.set_profile(index, stats.profile)
    cache[index] = stats.stage2_gram


def load_statistics(cache: GramCache, index: int) -> LayerStatistics:
    gram = cache[index]
    stage1 = cache[f"stage1_{index}"] if f"stage1_{index}" in cache else gram
    return LayerStatistics(stage1, gram, cache.profile(index))


# --- the statistics streams ----------------------------------------------------------------

class StatisticsStream:
    """The calibration hidden states layer l's statistics are taken from, advanced layer by layer.

    ``b`` enters each layer as the plan's stage-1 model gives it (``sequential``: as the converted
    model gives it); with ``two-stream`` a second stream ``a`` goes through the original layers
    and gives stage 1's statistics."""

    def __init__(self, config: ModelConfig, plan: ConversionPlan, embeddings: np.ndarray, calib: np.ndarray,
                 batch_size: int = 8):
        self.config, self.plan = config, plan
        self.runner = LayerRunner(calib.shape[1], batch_size, plan.forward_precision)
        self.b = embeddings[calib]
        self.a = embeddings[calib] if plan.statistics == "two-stream" else None
        self.through = plan.final_config(config) if plan.statistics == "sequential" else plan.stage1_config(config)

    def statistics(self, index: int, original: dict) -> LayerStatistics:
        eps = self.config.rms_norm_eps
        gram, normed = layer_gram(self.b, original, eps, keep_normed=self.plan.latent_norm)
        stage1_hidden = self.b if self.a is None else self.a
        stage1_gram = gram if self.a is None else layer_gram(self.a, original, eps)[0]
        profile = rotation_profile(self.config, self.plan.nope_rotation, self.plan.rope_all, stage1_hidden, original)
        return LayerStatistics(stage1_gram, gram, profile, normed)

    def advance(self, index: int, original: dict, layer: ConvertedLayer) -> None:
        if self.a is not None:
            self.a = self.runner.run(self.config, index, original, self.a)
        weights = layer.final if self.plan.statistics == "sequential" else layer.stage1
        self.b = self.runner.run(self.through, index, weights, self.b)


def stream_conversion(config: ModelConfig, store: SafetensorsStore, plan: ConversionPlan, calib: np.ndarray,
                      batch_size: int = 8, where: str = "checkpoint", label: str = "converting"
                      ) -> Iterator[tuple[int, LayerStatistics, ConvertedLayer]]:
    """Convert layer by layer following ``plan``, each layer's statistics from ``plan.statistics``."""
    stream = StatisticsStream(config, plan, store.get("model.embed_tokens.weight"), calib, batch_size)
    bar = progress_bar(config.num_hidden_layers, label, "layer")
    for index in range(config.num_hidden_layers):
        original = read_layer_weights(store, config, index, where)
        fold = plan.fold_plan[index]
        stats = stream.statistics(index, original) if fold is not None else None
        layer = convert_layer(config, index, original, fold, stats, plan)
        yield index, stats, layer
        if index + 1 < config.num_hidden_layers:  # the last layer's outputs feed no statistics
            stream.advance(index, original, layer)
        bar.update(1)
    bar.close()


def stored_conversion(config: ModelConfig, store: SafetensorsStore, plan: ConversionPlan, statistics: GramCache,
                      where: str = "checkpoint") -> Iterator[tuple[int, LayerStatistics, ConvertedLayer]]:
    """Convert layer by layer following ``plan`` from statistics kept by a search (no stream)."""
    bar = progress_bar(config.num_hidden_layers, "converting", "layer")
    for index in range(config.num_hidden_layers):
        fold = plan.fold_plan[index]
        stats = load_statistics(statistics, index) if fold is not None else None
        yield index, stats, convert_layer(config, index, read_layer_weights(store, config, index, where), fold, stats, plan)
        bar.update(1)
    bar.close()


# --- the whole model -----------------------------------------------------------------------

@dataclass
class ConversionResult:
    config: ModelConfig
    layers: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss: int = 0
    stage1_weights: Optional[dict] = None  # kept only when asked (stage-1 ppl evaluation)


def copy_side_files(source: Path, target: Path) -> list[str]:
    """Tokenizer and generation files travel with the weights."""
    copied = []
    for path in sorted(source.iterdir()):
        if path.is_file() and path.suffix != ".safetensors" and path.name not in WEIGHT_FILES and not path.name.startswith("."):
            shutil.copy2(path, target / path.name)
            copied.append(path.name)
    return copied


def compute_original_grams(config: ModelConfig, store: SafetensorsStore, calib: np.ndarray, grams: GramCache,
                           batch_size: int = 8, where: str = "checkpoint", nope_rotation: str = "none",
                           precision: str = "fp32") -> None:
    """Statistics of every layer (Gram, and the attention-distance profile with ``nope_rotation``
    ``mean``) from one streamed pass of the original model, its projections in ``precision``; the
    layout ``load_statistics`` reads."""
    runner = LayerRunner(calib.shape[1], batch_size, precision)
    hidden = store.get("model.embed_tokens.weight")[calib]
    bar = progress_bar(config.num_hidden_layers, "calibrating", "layer")
    for index in range(config.num_hidden_layers):
        weights = read_layer_weights(store, config, index, where)
        if index not in grams:
            grams[index] = layer_gram(hidden, weights, config.rms_norm_eps)[0]
        if grams.profile(index) is None:
            profile = rotation_profile(config, nope_rotation, False, hidden, weights)
            if profile is not None:
                grams.set_profile(index, profile)
        if index + 1 < config.num_hidden_layers:
            hidden = runner.run(config, index, weights, hidden)
        bar.update(1)
    bar.close()


def convert_streaming(model_dir: Path, out_dir: Path, plan: ConversionPlan, calib: Optional[np.ndarray],
                      keep_stage1: bool = False, batch_size: int = 8, max_shard_bytes: int = 2 << 30,
                      statistics: Optional[GramCache] = None) -> ConversionResult:
    """Convert ``model_dir`` into ``out_dir`` (which must exist and be empty) following ``plan``.

    The layers' statistics come from ``plan.statistics`` streams over ``calib``, or, when a search
    gives them, from ``statistics`` (the layers it scored; ``calib`` is then not used)."""
    started = time.perf_counter()
    model_dir = Path(model_dir)
    config = ModelConfig.from_dir(model_dir)
    validate_plan(config, plan, str(model_dir))
    store = SafetensorsStore(model_dir)
    where = str(model_dir)
    final_config = plan.final_config(config)
    writer = ShardedWriter(out_dir, checkpoint_shapes(final_config), max_shard_bytes,
                           metadata={"format": "ms", "producer": "mindyouzhi"})
    writer.add_all(read_global_weights(store, config, where).items())
    if statistics is not None:
        layers = stored_conversion(config, store, plan, statistics, where)
    else:
        layers = stream_conversion(config, store, plan, calib, batch_size, where)
    result = ConversionResult(config=final_config, stage1_weights={} if keep_stage1 else None)
    for index, _, layer in layers:
        writer.add_all((layer_prefix(index) + k, np.asarray(v, np.float32)) for k, v in layer.final.items())
        if result.stage1_weights is not None:
            result.stage1_weights.update({layer_prefix(index) + k: v for k, v in layer.stage1.items()})
        layer.info["kv_values_per_token"] = {"before": config.kv_values_per_token(index),
                                             "after": final_config.kv_values_per_token(index)}
        result.layers.append(layer.info)
    writer.close()
    result.seconds = time.perf_counter() - started
    result.peak_rss = peak_rss_bytes()
    return result
