"""Training memory on CPU: `train --plan` (device cpu) against the measured peak of real runs.

One command: ``.venv/bin/python bench/train_memory.py [--calibrate] [--layer] [--only NAME ...]``.

Each row builds a tiny model in code (random weights of the shapes the project's family spec
gives, a word-level tokenizer, a text file), writes an SFT or GKD recipe and runs 3 optimizer
steps of ``mindyouzhi train`` in a fresh child process.  Measured = the child's peak RSS
(VmHWM of its own address space) minus its resident set after ``import mindspore``, ``set_device("CPU")``, one jitted op and
the trainer's imports — what the run adds to the runtime.  The plan is ``plan_recipe(recipe,
device="cpu")``; the row passes when |measured / plan − 1| ≤ 20 %.  Figures go to
``bench/results/train_memory.json`` and the table in docs/training.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mindyouzhi.io_utils import peak_rss_bytes  # noqa: E402

TOLERANCE = 0.20
WORDS = [f"w{i}" for i in range(120)]

# The table's rows: (name, run_mode, step form, layers, vocab, seq, hidden / heads / kv heads / ffn)
SMALL = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, intermediate_size=1536)
NANO = dict(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32)
ROWS = [
    ("sft-whole-L4-V16k-T256", "sft", False, 4, 16384, 256, SMALL),
    ("sft-whole-L4-V16k-T128", "sft", False, 4, 16384, 128, SMALL),
    ("sft-whole-L4-V4k-T256", "sft", False, 4, 4096, 256, SMALL),
    ("sft-whole-L8-V16k-T256", "sft", False, 8, 16384, 256, SMALL),
    ("sft-layerwise-L4-V16k-T256", "sft", True, 4, 16384, 256, SMALL),
    ("sft-layerwise-L8-V16k-T256", "sft", True, 8, 16384, 256, SMALL),
    ("sft-layerwise-L4-V16k-T128", "sft", True, 4, 16384, 128, SMALL),
    ("sft-layerwise-L4-V4k-T256", "sft", True, 4, 4096, 256, SMALL),
    ("gkd-mla-whole-L4-V16k-T256", "gkd", False, 4, 16384, 256, SMALL),
    ("gkd-mla-layerwise-L4-V16k-T256", "gkd", True, 4, 16384, 256, SMALL),
]
# --calibrate: where the counted buffers are small, measured − counted is the runtime's working set
# (layer-wise) and, per layer, the whole-graph compilation (cpu_memory.RUNTIME_BYTES and
# WHOLE_GRAPH_COMPILE_BYTES_PER_LAYER come from these rows); the GKD ones are checks.
NANO_ROWS = [
    ("nano-sft-layerwise-L4", "sft", True, 4, 128, 256, NANO),
    ("nano-sft-layerwise-L8", "sft", True, 8, 128, 256, NANO),
    ("nano-sft-whole-L4", "sft", False, 4, 128, 256, NANO),
    ("nano-sft-whole-L8", "sft", False, 8, 128, 256, NANO),
    ("nano-gkd-mla-whole-L4", "gkd", False, 4, 128, 256, NANO),
    ("nano-gkd-mla-layerwise-L4", "gkd", True, 4, 128, 256, NANO),
]
BATCH = 2
STEPS = 3



def child(recipe_path: str) -> None:
    """The measured run (a fresh process): baseline after the runtime is up, then the training."""
    import resource

    import mindspore as ms
    import numpy as np

    ms.set_device("CPU")
    ms.jit(_double)(ms.Tensor(np.ones(4, np.float32))).asnumpy()
    import mindyouzhi.models.runner  # noqa: F401  (the teacher's inference path: part of the baseline)
    from mindyouzhi.train.config import load_recipe
    from mindyouzhi.train.trainer import train

    # the resident set now, not ru_maxrss: importing leaves transient peaks that would hide what the run adds
    baseline = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    train(load_recipe(recipe_path), resume=False, show_progress=False)
    peak = peak_rss_bytes()  # VmHWM: ru_maxrss would carry a large parent's peak across exec
    print("MEASURED " + json.dumps({"baseline": baseline, "peak": peak}), flush=True)


def _double(x):
    return x * 2


def layer_child(batch: int, mode: str) -> None:
    """One GQA layer (the table's SMALL shape, 256 tokens per row) forward or gradient graph: the
    peak it adds, to compare with cpu_memory's op-by-op count per token."""
    import resource

    import mindspore as ms
    import numpy as np

    from mindyouzhi.models import functional as F
    from mindyouzhi.models.layers import causal_mask

    ms.set_device("CPU")
    seq, hidden, heads, kv_heads, ffn = 256, SMALL["hidden_size"], 8, 2, SMALL["intermediate_size"]
    head_dim = hidden // heads
    rng = np.random.default_rng(0)

    def tensor(*shape, scale=0.05):
        return ms.Tensor((rng.standard_normal(shape) * scale).astype(np.float32))

    ones = ms.Tensor(np.ones(hidden, np.float32))
    matrices = [tensor(ffn, hidden), tensor(ffn, hidden), tensor(hidden, ffn), tensor(heads * head_dim, hidden),
                tensor(kv_heads * head_dim, hidden), tensor(kv_heads * head_dim, hidden), tensor(hidden, heads * head_dim)]
    cos, sin = tensor(seq, head_dim // 2), tensor(seq, head_dim // 2)
    mask = ms.Tensor(causal_mask(seq))
    x, upstream = tensor(batch, seq, hidden, scale=1.0), tensor(batch, seq, hidden, scale=1.0)

    def objective(x, upstream, gate, up, down, wq, wk, wv, wo):
        weights = (ones, ones, gate, None, up, None, down, None, wq, None, wk, None, wv, None, wo, None, None, None)
        return (F.gqa_layer(x, cos, sin, mask, heads, kv_heads, head_dim, 1e-5, *weights) * upstream).sum()

    ms.jit(_double)(ms.Tensor(np.ones(4, np.float32))).asnumpy()
    baseline = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    function = ms.grad(objective, grad_position=tuple(range(9))) if mode == "grad" else objective
    out = ms.jit(function)(x, upstream, *matrices)
    (out[0] if isinstance(out, tuple) else out).asnumpy()
    peak = peak_rss_bytes()  # VmHWM: ru_maxrss would carry a large parent's peak across exec
    print("MEASURED " + json.dumps({"added": peak - baseline}), flush=True)


def layer_experiment() -> dict:
    """Floats per token one GQA layer's graph holds, measured (B = 8 minus B = 2) and counted."""
    from mindyouzhi.models.config import ModelConfig
    from mindyouzhi.train.cpu_memory import gqa_layer_elements

    config = ModelConfig.from_dict(model_config(1, 128, SMALL, mla=False))
    out = {}
    for mode in ("forward", "grad"):
        added = {}
        for batch in (2, 8):
            done = subprocess.run([sys.executable, __file__, "--layer-child", str(batch), mode], capture_output=True,
                                  text=True, env={**__import__("os").environ, "GLOG_v": "3"})
            line = [x for x in done.stdout.splitlines() if x.startswith("MEASURED ")]
            if done.returncode or not line:
                sys.exit(f"layer experiment failed\n{done.stderr[-3000:]}")
            added[batch] = json.loads(line[-1].split(" ", 1)[1])["added"]
        forward, backward = gqa_layer_elements(config, 1, 256)
        counted = forward + (backward if mode == "grad" else 0)
        # the objective's product with the upstream tensor (and its gradient) is not part of the layer
        counted += SMALL["hidden_size"] * (256 if mode == "forward" else 3 * 256)
        out[mode] = {"measured_floats_per_token": (added[8] - added[2]) / (6 * 256) / 4,
                     "counted_floats_per_token": counted / 256}
        print(f"one GQA layer, {mode}: measured {out[mode]['measured_floats_per_token']:.0f} floats per token, "
              f"counted {out[mode]['counted_floats_per_token']:.0f}", flush=True)
    return out


def model_config(layers: int, vocab: int, dims: dict, mla: bool) -> dict:
    config = dict(model_type="llama", vocab_size=vocab, num_hidden_layers=layers, rms_norm_eps=1e-5,
                  max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=False,
                  head_dim=dims["hidden_size"] // dims["num_attention_heads"], bos_token_id=1, eos_token_id=2,
                  **dims)
    if mla:
        rope = max(2, config["head_dim"] // 4)
        config["mla"] = {"rope_dim": rope, "kv_lora_rank": [2 * config["head_dim"]] * layers,
                         "fold_plan": [2] * layers}
    return config


def build_model(out: Path, config_dict: dict) -> Path:
    """Random weights of the family spec's shapes (what CausalLM loads), a word tokenizer."""
    import numpy as np
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from mindyouzhi.convert_weights.architectures import checkpoint_shapes
    from mindyouzhi.models.config import ModelConfig

    out.mkdir(parents=True, exist_ok=True)
    config = ModelConfig.from_dict(config_dict)
    rng = np.random.default_rng(0)
    tensors = {name: (rng.standard_normal(shape).astype(np.float32) * (0.05 if len(shape) == 2 else 0.0)
                      + (1.0 if len(shape) == 1 else 0.0)).astype(np.float32)
               for name, shape in checkpoint_shapes(config).items()}
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config_dict))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        '{"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}')
    return out


