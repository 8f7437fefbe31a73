"""KV-cache capacity: bytes per token and the concurrency a memory budget allows, GQA vs MLA.

The arithmetic (docs/serving.md, "Capacity arithmetic"; the paper's Table 4):

    KV bytes per token  = Σ_layers values_per_token(layer) · dtype bytes
                          (GQA: 2·kv_heads·head_dim;  MLA: kv_lora_rank + rope_dim)
    KV budget           = memory − weights − workspace reserve
    bytes per sequence  = context rounded up to whole blocks · KV bytes per token
    max sequences       = ⌊KV budget / bytes per sequence⌋

"The original" of a converted model is the same config with every layer GQA.  Config-only
entries for the paper's models give their public shapes, in the MLA form the paper deploys
(kv_lora_rank 512 + rope 64, bf16 on Ascend).  ``measure`` runs the real engine: it submits
more identical requests than the prediction allows and reports how many the pool actually held
to their last token (``reserve`` admission: nothing is preempted, so every held sequence really
had its whole context in the pool at once) and the throughput of that wave.
"""
from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Optional

import numpy as np

from mindyouzhi.errors import UserError
from mindyouzhi.io_utils import read_json
from mindyouzhi.models.config import MLAConfig, ModelConfig
from mindyouzhi.models.decoder import expected_global_shapes, expected_layer_shapes

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
PAPER_MLA_FORM = {"kv_lora_rank": 512, "rope_dim": 64}

