"""``mindyouzhi export``: a converted MLA model → a stock DeepSeek-V3 model directory.

Two formats share one validated plan and one tensor stream:

* ``deepseek-v3`` — the Hugging Face layout (``DeepseekV3ForCausalLM``), loadable by
  transformers and by the DeepSeek-V2/V3 model classes of vLLM(-Ascend), MindIE and MindFormers'
  inference path;
* ``mindformers`` — the same tensors under MindFormers' mcore names
  (``convert_weights/mindformers_names.py``), plus ``param_name_map.json`` as MindFormers writes.

Tensors are read one at a time from the source (plain reads), transformed, and written once into
their place by a writer that knows every shape up front (``deepseek_v3_shapes``); everything goes
to a temporary directory that becomes ``--out`` only when complete (a refusal or a crash leaves
nothing behind).
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from mindyouzhi.convert_weights.hf_tokenizer import derived_tokenizer_files
from mindyouzhi.convert_weights.safetensors_io import SafetensorsFile, SafetensorsStore, ShardedWriter
from mindyouzhi.errors import UserError
from mindyouzhi.io_utils import atomic_output_dir, check_output_dir, write_json_atomic
from mindyouzhi.models.balance import BalancedStore

from .deepseek_config import deepseek_v3_config
from .deepseek_tensors import deepseek_v3_shapes, deepseek_v3_tensors
from .mindformers import mindformers_stream
from .plan import ExportPlan, plan_export

# Shards of 2 GiB: the writer buffers one shard, so this bounds the exporter's extra memory.
DEFAULT_MAX_SHARD_BYTES = 2 * 2**30
INDEX_FILE = "model.safetensors.index.json"
MINDFORMERS_INDEX_FILE = "param_name_map.json"  # name → file, as MindFormers' converter writes it

# Tokenizer and generation files that travel with the weights (whichever exist).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
              "generation_config.json", "tokenizer_llama2c.json")

# Who reads each format.  "tested": logits compared in tests/test_export_deepseek.py (CPU, fp32);
# "targets": engines whose DeepSeek-V3 loaders this layout follows, not run here (docs/deployment.md).
ENGINES = {
    "deepseek-v3": {"tested": ["transformers DeepseekV3ForCausalLM"], "check": "logits parity-tested on CPU",
                    "targets": ["vLLM / vLLM-Ascend DeepseekV3ForCausalLM", "MindIE LLM (DeepSeek-V2/V3 MLA)",
                                "MindFormers inference (reads the Hugging Face directory)"]},
    "mindformers": {"tested": ["MindFormers 2.1.0 TrainingDeepseekV3ForCausalLM"],
                    "check": "built and loaded with equal names, shapes and values on CPU; its training step needs "
                             "Ascend (bench/mindformers_check.py)",
                    "targets": ["MindFormers DeepSeek-V3 mcore checkpoint (TrainingDeepseekV3ForCausalLM)"]},
}


def export_deepseek_v3(model_dir: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False,
                       fmt: str = "deepseek-v3", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict:
    """Export ``model_dir`` (a converted model) to ``out``; returns the summary dict."""
    start = time.perf_counter()
    check_output_dir(out, overwrite)  # before any reading: a clash is the cheapest refusal
    model_dir = Path(model_dir)
    if Path(out).resolve() == model_dir.resolve():
        raise UserError(f"--out {out} is --model itself: the converted model is the reference of the export; "
                        f"choose another directory")
    plan = plan_export(model_dir, fmt)
    # Every export loads in AutoTokenizer, whatever tokenizer files the source model came with.
    derived = derived_tokenizer_files(model_dir, plan.config.max_position_embeddings)
    # header parse only; tensors are read lazily below, every MLA layer with its factor pairs at equal
    # scales (exact; a conversion can leave q_proj entries ~10⁴× kv_b_proj's, which fp16 serving
    # and any optimizer that fine-tunes the export handle badly: docs/training.md)
    store = BalancedStore(SafetensorsStore(model_dir), plan.config)
    with atomic_output_dir(out, overwrite) as tmp:
        shapes = deepseek_v3_shapes(plan)
        tensors = deepseek_v3_tensors(plan, store)
        if fmt == "mindformers":
            shapes, tensors = mindformers_stream(plan, store, shapes, tensors)
        writer = ShardedWriter(tmp, shapes, max_shard_bytes, {"format": "pt"})
        count = params = 0
        for name, array in tensors:
            writer.add(name, array)
            count += 1
            params += array.size
        weight_files = writer.close()
        if fmt == "mindformers":
            _write_param_name_map(tmp, weight_files)
        write_json_atomic(tmp / "config.json", deepseek_v3_config(plan))
        copied = [name for name in SIDE_FILES if _copy_if_present(model_dir / name, tmp / name)]
        for name, text in derived.items():
            (tmp / name).write_text(text, encoding="utf-8")
        _publishable(tmp)
    summary = _summary(plan, Path(out), weight_files, count, params, copied, time.perf_counter() - start)
    summary["derived_tokenizer_files"] = sorted(derived)
    return summary


def _write_param_name_map(directory: Path, weight_files: list[str]) -> None:
    """MindFormers finds tensors through ``param_name_map.json`` (flat name → file), not the HF index."""
    mapping = {name: file for file in weight_files for name in SafetensorsFile(directory / file).keys()}
    write_json_atomic(directory / MINDFORMERS_INDEX_FILE, mapping)
    (directory / INDEX_FILE).unlink(missing_ok=True)


def _copy_if_present(source: Path, target: Path) -> bool:
    if source.is_file():
        shutil.copyfile(source, target)
        return True
    return False


def _publishable(directory: Path) -> None:
    """mkdtemp creates the directory owner-only; give the published model ordinary permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for path in directory.iterdir():
        os.chmod(path, 0o666 & ~umask)


