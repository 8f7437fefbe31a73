"""Benchmark: how much of the conversion's perplexity loss post-training recovers.

    python bench/recover.py [--teacher DIR] [--student DIR] [--shared ../shared] [--work DIR]
                            [--gkd-steps 40] [--sft-steps 8] [--eval-windows 40]

SmolLM2-135M-Instruct (teacher, GQA) → its MLA conversion (``--rope-dim 32 --kv-lora-rank 96
--freqfold 4``, calibrated on ``wiki.valid.tokens``) → stage 1 GKD (forward KL to the teacher,
off-policy) on ``wiki.valid.tokens`` windows + the DISC-FinLLM finance SFT pairs → stage 2 SFT on
the finance pairs, each for a fixed budget of optimizer steps.  Perplexity on the first
``--eval-windows`` windows of 512 tokens of WikiText-2 raw **test** (never used for training,
calibration or any choice) for the teacher, the student before, after GKD and after SFT.

Target: the gap to the teacher, ppl(student) − ppl(teacher), closed by ≥ 50%.  Training runs as
``python -m mindyouzhi.train --config`` subprocesses with generated recipes (in ``--work``), so the
recipes, logs and curves of the measured run stay inspectable; training tokens/s are taken from
their summaries.  Writes ``bench/results/recover.json``.

``--packing-study`` instead compares the two packed-attention modes of SFT from the converted
student (no GKD): ``train_dataset.packed_attention`` shared vs isolated, same data, steps and
seed; reports the first-step loss (same weights, same batch: the effect of the mask alone), the
loss curves and the wiki.test.raw perplexity of both results.  Writes
``bench/results/packing.json`` (with ``--sft-steps 0`` only the no-training mask comparison, to
``packing_mask.json``).

Measured (2026-11-28, 2-core CPU shared with other jobs, load average 6–13): teacher 28.69, student
before 78.57, after GKD (40 steps = 81,920 tokens) 36.78, after SFT (8 steps = 16,384 tokens)
36.38 — gap closed 83.8% / 84.6%; GKD 45 train tokens/s (teacher forward included), SFT 153.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mindyouzhi.io_utils import write_json_atomic  # noqa: E402

RESULTS = REPO / "bench" / "results" / "recover.json"
VENV_BIN = Path(sys.executable).parent


def run(command: list[str], log: Path) -> str:
    """Run a child command, keep its stderr in ``log``, return stdout; fail loudly."""
    env = dict(os.environ, MINDYOUZHI_NO_PROGRESS="1", GLOG_v=os.environ.get("GLOG_v", "3"))
    env["PATH"] = str(VENV_BIN) + os.pathsep + env.get("PATH", "")
    with open(log, "w") as err:
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=err, env=env, text=True)
    if result.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"command failed ({result.returncode}): {' '.join(command)}\n{tail}")
    return result.stdout


def cli(*args: str, log: Path) -> dict:
    return json.loads(run([str(VENV_BIN / "mindyouzhi"), *args, "--json"], log).strip().splitlines()[-1])


def ppl(model: Path, test: Path, windows: int, work: Path, name: str) -> dict:
    """``eval ppl`` of a model; reused from ``work`` when the same weights were already scored."""
    weights = sorted(model.glob("*.safetensors"))
    key = {"model": str(model.resolve()), "windows": windows, "data": str(test),
           "weights": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights]}
    cache = work / f"ppl-{name}.json"
    if cache.is_file() and json.loads(cache.read_text()).get("key") == key:
        result = json.loads(cache.read_text())["result"]
        print(f"  ppl {name:<14} {result['ppl']:.4f}  (measured earlier, same weights)", flush=True)
        return result
    started = time.perf_counter()
    result = cli("eval", "ppl", "--model", str(model), "--data", str(test), "--seq-len", "512",
                 "--max-windows", str(windows), log=work / f"ppl-{name}.log")
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    cache.write_text(json.dumps({"key": key, "result": result}))
    print(f"  ppl {name:<14} {result['ppl']:.4f}  ({result['tokens']} tokens, {result['wall_seconds']} s)", flush=True)
    return result


def train(recipe: dict, work: Path, name: str) -> dict:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True))
    started = time.perf_counter()
    summary = json.loads(run([sys.executable, "-m", "mindyouzhi.train", "--config", str(path), "--json"],
                             work / f"{name}.log").strip().splitlines()[-1])
    summary["wall_seconds_including_startup"] = round(time.perf_counter() - started, 1)
    print(f"  {name}: {summary['steps_run']} steps, loss {summary['first_loss']:.4f} → {summary['final_loss']:.4f}, "
          f"{summary['tokens_per_second']:.1f} train tokens/s, {summary['train_seconds']:.0f} s", flush=True)
    return summary


def base_recipe(run_mode: str, output: Path, student: Path, sources: list, seq_length: int, steps: int,
                batch_size: int, accumulation: int, learning_rate: float, warmup_ratio: float) -> dict:
    return {
        "run_mode": run_mode, "seed": 42, "output_dir": str(output),
        "model": {"student": str(student), "trainable": "all"},
        "train_dataset": {"seq_length": seq_length, "packing": True, "shuffle": True, "sources": sources},
        "runner_config": {"epochs": 1 if run_mode == "gkd" else 2, "batch_size": batch_size,
                          "gradient_accumulation_steps": accumulation, "max_steps": steps,
                          "save_steps": max(10, steps // 4), "keep_checkpoints": 1},
        "runner_wrapper": {"use_clip_grad": True, "max_grad_norm": 1.0},
        "optimizer": {"type": "AdamW", "betas": [0.9, 0.95], "eps": 1.0e-8, "weight_decay": 0.0},
        "lr_schedule": {"type": "CosineWithWarmUpLR", "learning_rate": learning_rate, "lr_end": 0.0,
                        "warmup_ratio": warmup_ratio},
        "recompute_config": {"recompute": True},
        "parallel_config": {"data_parallel": 1},
        "context": {"mode": 0, "device_target": "CPU"},
    }


def gap_closed(teacher: float, before: float, after: float) -> float:
    return (before - after) / (before - teacher) if before != teacher else float("nan")


def mask_effect(student: Path, finance: Path, seq_length: int) -> dict:
    """Response-token loss of the examples packed *after* another one in a window (the ones the
    mask changes), under the shared and the isolated mask: same weights, no training."""
    import numpy as np

    from mindyouzhi.convert_weights.safetensors_io import SafetensorsStore
    from mindyouzhi.models.config import ModelConfig
    from mindyouzhi.models.decoder import CausalLM, RopeTables
    from mindyouzhi.models.layers import causal_mask, to_tensor
    from mindyouzhi.tokenizer import load_tokenizer
    from mindyouzhi.train.config import DataSource
    from mindyouzhi.train.data import attention_mask, build_dataset, collate

    import mindspore as ms

    config = ModelConfig.from_dir(student)
    net = CausalLM(config, SafetensorsStore(student), where=str(student))
    tables = tuple(to_tensor(t) for t in RopeTables(config)(seq_length))
    data = build_dataset(load_tokenizer(student), [DataSource(finance, "sft")], seq_length, True, "packing study")
    windows = [e for e in data.examples if len(e.segments) > 1]
    sums = {"shared": 0.0, "isolated": 0.0}
    count = 0
    for example in windows:
        batch = collate([example], seq_length, 0)
        later = batch.mask[0] & (batch.segments[0] > 0)  # loss positions of the 2nd, 3rd, … example
        count += int(later.sum())
        for mode, mask in (("shared", causal_mask(seq_length)), ("isolated", attention_mask(batch.segments)[0])):
            logits = net(to_tensor(batch.ids, ms.int32), *tables, to_tensor(mask)).asnumpy()[0].astype(np.float64)
            logits -= logits.max(-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            sums[mode] += float(-logp[np.arange(seq_length), batch.targets[0]][later].sum())
    loss = {mode: total / count for mode, total in sums.items()}
    return {"seq_length": seq_length, "windows": len(data.examples), "windows_with_several_examples": len(windows),
            "scored_tokens": count, "loss": loss, "ppl": {mode: float(np.exp(v)) for mode, v in loss.items()}}


def packing_study(student: Path, finance: Path, test: Path, args, work: Path) -> None:
    started = time.perf_counter()
    effect = mask_effect(student, finance, args.mask_seq_length)
    print(f"mask alone, {effect['windows_with_several_examples']} of {effect['windows']} windows of "
          f"{effect['seq_length']} hold several examples; loss of the later examples' {effect['scored_tokens']} "
          f"response tokens: shared {effect['loss']['shared']:.4f}, isolated {effect['loss']['isolated']:.4f}",
          flush=True)
    runs = {}
    for mode in (("shared", "isolated") if args.sft_steps > 0 else ()):
        recipe = base_recipe("sft", work / f"sft-{mode}", student, [{"path": str(finance), "format": "sft"}], 512,
                             args.sft_steps, 2, 2, args.sft_lr, 0.01)
        recipe["train_dataset"]["packed_attention"] = mode
        recipe["runner_config"]["save_steps"] = 0
        print(f"SFT, packed_attention {mode}: {args.sft_steps} steps × 4 × 512 tokens", flush=True)
        summary = train(recipe, work, f"sft-{mode}")
        log = [json.loads(line) for line in (work / f"sft-{mode}" / "train_log.jsonl").read_text().splitlines()]
        runs[mode] = {"losses": [r["loss"] for r in log], "summary": summary,
                      "ppl": ppl(work / f"sft-{mode}" / "final", test, args.eval_windows, work, f"sft-{mode}")}
    report = {"benchmark": "packing", "student": str(student), "mask_effect": effect,
              "budget": {"steps": args.sft_steps, "global_batch": 4, "seq_length": 512, "learning_rate": args.sft_lr,
                         "data": "disc-finllm (packed)"},
              "eval": {"data": str(test), "seq_len": 512, "windows": args.eval_windows},
              "first_step_loss": {mode: runs[mode]["losses"][0] for mode in runs},
              "final_loss": {mode: runs[mode]["losses"][-1] for mode in runs},
              "losses": {mode: runs[mode]["losses"] for mode in runs},
              "ppl": {mode: runs[mode]["ppl"]["ppl"] for mode in runs},
              "tokens_per_second": {mode: runs[mode]["summary"]["tokens_per_second"] for mode in runs},
              "wall_seconds": round(time.perf_counter() - started, 1)}
    # --sft-steps 0: the mask comparison alone, kept apart from the training comparison's file
    out = REPO / "bench" / "results" / ("packing.json" if runs else "packing_mask.json")
    write_json_atomic(out, report)
    for mode in runs:
        print(f"{mode:>8}: loss {report['first_step_loss'][mode]:.4f} → {report['final_loss'][mode]:.4f}, "
              f"ppl {report['ppl'][mode]:.4f}")
    print(f"→ {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", type=Path, default=Path("/tmp/smol"), help="SmolLM2 HF dir (fetched if missing)")
    parser.add_argument("--student", type=Path, default=None, help="converted MLA dir (converted if not given)")
    parser.add_argument("--shared", type=Path, default=Path(os.environ.get("MINDYOUZHI_SHARED", REPO.parent / "shared")))
    parser.add_argument("--work", type=Path, default=Path("/tmp/mindyouzhi-recover"))
    parser.add_argument("--gkd-steps", type=int, default=40)
    parser.add_argument("--gkd-lr", type=float, default=2e-4)
    parser.add_argument("--sft-steps", type=int, default=8)
    parser.add_argument("--sft-lr", type=float, default=2e-5)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--packing-study", action="store_true",
                        help="compare SFT with packed examples attending to each other vs isolated")
    parser.add_argument("--mask-seq-length", type=int, default=1024,
                        help="--packing-study: window length of the no-training mask comparison")
    args = parser.parse_args()

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    valid = args.shared / "data" / "wikitext-2" / "wiki.valid.tokens"
    test = args.shared / "data" / "wikitext-2" / "wiki.test.raw"
    finance = args.shared / "data" / "sft" / "disc-finllm"
    for path in (valid, test, finance):
        if not path.exists():
            raise SystemExit(f"missing {path} (set --shared)")
    started = time.perf_counter()

    teacher = args.teacher
    if not (teacher / "config.json").is_file():
        print(f"fetching SmolLM2-135M-Instruct → {teacher}", flush=True)
        cli("fetch", "smollm2-135m-instruct", "--out", str(teacher), log=work / "fetch.log")
    student = args.student
    conversion = None
    if student is None:
        student = work / "smollm2-mla"
        if not (student / "config.json").is_file():
            print(f"converting → {student}", flush=True)
            conversion = cli("convert", "--model", str(teacher), "--out", str(student), "--rope-dim", "32",
                             "--kv-lora-rank", "96", "--freqfold", "4", "--calib", str(valid), "--calib-tokens", "8192",
                             "--overwrite", log=work / "convert.log")
    if args.packing_study:
        packing_study(student, finance, test, args, work)
        return
    print("perplexity on wiki.test.raw, before:", flush=True)
    results = {"teacher": ppl(teacher, test, args.eval_windows, work, "teacher"),
               "student_before": ppl(student, test, args.eval_windows, work, "student-before")}

    seq_length = 256
    gkd_recipe = base_recipe("gkd", work / "gkd", student,
                             [{"path": str(valid), "format": "text"}, {"path": str(finance), "format": "sft"}],
                             seq_length, args.gkd_steps, 2, 4, args.gkd_lr, 0.05)
    gkd_recipe["model"]["teacher"] = str(teacher)
    gkd_recipe["gkd"] = {"lmbda": 0.0, "beta": 0.0, "temperature": 1.0}
    print(f"stage 1 GKD: {args.gkd_steps} steps × 8 × {seq_length} tokens", flush=True)
    gkd = train(gkd_recipe, work, "gkd")
    results["student_after_gkd"] = ppl(work / "gkd" / "final", test, args.eval_windows, work, "after-gkd")

    sft = None
    if args.sft_steps > 0:
        sft_recipe = base_recipe("sft", work / "sft", work / "gkd" / "final", [{"path": str(finance), "format": "sft"}],
                                 512, args.sft_steps, 2, 2, args.sft_lr, 0.01)
        print(f"stage 2 SFT: {args.sft_steps} steps × 4 × 512 tokens (packed)", flush=True)
        sft = train(sft_recipe, work, "sft")
        results["student_after_sft"] = ppl(work / "sft" / "final", test, args.eval_windows, work, "after-sft")

    t, b = results["teacher"]["ppl"], results["student_before"]["ppl"]
    closed = {"after_gkd": gap_closed(t, b, results["student_after_gkd"]["ppl"])}
    if sft is not None:
        closed["after_sft"] = gap_closed(t, b, results["student_after_sft"]["ppl"])
    final_key = "after_sft" if sft is not None else "after_gkd"
    report = {
        "benchmark": "recover",
        "model": "SmolLM2-135M-Instruct → MLA (rope_dim 32, kv_lora_rank 96, freqfold 4)",
        "teacher": str(teacher), "student": str(student), "conversion": conversion,
        "eval": {"data": str(test), "seq_len": 512, "windows": args.eval_windows},
        "budget": {
            "gkd": {"steps": gkd["steps_run"], "global_batch": gkd["global_batch"], "seq_length": seq_length,
                    "tokens": gkd["steps_run"] * gkd["global_batch"] * seq_length, "learning_rate": args.gkd_lr,
                    "data": ["wiki.valid.tokens", "disc-finllm"]},
            "sft": None if sft is None else {"steps": sft["steps_run"], "global_batch": sft["global_batch"],
                                             "seq_length": 512, "tokens": sft["steps_run"] * sft["global_batch"] * 512,
                                             "learning_rate": args.sft_lr, "data": ["disc-finllm"]},
        },
        "ppl": {k: v["ppl"] for k, v in results.items()},
        "ppl_details": results,
        "gap_closed": closed,
        "target": "gap closed ≥ 0.5",
        "met": closed[final_key] >= 0.5,
        "train_tokens_per_second": {"gkd": gkd["tokens_per_second"], "sft": sft["tokens_per_second"] if sft else None},
        "train_seconds": {"gkd": gkd["train_seconds"], "sft": sft["train_seconds"] if sft else None},
        "training_summaries": {"gkd": gkd, "sft": sft},
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(args.out, report)
    print(f"teacher {t:.4f} | student before {b:.4f} | after GKD {results['student_after_gkd']['ppl']:.4f}"
          + (f" | after SFT {results['student_after_sft']['ppl']:.4f}" if sft else ""))
    print("gap closed: " + ", ".join(f"{k} {v:.1%}" for k, v in closed.items())
          + f"  (target ≥ 50%: {'met' if report['met'] else 'NOT met'})")
    print(f"→ {args.out}")


if __name__ == "__main__":
    main()
