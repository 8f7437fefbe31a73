"""bench/mindformers_check: does MindFormers take our export, and how far does its fine-tuning run here?

One command (MindFormers lives in its own environment: 2.1.0 pins mindspore~=2.11 and
hyper-parallel, neither on PyPI, so it is installed with ``--no-deps`` next to mindspore 2.10 by
``scripts/mindformers_env.sh [DIR]``, see docs/training.md):

    MINDFORMERS_PYTHON=DIR/bin/python .venv/bin/python bench/mindformers_check.py [--model DIR]

1. converts two models to MLA unless ``--model`` names a converted model: stories260K (shared
   folder; no attention biases: MindFormers' split MLA) and the same model with seeded random
   q/k/v/o biases added before conversion (openPangu's bias set: the concatenated MLA);
2. ``mindyouzhi export --format mindformers --recipe`` with a small SFT recipe over DISC-FinLLM
   (``computing_part.json``): the mcore checkpoint plus ``finetune_mindformers.yaml``;
3. in the MindFormers environment, the steps of MindFormers' ``run_mindformer.py`` on that YAML
   (``MindFormerConfig`` → ``set_output_path`` → ``build_context`` → ``Trainer(config).train()``), device CPU:
   * ``Trainer(config).train()``: records where it stops (exception type, the CPU-missing operator
     and the MindFormers frames);
   * the network it built (``TrainingDeepseekV3ForCausalLM``): its MLA class, parameter names,
     shapes and biases against the export, and whether every value MindFormers loaded equals the file;
   * that network's forward, and where it stops.

Prints the findings and writes ``bench/results/mindformers_check.json`` (one entry per model).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# Runs inside the MindFormers environment (no mindyouzhi there): argv = yaml path, export dir.
MINDFORMERS_SIDE = r'''
import json, sys, traceback
import numpy as np

def first_error(exc):
    lines = [l.strip() for l in str(exc).splitlines() if l.strip() and not set(l.strip()) <= set("-")]
    return type(exc).__name__ + ": " + " | ".join(lines[:3])

def stop(exc):
    """Where a step stopped: the exception type and, for a missing CPU kernel, the operator."""
    import re
    found = re.search(r"Unsupported op \[(\w+)\] on CPU", str(exc))
    return {"type": type(exc).__name__, "unsupported_op_on_cpu": found.group(1) if found else None,
            "message": first_error(exc)}

report = {}
yaml_path, export_dir = sys.argv[1], sys.argv[2]
import mindspore as ms
from mindformers.tools.register import MindFormerConfig
from mindformers.core.context import build_context
from mindformers.utils.file_utils import set_output_path
from mindformers.trainer import Trainer
import mindformers
report["mindformers_version"] = mindformers.__version__
report["mindspore_version"] = ms.__version__
config = MindFormerConfig(yaml_path)          # 2.1.0 applies its run-mode template here
config.context.device_target = "CPU"          # run_mindformer.py --device_target CPU
set_output_path(config.output_dir)
build_context(config)
from safetensors.numpy import load_file
trainer = Trainer(config)
try:
    trainer.train()
    report["trainer"] = "ran"
except Exception as exc:
    tb = traceback.extract_tb(exc.__traceback__)
    report["trainer"] = stop(exc)
    report["trainer_stopped_in"] = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in tb
                                    if "mindformers/" in f.filename][-3:]
net = getattr(trainer.trainer, "real_model", None)   # the network MindFormers built from the YAML
if net is None:
    report["model_class"] = None
    print("MINDFORMERS_REPORT " + json.dumps(report))
    sys.exit(0)
report["model_class"] = type(net).__name__
report["attention_class"] = next(type(c).__name__ for _, c in net.cells_and_names()
                                 if type(c).__name__.startswith("MLASelfAttention"))
exported = {}
for name in sorted(set(json.load(open(export_dir + "/param_name_map.json")).values())):
    exported.update(load_file(export_dir + "/" + name))
params = {p.name: p for p in net.get_parameters()}
want = {k: list(p.shape) for k, p in params.items()}
got = {k: list(v.shape) for k, v in exported.items()}
report["parameters"] = len(want)
report["biases"] = sorted(k for k in want if k.endswith(".bias"))
report["missing_in_export"] = sorted(set(want) - set(got))
report["extra_in_export"] = sorted(set(got) - set(want))
report["shape_mismatches"] = {k: [got[k], want[k]] for k in set(want) & set(got) if got[k] != want[k]}
report["values_loaded_by_mindformers_equal_export"] = all(
    np.array_equal(params[k].asnumpy(), exported[k]) for k in set(want) & set(got))
if not report["values_loaded_by_mindformers_equal_export"]:
    not_loaded, unused = ms.load_param_into_net(net, {k: ms.Parameter(ms.Tensor(v), name=k) for k, v in exported.items()},
                                                strict_load=True)
    report["load_param_into_net"] = {"not_loaded": list(not_loaded), "unused": list(unused)}
    report["values_equal_after_load_param_into_net"] = all(np.array_equal(params[k].asnumpy(), exported[k]) for k in got)
ids = ms.Tensor((np.arange(config.model.model_config.seq_length + 1) % 7 + 3).reshape(1, -1).astype(np.int32))
try:
    net(ids[:, :-1], labels=ids[:, 1:])
    report["forward"] = "ran"
except Exception as exc:
    report["forward"] = stop(exc)
print("MINDFORMERS_REPORT " + json.dumps(report))
'''


def check_in_mindformers(python: str, yaml_path: Path, export_dir: Path, cwd: Path) -> dict:
    """Run the MindFormers side in ``python``'s environment; its report as a dict."""
    done = subprocess.run([python, "-c", MINDFORMERS_SIDE, str(yaml_path), str(export_dir)], capture_output=True,
                          text=True, cwd=cwd, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("MINDFORMERS_REPORT ")]
    if not lines:
        raise RuntimeError(f"the MindFormers side failed before reporting:\n{done.stderr[-4000:]}")
    return json.loads(lines[-1].split(" ", 1)[1])


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MINDYOUZHI_NO_PROGRESS": "1"},
                          **kwargs)
    if done.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return done