def _summary(plan: ExportPlan, out: Path, weight_files: list[str], count: int, params: int, copied: list[str],
             seconds: float) -> dict:
    return {
        "out": str(out),
        "format": plan.fmt,
        "source": str(plan.model_dir),
        "source_model_type": plan.config.model_type,
        "layers": plan.num_layers,
        "heads": plan.num_heads,
        "qk_nope_head_dim": plan.head_dim,
        "qk_rope_head_dim": plan.rope_dim,
        "v_head_dim": plan.head_dim,
        "kv_lora_rank": plan.kv_lora_rank,
        "q_lora_rank": plan.q_lora_rank,
        "linear_latent_norm": plan.linear_latent_norm,
        "attention_bias": plan.attention_bias,
        "rope_scaling": (plan.config.rope_scaling or {}).get("rope_type"),
        "kv_cache_values_per_token_per_layer": plan.kv_values_per_token_per_layer,
        "kv_cache_values_per_token": plan.kv_values_per_token,
        "source_kv_cache_values_per_token": plan.source_kv_values_per_token,
        "source_rms_norm_eps": plan.config.rms_norm_eps,
        "residual_scale": plan.norm_scale,
        "tensors": count,
        "params": params,
        "weight_files": weight_files,
        "copied_files": copied,
        "engines": ENGINES[plan.fmt],
        "seconds": round(seconds, 3),
    }


def summary_text(summary: dict) -> str:
    """The human summary ``mindyouzhi export`` prints."""
    per_layer = summary["kv_cache_values_per_token_per_layer"]
    lines = [
        f"exported {summary['format']} → {summary['out']} ({', '.join(summary['weight_files'])})",
        f"  {summary['layers']} layers, {summary['heads']} heads, q_lora_rank {summary['q_lora_rank'] or 'null'}, "
        f"kv_lora_rank "
        f"{summary['kv_lora_rank']}, qk_rope_head_dim {summary['qk_rope_head_dim']}, "
        f"qk_nope_head_dim = v_head_dim {summary['v_head_dim']}",
        f"  KV cache per token: {summary['kv_lora_rank']} + {summary['qk_rope_head_dim']} = {per_layer} values per "
        f"layer, {summary['kv_cache_values_per_token']} over all layers "
        f"(the GQA source cached {summary['source_kv_cache_values_per_token']})",
    ]
    if summary["residual_scale"] != 1.0:
        lines.append(f"  rms_norm_eps {summary['source_rms_norm_eps']:g} re-expressed as DeepSeek's 1e-6: residual "
                     f"stream and latent scaled by {summary['residual_scale']:.6g} (exact)")
    engines = summary["engines"]
    if engines["tested"]:
        lines.append(f"  loads in: {'; '.join(engines['tested'])} ({engines['check']})")
    lines.append(f"  written for: {'; '.join(engines['targets'])} (not run here; see docs/deployment.md)")
    if summary["linear_latent_norm"]:
        lines.append("  kv_a_layernorm written as an exact identity (latent rows scaled by a tiny σ, weight sqrt(1e-6)/σ): "
                     "serve in bf16 or fp32, not fp16 (see docs/deployment.md)")
    if summary["q_lora_rank"]:
        lines.append(f"  query biases carried exactly through q_a_proj → q_a_layernorm → q_b_proj (q_lora_rank "
                     f"{summary['q_lora_rank']} = hidden + constant channels; see docs/deployment.md)")
    if summary["attention_bias"] and summary["format"] == "mindformers":
        lines.append("  attention biases in linear_qkv / linear_kvb (MindFormers' concatenated MLA, mla_qkv_concat: "
                     "true; the o_proj bias folded into the value bias, exact)")
    elif summary["attention_bias"]:
        lines.append("  attention_bias: true (q_a_proj, kv_a_proj_with_mqa and o_proj biases): transformers applies "
                     "them; vLLM's DeepSeek model has no attention biases and skips them while loading, so it would "
                     "be wrong")
    if summary["rope_scaling"]:
        lines.append(f"  rope_scaling {summary['rope_scaling']}: exact in transformers; vLLM rewrites any rope_scaling "
                     f"of a DeepSeek model to deepseek_yarn, which changes the frequencies")
    return "\n".join(lines)
