"""The streaming conversion: original model in, converted model dir out, one layer at a time.

Statistics stream one layer at a time over the calibration windows (docs/conversion.md §4):
``stage1-stream`` (default) runs one stream ``B`` through the stage-1 layers and takes both stages'
statistics from it; ``two-stream`` (TransMLA's) adds ``A`` through the original layers for stage 1;
``sequential`` runs one stream through the layers as converted.  A layer is read, converted, written and dropped before the
next one is read.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from mindyouzhi.convert_weights.architectures import checkpoint_shapes
from mindyouzhi.convert_weights.safetensors_io import SafetensorsStore, ShardedWriter
from mindyouzhi.errors import UserError
from mindyouzhi.io_utils import peak_rss_bytes
from mindyouzhi.models.config import ModelConfig
from mindyouzhi.models.decoder import LAYER_PRECISIONS, layer_prefix, read_global_weights, read_layer_weights
from mindyouzhi.progress import progress_bar

from .calibration import GramCache, LayerRunner, layer_gram
from .folds import check_fold, collapse
from .layers import convert_stage1, convert_stage2, full_rank, hybrid_config
from .lowrank import DEFAULT_KEY_WEIGHT, DEFAULT_LOWRANK
from .positions import DEFAULT_NOPE_ROTATION, distance_profile
from .rorope import DEFAULT_RORO

WEIGHT_FILES = ("config.json", "report.json", "model.safetensors.index.json")

# Where each layer's statistics come from.  "two-stream" (TransMLA): stage 1 from the original
# model's hidden states (stream A), stage 2 from the stage-1 model's (stream B).
# "stage1-stream" (default): stream B alone — both stages of layer l from the stage-1 model's
# hidden states (TransMLA's stage-2 statistics; stage 1 also sees the errors of the stage-1 layers
# before it).  "sequential": one stream through the layers as converted (the rank truncation of
# earlier layers included).  The one-stream options cost half the forward passes.  Chosen on
# validation text (SmolLM2 f=4, bf16 passes, docs/BENCHMARKS.md): r96 two-stream 57.20,
# stage1-stream 56.95, sequential 58.45.
STATISTICS = ("two-stream", "sequential", "stage1-stream")
ONE_STREAM = ("sequential", "stage1-stream")
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
    nope_rotation: str = DEFAULT_NOPE_ROTATION
    forward_precision: str = "fp32"  # of the statistics streams' projections: "fp32" | "bf16" (LAYER_PRECISIONS)

    def layer_rank(self, config: ModelConfig, layer: int) -> Optional[int]:
        if self.fold_plan[layer] is None:
            return None
        if self.stage == 1 or self.kv_lora_rank is None:
            return full_rank(config, self.rope_dim, self.rope_all)
        return self.kv_lora_rank


def check_convertible(config: ModelConfig, where: str) -> None:
    if config.qk_norm:
        raise UserError(f"{where}: model_type {config.model_type} applies a per-head QK RMSNorm between W_k and RoPE, "
                        "so RoRoPE is not exact there; conversion is refused")
    if config.mla is not None and any(f is not None for f in config.mla.fold_plan):
        raise UserError(f"{where}: the model is already converted (config.json has an 'mla' section); convert the original model")


def validate_plan(config: ModelConfig, plan: ConversionPlan, where: str) -> None:
    check_convertible(config, where)
    collapse(config.head_dim, plan.rope_dim)
    if len(plan.fold_plan) != config.num_hidden_layers:
        raise UserError(f"fold plan has {len(plan.fold_plan)} entries, the model has {config.num_hidden_layers} layers")
    for fold in plan.fold_plan:
        if fold is not None and not plan.rope_all:
            check_fold(fold, config.head_dim, plan.rope_dim)
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
                           batch_size: int = 8, where: str = "checkpoint", profiles: bool = True,
                           precision: str = "fp32") -> None:
    """Stage-1 statistics of every layer (Gram, and the attention-distance profile unless
    ``profiles`` is False) from one streamed pass of the original model, its projections in
    ``precision``."""
    runner = LayerRunner(calib.shape[1], batch_size, precision)
    hidden = store.get("model.embed_tokens.weight")[calib]
    bar = progress_bar(config.num_hidden_layers, "calibrating", "layer")
    for index in range(config.num_hidden_layers):
        weights = read_layer_weights(store, config, index, where)
        if index not in grams:
            grams[index] = layer_gram(hidden, weights, config.rms_norm_eps)[0]
        if profiles and grams.profile(index) is None:
            grams.set_profile(index, distance_profile(hidden, weights, config))
        if index + 1 < config.num_hidden_layers:
            hidden = runner.run(config, index, weights, hidden)
        bar.update(1)
    bar.close()


def convert_streaming(model_dir: Path, out_dir: Path, plan: ConversionPlan, calib: np.ndarray,
                      grams_a: Optional[GramCache] = None, keep_stage1: bool = False, batch_size: int = 8,
                      max_shard_bytes: int = 2 << 30) -> ConversionResult:
    """Convert ``model_dir`` into ``out_dir`` (which must exist and be empty) following ``plan``."""
    started = time.perf_counter()
    model_dir = Path(model_dir)
    config = ModelConfig.from_dir(model_dir)
    validate_plan(config, plan, str(model_dir))
    store = SafetensorsStore(model_dir)
    where = str(model_dir)
    runner = LayerRunner(calib.shape[1], batch_size, plan.forward_precision)
    ranks = [plan.layer_rank(config, i) for i in range(config.num_hidden_layers)]
    final_config = hybrid_config(config, plan.fold_plan, ranks, plan.rope_dim, plan.latent_norm, plan.rope_all, plan.stage)
    writer = ShardedWriter(out_dir, checkpoint_shapes(final_config), max_shard_bytes,
                           metadata={"format": "ms", "producer": "mindyouzhi"})
    globals_ = read_global_weights(store, config, where)
    writer.add_all(globals_.items())

    stage1_config = hybrid_config(config, plan.fold_plan, [full_rank(config, plan.rope_dim, plan.rope_all)
                                                          if f is not None else None for f in plan.fold_plan],
                                  plan.rope_dim, rope_all=plan.rope_all, stage=1)
    sequential = plan.statistics == "sequential"
    one_stream = plan.statistics in ONE_STREAM  # both stages of layer l from stream B
    need_stream_a = grams_a is None and not one_stream
    hidden_a = globals_["model.embed_tokens.weight"][calib] if need_stream_a else None
    hidden_b = globals_["model.embed_tokens.weight"][calib]
    del globals_
    eps = config.rms_norm_eps
    result = ConversionResult(config=config)
    stage1_weights = {} if keep_stage1 else None
    bar = progress_bar(config.num_hidden_layers, "converting", "layer")
    last = config.num_hidden_layers - 1
    for index in range(config.num_hidden_layers):
        original = read_layer_weights(store, config, index, where)
        fold = plan.fold_plan[index]
        info: dict = {"layer": index, "fold": fold}
        if fold is None:
            final = original
            layer_for_b = (config, original)
        else:
            gram_b, normed_b = layer_gram(hidden_b, original, eps, keep_normed=plan.latent_norm)
            if one_stream:
                gram_a = gram_b
            else:
                gram_a = grams_a[index] if grams_a is not None else layer_gram(hidden_a, original, eps)[0]
            profile = None
            if plan.nope_rotation == "mean" and not plan.rope_all:  # from the stream stage 1's Gram came from
                if one_stream or grams_a is None:
                    profile = distance_profile(hidden_b if one_stream else hidden_a, original, config)
                else:
                    profile = grams_a.profile(index)
                    if profile is None:
                        raise ValueError(f"layer {index}: --nope-rotation mean needs the calibration profiles "
                                         "(compute_original_grams(..., profiles=True))")
            stage1 = convert_stage1(config, original, np.asarray(gram_a), fold, plan.rope_dim, plan.rope_all, plan.rorope,
                                    profile)
            layer_for_b = (stage1_config, stage1.weights)
            if plan.stage == 1:
                final = stage1.weights
            else:
                converted = convert_stage2(stage1, gram_b, plan.kv_lora_rank, plan.lowrank, plan.key_weight, normed_b, eps)
                final = converted.weights
                info.update(converted.info)
                if sequential:
                    layer_for_b = (final_config, final)
            if stage1_weights is not None:
                stage1_weights.update({layer_prefix(index) + k: v for k, v in stage1.weights.items()})
        if stage1_weights is not None and fold is None:
            stage1_weights.update({layer_prefix(index) + k: v for k, v in original.items()})
        writer.add_all((layer_prefix(index) + k, np.asarray(v, np.float32)) for k, v in final.items())
        if index < last:  # the last layer's outputs feed no statistics
            if need_stream_a:
                hidden_a = runner.run(config, index, original, hidden_a)
            if plan.stage == 2 or keep_stage1 or one_stream:
                hidden_b = runner.run(layer_for_b[0], index, layer_for_b[1], hidden_b)
        result.layers.append(info)
        bar.update(1)
    bar.close()
    writer.close()
    result.config = final_config
    for info in result.layers:
        info["kv_values_per_token"] = {"before": config.kv_values_per_token(info["layer"]),
                                       "after": result.config.kv_values_per_token(info["layer"])}
    result.stage1_weights = stage1_weights
    result.seconds = time.perf_counter() - started
    result.peak_rss = peak_rss_bytes()
    return result