# Public HF config.json values of the paper's models (only the fields the arithmetic needs).
PAPER_MODELS: dict[str, dict] = {
    "llama-3-8b": {  # meta-llama/Meta-Llama-3-8B
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "qwen2.5-7b": {  # Qwen/Qwen2.5-7B
        "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "max_position_embeddings": 131072, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "openpangu-embedded-7b": {  # openpangu/openPangu-Embedded-7B-model
        "model_type": "PanguEmbedded", "vocab_size": 153376, "hidden_size": 4096, "intermediate_size": 12800,
        "num_hidden_layers": 34, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 32768, "rope_theta": 16000000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "bias": True},
    "qwen2.5-14b": {  # Qwen/Qwen2.5-14B
        "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 5120, "intermediate_size": 13824,
        "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8,
        "max_position_embeddings": 131072, "rope_theta": 1000000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
}

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


# -- units ----------------------------------------------------------------------------------------
def parse_bytes(text: str, flag: str) -> int:
    """``1073741824``, ``1e9``, ``512MiB``, ``64GiB``, ``2GB`` (KB/MB/GB are powers of 1000)."""
    match = _SIZE.match(str(text))
    if not match:
        raise UserError(f"{flag} {text}: expected a size such as 64GiB, 512MiB or 1073741824")
    number, unit = float(match.group(1)), (match.group(2) or "b").lower()
    power = "bkmgt".index(unit[0])
    base = 1024 if unit.endswith("ib") or unit in ("k", "m", "g", "t") else 1000
    value = int(number * base ** power)
    if value <= 0:
        raise UserError(f"{flag} {text}: must be positive")
    return value


def format_bytes(value: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{int(value)} B"


# -- configs --------------------------------------------------------------------------------------
def load_config(name_or_path: str) -> ModelConfig:
    """A paper model by name (``llama-3-8b`` …) or a config.json file / model directory."""
    key = name_or_path.lower()
    if key in PAPER_MODELS:
        return ModelConfig.from_dict(dict(PAPER_MODELS[key]), f"config {key}")
    path = Path(name_or_path)
    if path.is_dir():
        return ModelConfig.from_dir(path)
    if path.is_file():
        return ModelConfig.from_dict(read_json(path, "config.json"), str(path))
    names = ", ".join(PAPER_MODELS)
    raise UserError(f"--model-config {name_or_path}: neither a known model ({names}) nor a config.json file or directory")


def as_gqa(config: ModelConfig) -> ModelConfig:
    """The original of a (partially) converted model: every layer GQA."""
    return config.replace(mla=None)


def as_mla(config: ModelConfig, kv_lora_rank: int, rope_dim: int) -> ModelConfig:
    """Every layer converted with a latent of ``kv_lora_rank`` and a shared RoPE key of ``rope_dim``."""
    if rope_dim < 2 or rope_dim % 2 or config.head_dim % rope_dim:
        raise UserError(f"--rope-dim {rope_dim}: must be even and divide head_dim {config.head_dim}")
    if kv_lora_rank < 1:
        raise UserError(f"--kv-lora-rank {kv_lora_rank}: must be positive")
    layers = config.num_hidden_layers
    collapse = config.head_dim // rope_dim  # the smallest legal fold; the arithmetic does not depend on it
    mla = MLAConfig(rope_dim=rope_dim, kv_lora_rank=[kv_lora_rank] * layers, fold_plan=[collapse] * layers)
    return config.replace(mla=mla)


def weight_count(config: ModelConfig) -> int:
    shapes = list(expected_global_shapes(config).values())
    for layer in range(config.num_hidden_layers):
        shapes += expected_layer_shapes(config, layer).values()
    return sum(math.prod(shape) for shape in shapes)


# -- the arithmetic -------------------------------------------------------------------------------
def plan(config: ModelConfig, memory: int, context: int, dtype_bytes: int, workspace: int,
         block_size: int = 16) -> dict:
    per_layer = [config.kv_values_per_token(layer) for layer in range(config.num_hidden_layers)]
    bytes_per_token = sum(per_layer) * dtype_bytes
    weights = weight_count(config) * dtype_bytes
    budget = max(0, memory - weights - workspace)
    slots = -(-context // block_size) * block_size
    per_sequence = slots * bytes_per_token
    return {
        "attention": _attention_summary(config),
        "kv_values_per_token_per_layer": per_layer,
        "kv_values_per_token": sum(per_layer),
        "kv_bytes_per_token": bytes_per_token,
        "weights_bytes": weights,
        "kv_budget_bytes": budget,
        "bytes_per_sequence": per_sequence,
        "max_sequences": budget // per_sequence,
    }


def _attention_summary(config: ModelConfig) -> str:
    mla_layers = sum(config.is_mla(layer) for layer in range(config.num_hidden_layers))
    if mla_layers == 0:
        return f"GQA ({config.num_key_value_heads} KV heads × {config.head_dim})"
    ranks = sorted({int(config.mla.kv_lora_rank[layer]) for layer in range(config.num_hidden_layers)
                    if config.is_mla(layer)})
    rank_text = "/".join(map(str, ranks))
    hybrid = f", {config.num_hidden_layers - mla_layers} GQA layers" if mla_layers < config.num_hidden_layers else ""
    return f"MLA (kv_lora_rank {rank_text} + rope {config.mla.rope_dim}{hybrid})"


def compare(original: ModelConfig, converted: ModelConfig, memory: int, context: int, dtype: str,
            workspace: int, block_size: int = 16) -> dict:
    if dtype not in DTYPE_BYTES:
        raise UserError(f"--dtype {dtype}: expected one of {', '.join(DTYPE_BYTES)}")
    if context < 1:
        raise UserError(f"--context {context}: must be positive")
    if workspace >= memory:
        raise UserError(f"--workspace {workspace} bytes leaves nothing of --memory {memory}")
    size = DTYPE_BYTES[dtype]
    before = plan(original, memory, context, size, workspace, block_size)
    after = plan(converted, memory, context, size, workspace, block_size)
    return {
        "memory_bytes": memory, "context": context, "dtype": dtype, "block_size": block_size,
        "workspace_bytes": workspace, "original": before, "converted": after,
        "kv_bytes_ratio": before["kv_bytes_per_token"] / after["kv_bytes_per_token"],
        "concurrency_ratio": (after["max_sequences"] / before["max_sequences"]) if before["max_sequences"] else None,
    }


def summary(result: dict, name: str) -> str:
    before, after = result["original"], result["converted"]
    rows = [
        ("attention", before["attention"], after["attention"]),
        ("KV values / token / layer", _per_layer_text(before), _per_layer_text(after)),
        ("KV bytes / token (model)", f"{before['kv_bytes_per_token']:,}", f"{after['kv_bytes_per_token']:,}"),
        ("weights", format_bytes(before["weights_bytes"]), format_bytes(after["weights_bytes"])),
        ("KV budget", format_bytes(before["kv_budget_bytes"]), format_bytes(after["kv_budget_bytes"])),
        ("bytes / sequence", format_bytes(before["bytes_per_sequence"]), format_bytes(after["bytes_per_sequence"])),
        ("max concurrent sequences", str(before["max_sequences"]), str(after["max_sequences"])),
    ]
    width = max(len(row[0]) for row in rows) + 2
    lines = [f"{name}: {format_bytes(result['memory_bytes'])} memory, context {result['context']} tokens, "
             f"{result['dtype']}, workspace reserve {format_bytes(result['workspace_bytes'])}",
             f"{'':{width}}{'original':>30}  {'converted':>30}"]
    lines += [f"{label:{width}}{a:>30}  {b:>30}" for label, a, b in rows]
    ratio = result["concurrency_ratio"]
    lines.append(f"KV bytes per token {result['kv_bytes_ratio']:.2f}× smaller; concurrency "
                 + (f"{ratio:.2f}×" if ratio is not None else "n/a (the original fits no sequence)"))
    for side in ("original", "converted"):
        measured = result.get("measured", {}).get(side)
        if measured:
            lines.append(f"measured {side}: held {measured['held']} sequences of {measured['prompt_len']}+"
                         f"{measured['gen_len']} tokens (predicted {measured['predicted']}), "
                         f"{measured['tokens_per_second']:.1f} generated tok/s, "
                         f"pool peak {measured['peak_blocks']}/{measured['usable_blocks']} blocks")
    return "\n".join(lines)


def _per_layer_text(side: dict) -> str:
    values = side["kv_values_per_token_per_layer"]
    counts: dict[int, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return ", ".join(f"{value}×{count}" if count > 1 else str(value) for value, count in counts.items())


# -- measurement ----------------------------------------------------------------------------------
def measure(runner, kv_budget: int, prompt_len: int, gen_len: int, attention: str = "auto", block_size: int = 16,
            seed: int = 0, max_requests: int = 512, progress=None) -> dict:
    """Fill a real pool of ``kv_budget`` bytes with identical (prompt_len + gen_len) requests.

    One more request than the arithmetic predicts is submitted, so the pool is the binding limit;
    the run stops when the first wave has generated its last token.
    """
    from .engine import Engine, EngineOptions
    from .kv_pool import kv_bytes_per_token
    from .sampling import SamplingParams

    if prompt_len < 1 or gen_len < 1:
        raise UserError("--prompt-len and --gen-len must be positive")
    config = runner.config
    if prompt_len + gen_len > config.max_position_embeddings:
        raise UserError(f"--prompt-len + --gen-len = {prompt_len + gen_len} exceeds the model's context "
                        f"{config.max_position_embeddings}")
    per_token = kv_bytes_per_token(config)
    lifetime = prompt_len + gen_len - 1
    blocks_per_sequence = -(-lifetime // block_size)
    num_blocks = kv_budget // (per_token * block_size)
    predicted = max(0, (num_blocks - 1) // blocks_per_sequence)
    if predicted + 1 > max_requests:
        raise UserError(f"the KV budget holds about {predicted} sequences; measuring more than {max_requests} at once "
                        "on this machine is impractical: lower --memory or raise --context")
    if predicted == 0:
        raise UserError(f"the KV budget ({format_bytes(kv_budget)}) does not hold one sequence of {lifetime} tokens")
    engine = Engine(runner, EngineOptions(num_blocks=num_blocks, block_size=block_size, max_batch=predicted + 1,
                                          attention=attention, admission="reserve", max_prefill_tokens=1 << 30))
    rng = np.random.default_rng(seed)
    special = {config.bos_token_id, config.eos_token_id}
    vocabulary = np.asarray([t for t in range(config.vocab_size) if t not in special])
    params = SamplingParams(max_new_tokens=gen_len, stop_token_ids=())  # every request runs to its full length
    for _ in range(predicted + 1):
        engine.add_request(rng.choice(vocabulary, prompt_len).tolist(), params)
    started = time.perf_counter()
    generated = finished = 0
    while engine.has_work() and finished == 0:
        events = engine.step()
        generated += sum(1 for event in events if event.token_id is not None)
        finished += sum(1 for event in events if event.finish_reason is not None)
        if progress is not None:
            progress(len(events))
    seconds = time.perf_counter() - started
    waiting_left = engine.num_waiting
    engine.reset()
    return {
        "held": engine.stats.max_running, "predicted": predicted, "submitted": predicted + 1,
        "still_waiting_when_the_wave_ended": waiting_left, "prompt_len": prompt_len, "gen_len": gen_len,
        "kv_bytes_per_token": per_token, "pool_bytes": num_blocks * per_token * block_size,
        "usable_blocks": num_blocks - 1, "peak_blocks": engine.stats.max_blocks_used,
        "preemptions": engine.stats.preemptions, "generated_tokens": generated, "seconds": seconds,
        "tokens_per_second": generated / seconds if seconds > 0 else 0.0,
        "decode_tokens_per_second": engine.stats.decode_tokens / engine.stats.decode_seconds
        if engine.stats.decode_seconds > 0 else 0.0,
        "attention": engine.attention.name,
    }


def weights_bytes_loaded(config: ModelConfig) -> int:
    """What the CPU engine holds: fp32 weights."""
    return weight_count(config) * 4


def workspace_bytes(text: Optional[str], memory: int) -> int:
    """``--workspace``: bytes, or a percentage of ``--memory`` (default 10%, as vLLM's 0.9 utilisation)."""
    text = "10%" if text is None else str(text).strip()
    if text.endswith("%"):
        try:
            share = float(text[:-1])
        except ValueError:
            raise UserError(f"--workspace {text}: expected bytes or a percentage such as 10%") from None
        if not 0 <= share < 100:
            raise UserError(f"--workspace {text}: the percentage must be in [0, 100)")
        return int(memory * share / 100)
    return parse_bytes(text, "--workspace")