def _convert(source: Path, out: Path) -> Path:
    calib, _ = common.wikitext()
    _run([common.cli(), "convert", "--model", str(source), "--out", str(out), "--rope-dim", "4",
          "--kv-lora-rank", "16", "--freqfold", "2", "--calib", str(calib), "--calib-tokens", "2048",
          "--calib-seq-len", "128", "--search-tokens", "512", "--search-seq-len", "128", "--overwrite"])
    return out


def _with_attention_biases(source: Path, out: Path, seed: int = 0) -> Path:
    """A copy of the Llama-layout ``source`` with q/k/v/o biases (normal, std 0.05) and ``attention_bias: true``."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    shutil.copytree(source, out)
    config = json.loads((out / "config.json").read_text())
    config["attention_bias"] = True
    (out / "config.json").write_text(json.dumps(config, indent=2))
    rng = np.random.default_rng(seed)
    for path in out.glob("*.safetensors"):
        tensors = load_file(path)
        for name in [n for n in tensors if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight",
                                                       "o_proj.weight"))]:
            rows = tensors[name].shape[0]
            tensors[name[:-len("weight")] + "bias"] = rng.normal(0.0, 0.05, rows).astype(np.float32)
        save_file(tensors, path, metadata={"format": "pt"})
    return out


def _sft_recipe(work: Path, model: Path, records: int, seq_length: int) -> Path:
    import yaml

    data = common.shared() / "data" / "sft" / "disc-finllm" / "computing_part.json"
    recipe = {"run_mode": "sft", "seed": 1, "output_dir": str(work / "mindformers_output"),
              "model": {"student": str(model)},
              "train_dataset": {"seq_length": seq_length, "packing": True,
                                "sources": [{"path": str(data), "format": "sft", "max_samples": records}]},
              "runner_config": {"epochs": 1, "batch_size": 1, "save_steps": 0},
              "lr_schedule": {"learning_rate": 1.0e-5, "warmup_ratio": 0.01},
              "context": {"device_target": "CPU"}}
    path = work / "sft_mindformers.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a converted MLA model (default: stories260K converted here)")
    parser.add_argument("--mindformers-python", default=os.environ.get("MINDFORMERS_PYTHON"),
                        help="python of the MindFormers environment (default: $MINDFORMERS_PYTHON)")
    parser.add_argument("--records", type=int, default=16)
    parser.add_argument("--seq-length", type=int, default=128)
    args = parser.parse_args()
    if not args.mindformers_python or not Path(args.mindformers_python).is_file():
        sys.exit("error: --mindformers-python (or MINDFORMERS_PYTHON) must name the python of an environment with "
                 "mindformers 2.1.0 installed (see docs/training.md)")
    reports = {}
    with tempfile.TemporaryDirectory(prefix="mf-check-") as tmp:
        work = Path(tmp)
        if args.model:
            models = {str(args.model): args.model}
        else:
            stories = common.stories260k()
            models = {"stories260K → MLA (rope 4, rank 16, fold 2)": _convert(stories, work / "stories-mla"),
                      "stories260K + q/k/v/o biases → MLA (rope 4, rank 16, fold 2)":
                          _convert(_with_attention_biases(stories, work / "stories-biased"), work / "biased-mla")}
        for label, model in models.items():
            recipe = _sft_recipe(work, model, args.records, args.seq_length)
            export = work / f"export-mindformers-{len(reports)}"
            _run([common.cli(), "export", "--model", str(model), "--out", str(export), "--format", "mindformers",
                  "--recipe", str(recipe)])
            reports[label] = check_in_mindformers(args.mindformers_python, export / "finetune_mindformers.yaml",
                                                  export, work)
    print(common.dump(reports))
    common.save("mindformers_check", {"models": reports})


if __name__ == "__main__":
    main()