def write_recipe(path: Path, run_mode: str, recompute: bool, seq: int, student: Path, teacher, text: Path) -> Path:
    import yaml

    recipe = {"run_mode": run_mode, "seed": 0, "output_dir": str(path.parent / "run"),
              "model": {"student": str(student), **({"teacher": str(teacher)} if teacher else {})},
              "train_dataset": {"sources": [{"path": str(text), "format": "text"}], "seq_length": seq},
              "runner_config": {"batch_size": BATCH, "max_steps": STEPS, "overwrite_output": True},
              "lr_schedule": {"learning_rate": 1e-4},
              "recompute_config": {"recompute": recompute},
              "context": {"mode": 0, "device_target": "CPU"}}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def measure_row(row: tuple, root: Path) -> dict:
    """Plan and measured peak of one row (the run happens in a fresh child process)."""
    import numpy as np

    from mindyouzhi.train.config import load_recipe
    from mindyouzhi.train.memory import plan_recipe

    name, run_mode, recompute, layers, vocab, seq, dims = row
    work = root / name
    work.mkdir(parents=True, exist_ok=True)
    gkd = run_mode == "gkd"
    student = build_model(work / "student", model_config(layers, vocab, dims, mla=gkd))
    teacher = build_model(work / "teacher", model_config(layers, vocab, dims, mla=False)) if gkd else None
    rng = np.random.default_rng(1)
    text = work / "text.txt"
    text.write_text(" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), BATCH * STEPS * (seq + 1) + 64)) + "\n")
    recipe_path = write_recipe(work / "recipe.yaml", run_mode, recompute, seq, student, teacher, text)
    plan = plan_recipe(load_recipe(recipe_path), device="cpu")
    done = subprocess.run([sys.executable, __file__, "--child", str(recipe_path)], capture_output=True, text=True,
                          env={**__import__("os").environ, "MINDYOUZHI_NO_PROGRESS": "1", "GLOG_v": "3"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("MEASURED ")]
    if done.returncode or not lines:
        sys.exit(f"{name}: the training run failed\n{done.stderr[-3000:]}")
    measured = json.loads(lines[-1].split(" ", 1)[1])
    added = measured["peak"] - measured["baseline"]
    constants = sum(value for key, value in plan.rows.items() if "measured on a nano model" in key)
    return {"name": name, "run_mode": run_mode, "step": "layer-wise" if recompute else "whole graph",
            "layers": layers, "vocab": vocab, "seq": seq, "batch": BATCH, **dims,
            "plan_rows": plan.rows, "plan_bytes": plan.total, "measured_bytes": added,
            "counted_bytes": plan.total - constants, "baseline_bytes": measured["baseline"],
            "ratio": added / plan.total}


def calibration(results: list[dict]) -> dict:
    """The two nano-measured constants from the nano rows (measured − counted buffers)."""
    by_name = {r["name"]: r for r in results}
    runtime = [by_name[n]["measured_bytes"] - by_name[n]["counted_bytes"]
               for n in ("nano-sft-layerwise-L4", "nano-sft-layerwise-L8")]
    runtime_bytes = sum(runtime) / len(runtime)
    whole = by_name["nano-sft-whole-L8"]
    per_layer = (whole["measured_bytes"] - whole["counted_bytes"] - runtime_bytes) / whole["layers"]
    return {"runtime_bytes": runtime_bytes, "whole_graph_compile_bytes_per_layer": per_layer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="row names to run (default: all)")
    parser.add_argument("--calibrate", action="store_true", help="also run the nano rows that give the plan's two "
                                                                    "measured constants")
    parser.add_argument("--layer", action="store_true", help="also measure one GQA layer's forward and gradient "
                                                               "graph against the op-by-op count")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--layer-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    if args.layer_child:
        layer_child(int(args.layer_child[0]), args.layer_child[1])
        return
    layer = layer_experiment() if args.layer else None
    rows = [r for r in ROWS + (NANO_ROWS if args.calibrate else []) if not args.only or r[0] in args.only]
    results = []
    with tempfile.TemporaryDirectory(prefix="train-memory-") as tmp:
        for row in rows:
            result = measure_row(row, Path(tmp))
            results.append(result)
            verdict = "ok" if abs(result["ratio"] - 1) <= TOLERANCE else "OUTSIDE 20 %"
            print(f"{result['name']:<34} plan {result['plan_bytes'] / 2**20:7.0f} MiB  measured "
                  f"{result['measured_bytes'] / 2**20:7.0f} MiB  ratio {result['ratio']:.2f}  {verdict}", flush=True)
    payload = {"tolerance": TOLERANCE, "steps": STEPS, "rows": results, **({"one_layer": layer} if layer else {})}
    if args.calibrate and not args.only:
        payload["calibration"] = calibration(results)
        print("calibration: runtime working set {runtime_bytes:.0f} B, whole-graph compilation "
              "{whole_graph_compile_bytes_per_layer:.0f} B per layer".format(**payload["calibration"]))
    from bench.common import save

    save("train_memory", payload)
    if any(abs(r["ratio"] - 1) > TOLERANCE for r in results if r["name"] in {row[0] for row in ROWS}):
        sys.exit(1)


if __name__ == "__main__":
    main()
