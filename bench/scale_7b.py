"""bench/scale_7b: the paper's scale on this machine — a Qwen2.5-7B-shaped checkpoint converted
by streaming with the paper's setting (rope 64, kv_lora_rank 512), then exported.

The checkpoint has Qwen2.5-7B's shape (28 layers, hidden 3584, 28 query / 4 KV heads of 128,
FFN 18944, vocab 152,064, q/k/v biases, rope θ 1e6, untied head) and random bf16 weights
(matrices of standard deviation ≈ 1/sqrt(fan_in), RMSNorm weights 1, so activations stay
finite), written as sharded safetensors with a word-level ``tokenizer.json`` built from the
calibration text, into a scratch directory outside the repository (default
``~/.cache/mindyouzhi/bench/scale-7b``; never committed).  The weights are random, so perplexities
mean nothing: this measures cost and shapes only.

For each calibration budget it runs ``mindyouzhi convert --rope-dim 64 --kv-lora-rank 512
--freqfold F`` (a fixed fold: the adaptive search at this size is out of scope) in a child
process, polling the child's VmHWM and the machine's MemAvailable, and reads the report's
``peak_rss_bytes`` and timings.  On a shared machine whole-run times move more with the
neighbours than with a few thousand calibration tokens, so the projection to 32k tokens is built
from parts: the per-layer fixed work (each run's seconds per layer minus its budget's share) plus
the budget-proportional work of one layer (Gram + forward) measured directly (``token_cost``).
Then ``mindyouzhi export`` and a check that the exported config's ``qk_rope_head_dim +
kv_lora_rank`` is 576, the only head width vLLM's MLA backend accepts.  First, ``eval ppl`` of the
source model with its default choice: the loaded weights would not fit, so it streams layers.

    .venv/bin/python bench/scale_7b.py [--layers 28] [--calib-tokens 256,2048] [--fold 4]
    .venv/bin/python bench/scale_7b.py --layers 28 --calib-tokens 256 --convert-layers last:1
    .venv/bin/python bench/scale_7b.py --layers 28 --eval-only          # eval ppl of the 28-layer model

``--layers N`` builds the 7B shape with only N layers (per-layer cost and the export on a busy
machine, then extrapolate); ``--convert-layers last:1`` streams, reads and writes every layer but
converts one (the full-depth peak, cheaply).  The scratch checkpoint is reused while its config is
unchanged.  Results: ``bench/results/scale_7b_<N>l[_partial].json`` (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# Qwen2.5-7B (config.json of the public release): the shape this bench reproduces.
QWEN25_7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 152064}
PAPER_ROPE_DIM, PAPER_RANK = 64, 512
VLLM_MLA_HEAD = 576  # kv_lora_rank + qk_rope_head_dim that vLLM's MLA kernels accept
EOS, UNK = "<|endoftext|>", "<unk>"
GiB = 2 ** 30


def qwen2_config(hidden_size: int, intermediate_size: int, num_hidden_layers: int, num_attention_heads: int,
                 num_key_value_heads: int, head_dim: int, vocab_size: int) -> dict:
    """An HF ``config.json`` of a Qwen2 model of this shape (biases on q/k/v are implied by qwen2)."""
    assert hidden_size == num_attention_heads * head_dim, "Qwen2 has head_dim = hidden / heads"
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
            "hidden_size": hidden_size, "intermediate_size": intermediate_size,
            "num_hidden_layers": num_hidden_layers, "num_attention_heads": num_attention_heads,
            "num_key_value_heads": num_key_value_heads, "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "vocab_size": vocab_size,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": None, "eos_token_id": 0,
            "use_sliding_window": False, "attention_dropout": 0.0, "initializer_range": 0.02}


def _scale(name: str, shape: tuple[int, ...]) -> float:
    """Target standard deviation: matrices 1/sqrt(fan_in), embeddings 1, biases 0.1; 0 = RMSNorm weight 1."""
    if name.endswith("norm.weight"):
        return 0.0
    if name == "model.embed_tokens.weight":
        return 1.0
    if name.endswith(".bias"):
        return 0.1
    return 1.0 / math.sqrt(shape[-1])


ONE_BF16 = 0x3F80


def random_bf16(rng: np.random.Generator, count: int, std: float) -> np.ndarray:
    """``count`` random bf16 bit patterns: random sign and mantissa, one exponent, so the values are
    ±[1, 2)·2^e with e chosen for a standard deviation within √2 of ``std`` (1.0 exactly for std 0).
    Drawing bits is several times faster than drawing normals, which matters for 15 GB."""
    if std == 0.0:
        return np.full(count, ONE_BF16, np.uint16)
    exponent = round(math.log2(std / math.sqrt(7 / 3)))  # E[(1+u)^2] = 7/3 for u uniform in [0, 1)
    bits = np.frombuffer(rng.bytes(2 * count), np.uint16)
    return (bits & np.uint16(0x807F)) | np.uint16((exponent + 127) << 7)


def write_random_checkpoint(out: Path, hf_config: dict, seed: int = 0, max_shard_bytes: int = 4 << 30,
                            chunk_values: int = 1 << 26) -> int:
    """Write random bf16 weights of ``hf_config``'s shape to ``out`` (sharded safetensors, index,
    config.json last); memory stays at one chunk of ``chunk_values`` floats.  Returns the bytes."""
    from mindyouzhi.convert_weights.architectures import checkpoint_shapes
    from mindyouzhi.models.config import ModelConfig

    shapes = checkpoint_shapes(ModelConfig.from_dict(hf_config))
    shards: list[dict] = [{}]
    sizes = [0]
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if sizes[-1] and sizes[-1] + nbytes > max_shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [sizes[-1], sizes[-1] + nbytes]}
        sizes[-1] += nbytes
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    for file, entries in zip(files, shards):
        header = json.dumps({**entries, "__metadata__": {"format": "pt"}}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        partial = out / f".{file}.partial"
        with open(partial, "wb") as handle:
            handle.write(struct.pack("<Q", len(header)) + header)
            for name, entry in entries.items():
                count, std = math.prod(entry["shape"]), _scale(name, tuple(entry["shape"]))
                for start in range(0, count, chunk_values):
                    handle.write(random_bf16(rng, min(chunk_values, count - start), std).data)
        os.replace(partial, out / file)
    index = {"metadata": {"total_size": sum(sizes)},
             "weight_map": {name: file for file, entries in zip(files, shards) for name in entries}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")  # last: marks the checkpoint complete
    return sum(sizes)


def write_word_tokenizer(out: Path, text: str, vocab_size: int) -> int:
    """A whitespace word-level ``tokenizer.json`` over the ``vocab_size - 2`` most frequent words of
    ``text`` (id 0 = EOS, 1 = unknown word): enough to tokenize calibration text.  Returns its size."""
    import tokenizers

    counts = collections.Counter(text.split())
    counts.pop(EOS, None), counts.pop(UNK, None)
    vocab = {EOS: 0, UNK: 1}
    for word, _ in counts.most_common(vocab_size - 2):
        vocab[word] = len(vocab)
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.add_special_tokens([EOS])
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": EOS}) + "\n")
    return len(vocab)


def prepare(out: Path, hf_config: dict, text_path: Path, seed: int) -> None:
    config_path = out / "config.json"
    if config_path.is_file() and json.loads(config_path.read_text()) == hf_config and (out / "tokenizer.json").is_file():
        print(f"reusing the checkpoint in {out}")
        return
    if out.exists():
        shutil.rmtree(out)  # our own scratch checkpoint of another shape
    started = time.perf_counter()
    out.mkdir(parents=True)
    write_word_tokenizer(out, text_path.read_text(encoding="utf-8"), hf_config["vocab_size"])
    total = write_random_checkpoint(out, hf_config, seed)
    print(f"wrote {total / GiB:.1f} GiB of random bf16 weights to {out} in {time.perf_counter() - started:.0f} s")


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_measured(cmd: list[str], interval: float = 0.2) -> dict:
    """Run ``cmd``; wall seconds, CPU seconds (user + system: far less sensitive than wall time
    to the other processes of a shared machine), the child's VmHWM (polled), the lowest
    MemAvailable seen, stdout."""
    env = {**os.environ, "MINDYOUZHI_NO_PROGRESS": "1"}
    cpu = _children_cpu()
    started = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    hwm, lowest = 0, mem_available()
    status = Path(f"/proc/{child.pid}/status")
    while child.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    hwm = max(hwm, int(line.split()[1]) * 1024)
        except OSError:
            pass
        lowest = min(lowest, mem_available())
        time.sleep(interval)
    stdout, stderr = child.communicate()
    seconds = time.perf_counter() - started
    if child.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{stderr[-3000:]}")
    return {"seconds": seconds, "cpu_seconds": _children_cpu() - cpu, "vmhwm_bytes": hwm,
            "min_mem_available_bytes": lowest, "stdout": stdout}


def token_cost(model: Path, tokens: int, seq_len: int, batch_size: int, precision: str) -> dict:
    """Wall and CPU seconds of the budget-proportional work of one layer, measured directly with
    the conversion's own functions: the layer's Gram over ``tokens`` calibration tokens and its
    forward over them (``StatisticsStream.statistics`` / ``advance``; the attention-distance
    profile reads a fixed number of windows).  The graph is compiled and warmed on one batch first."""
    from mindyouzhi.convert_weights.safetensors_io import SafetensorsStore
    from mindyouzhi.models.config import ModelConfig
    from mindyouzhi.models.decoder import read_layer_weights
    from mindyouzhi.models.runner import ensure_device
    from mindyouzhi.transition.calibration import LayerRunner, layer_gram, resolve_forward_precision

    ensure_device()
    config, store = ModelConfig.from_dir(model), SafetensorsStore(model)
    weights = read_layer_weights(store, config, 0, str(model))
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (tokens // seq_len, seq_len))
    hidden = store.get("model.embed_tokens.weight")[ids]
    runner = LayerRunner(seq_len, batch_size, resolve_forward_precision(precision)[0])
    forward = runner.cell(config, 0, weights)
    forward(hidden[:runner.batch_size])  # compile
    wall, cpu = time.perf_counter(), time.process_time()
    layer_gram(hidden, weights, config.rms_norm_eps)
    gram_wall, gram_cpu = time.perf_counter() - wall, time.process_time() - cpu
    wall, cpu = time.perf_counter(), time.process_time()
    forward(hidden)
    forward_wall, forward_cpu = time.perf_counter() - wall, time.process_time() - cpu
    per_1k = 1024 / tokens
    return {"tokens": tokens, "gram_seconds": gram_wall, "gram_cpu_seconds": gram_cpu,
            "forward_seconds": forward_wall, "forward_cpu_seconds": forward_cpu,
            "seconds_per_1k_tokens": (gram_wall + forward_wall) * per_1k,
            "cpu_seconds_per_1k_tokens": (gram_cpu + forward_cpu) * per_1k}


def project(runs: list[dict], stream_per_1k: float, seq_len: int, tokens: int = 32768) -> dict:
    """Seconds per layer at ``tokens`` calibration tokens from whole runs at two or more budgets.

    Per layer t(k) = F + P·min(k, k_profile) + S·k (k in thousands of tokens): S the calibration
    stream's Gram + forward, measured directly (``token_cost``); P the attention-distance profile,
    which reads only the first ``PROFILE_TOKENS`` tokens in whole windows (k_profile); F the fixed work.  The runs'
    slope between budgets below k_profile is P + S, their intercept F.  With one budget, P = 0."""
    from mindyouzhi.transition.positions import PROFILE_TOKENS

    k_profile = max(1, PROFILE_TOKENS // seq_len) * seq_len / 1024
    below = [r for r in runs if r["calib_tokens"] / 1024 <= k_profile] or runs
    if len({r["calib_tokens"] for r in below}) < 2:
        fixed, slope = below[0]["seconds_per_layer"] - stream_per_1k * below[0]["calib_tokens"] / 1024, stream_per_1k
    else:
        slope, fixed = (float(v) for v in np.polyfit([r["calib_tokens"] / 1024 for r in below],
                                                     [r["seconds_per_layer"] for r in below], 1))
    profile = max(slope - stream_per_1k, 0.0)
    k = tokens / 1024
    per_layer = fixed + profile * min(k, k_profile) + stream_per_1k * k
    return {"fixed_seconds_per_layer": fixed, "profile_seconds_per_1k_tokens": profile,
            "profile_tokens_cap": int(k_profile * 1024), "stream_seconds_per_1k_tokens": stream_per_1k,
            "seconds_per_layer": per_layer, "wall_seconds_28_layers": QWEN25_7B["num_hidden_layers"] * per_layer}


def eval_ppl_streamed(cli: str, model: Path, text: Path, windows: int, seq_len: int) -> dict:
    """``eval ppl`` of the unconverted 7B-shaped model with its default choice of streaming (every
    window through a layer before the next is read: the loaded fp32 weights would take ~28 GiB on a
    24 GiB machine), with the child's peak RSS."""
    measured = run_measured([cli, "eval", "ppl", "--model", str(model), "--data", str(text), "--seq-len", str(seq_len),
                             "--max-windows", str(windows), "--json"])
    report = json.loads(measured.pop("stdout"))
    return {"streamed_layers": report["streamed_layers"], "ppl": report["ppl"], "windows": report["windows"],
            "seq_len": report["seq_len"], "forward_precision": report["forward_precision"]["used"],
            "wall_seconds": measured["seconds"], "cpu_seconds": measured["cpu_seconds"],
            "peak_rss_bytes": measured["vmhwm_bytes"], "min_mem_available_bytes": measured["min_mem_available_bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=QWEN25_7B["num_hidden_layers"],
                        help="layers of the 7B shape to build (fewer: measure and extrapolate)")
    parser.add_argument("--calib-tokens", default="256,2048", help="one or more budgets, comma-separated")
    parser.add_argument("--calib-seq-len", type=int, default=256)
    parser.add_argument("--fold", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8, help="convert --batch-size (windows per layer forward)")
    parser.add_argument("--forward-precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--scratch", type=Path, default=common.CACHE / "scale-7b")
    parser.add_argument("--convert-layers", default="all",
                        help="convert --layers (e.g. last:1: the others stay GQA but are still streamed and written, "
                             "which measures a full-depth stream's peak cheaply; no export then)")
    parser.add_argument("--keep-outputs", action="store_true", help="keep the converted and exported models")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-windows", type=int, default=2, help="eval ppl of the source model: windows")
    parser.add_argument("--eval-seq-len", type=int, default=512, help="eval ppl of the source model: tokens per window")
    parser.add_argument("--eval-only", action="store_true", help="only eval ppl of the source model (no conversion)")
    parser.add_argument("--token-cost-tokens", type=int, default=4096,
                        help="tokens of the direct measurement of one layer's budget-proportional work")
    args = parser.parse_args()
    budgets = sorted(int(b) for b in args.calib_tokens.split(","))
    calib, _ = common.wikitext()
    hf_config = qwen2_config(**{**QWEN25_7B, "num_hidden_layers": args.layers})
    model = args.scratch / f"qwen2.5-7b-shape-{args.layers}l"
    prepare(model, hf_config, calib, args.seed)
    cli = common.cli()
    _, test = common.wikitext()
    print(f"eval ppl of the {args.layers}-layer source model (MemAvailable {mem_available() / GiB:.1f} GiB) ...",
          flush=True)
    evaluation = eval_ppl_streamed(cli, model, test, args.eval_windows, args.eval_seq_len)
    print(f"  streamed layers: {evaluation['streamed_layers']}, wall {evaluation['wall_seconds']:.0f} s, peak RSS "
          f"{evaluation['peak_rss_bytes'] / GiB:.2f} GiB", flush=True)
    if args.eval_only:
        common.save(f"scale_7b_{args.layers}l_eval", {"eval_ppl": evaluation})
        return
    runs = []
    for budget in budgets:
        out = args.scratch / f"converted-{args.layers}l-{budget}"
        print(f"converting {args.layers} layers with {budget} calibration tokens (MemAvailable "
              f"{mem_available() / GiB:.1f} GiB) ...", flush=True)
        measured = run_measured([cli, "convert", "--model", str(model), "--out", str(out), "--calib", str(calib),
                                 "--calib-tokens", str(budget), "--calib-seq-len", str(args.calib_seq_len),
                                 "--rope-dim", str(PAPER_ROPE_DIM), "--kv-lora-rank", str(PAPER_RANK),
                                 "--freqfold", str(args.fold), "--batch-size", str(args.batch_size),
                                 "--layers", args.convert_layers,
                                 "--forward-precision", args.forward_precision, "--overwrite", "--json"])
        report = json.loads(measured.pop("stdout"))
        converted = sum(f is not None for f in report["fold_plan"])
        timings = report["timings_seconds"]
        runs.append({"calib_tokens": budget, "wall_seconds": measured["seconds"], "cpu_seconds": measured["cpu_seconds"],
                     "peak_rss_bytes_report": report["peak_rss_bytes"], "vmhwm_bytes_polled": measured["vmhwm_bytes"],
                     "peak_rss_bytes": max(report["peak_rss_bytes"], measured["vmhwm_bytes"]),
                     "min_mem_available_bytes": measured["min_mem_available_bytes"],
                     "forward_precision": report.get("forward_precision"), "timings_seconds": timings,
                     "converted_layers": converted,
                     "seconds_per_layer": timings["convert"] / converted,
                     "seconds_per_layer_per_1k_tokens": timings["convert"] / converted / (budget / 1024),
                     "cpu_seconds_per_layer": measured["cpu_seconds"] / converted})
        print(f"  wall {measured['seconds']:.0f} s (CPU {measured['cpu_seconds']:.0f} s), convert "
              f"{timings['convert']:.0f} s, peak RSS "
              f"{runs[-1]['peak_rss_bytes'] / GiB:.2f} GiB", flush=True)
        if budget != budgets[-1] and not args.keep_outputs:
            shutil.rmtree(out)
    out = args.scratch / f"converted-{args.layers}l-{budgets[-1]}"
    result = {
        "shape": {**QWEN25_7B, "qkv_bias": True, "rope_theta": 1e6, "tie_word_embeddings": False},
        "layers_built": args.layers, "checkpoint_bf16_bytes": sum(p.stat().st_size for p in model.glob("*.safetensors")),
        "setting": {"rope_dim": PAPER_ROPE_DIM, "kv_lora_rank": PAPER_RANK, "freqfold": args.fold, "search": False,
                    "convert_layers": args.convert_layers, "calib_seq_len": args.calib_seq_len,
                    "batch_size": args.batch_size},
        "runs": runs,
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs), "peak_rss_limit_bytes": 20 * GiB,
        "eval_ppl": evaluation,
    }
    width = None
    if all(r["converted_layers"] == args.layers for r in runs):  # export needs every layer converted
        cost = token_cost(model, args.token_cost_tokens, args.calib_seq_len, args.batch_size, args.forward_precision)
        result["token_cost"] = cost
        result["projected_32k"] = project(runs, cost["seconds_per_1k_tokens"], args.calib_seq_len)
        result["projected_32k"]["wall_seconds_28_layers"] += min(r["wall_seconds"] - r["timings_seconds"]["convert"]
                                                                 for r in runs)  # start-up, tokenization
        exported = args.scratch / f"exported-{args.layers}l"
        export = run_measured([cli, "export", "--model", str(out), "--out", str(exported), "--overwrite", "--json"])
        exported_config = json.loads((exported / "config.json").read_text())
        width = exported_config["kv_lora_rank"] + exported_config["qk_rope_head_dim"]
        result["export"] = {"seconds": export["seconds"], "vmhwm_bytes": export["vmhwm_bytes"],
                            "kv_lora_rank": exported_config["kv_lora_rank"],
                            "qk_rope_head_dim": exported_config["qk_rope_head_dim"], "head_width": width,
                            "vllm_mla_head_ok": width == VLLM_MLA_HEAD}
        if not args.keep_outputs:
            shutil.rmtree(exported)
    if not args.keep_outputs:
        shutil.rmtree(out)
    result["load_average_1m_at_end"] = os.getloadavg()[0]
    print(common.dump({k: v for k, v in result.items() if k != "runs"}))
    common.save(f"scale_7b_{args.layers}l" + ("" if args.convert_layers == "all" else "_partial"), result)
    if width is not None and width != VLLM_MLA_HEAD:
        sys.exit(f"exported head width {width}, vLLM's MLA backend needs {VLLM_MLA_HEAD}")

if __name__ == "__main__":
    main()
