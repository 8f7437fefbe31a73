"""``mindyouzhi pipeline``: convert → finance data → teacher annotation → GKD → SFT → eval → export
→ capacity → tables, one recipe, resumable stage by stage.

Every stage is a ``mindyouzhi`` command run as a child process (its stderr kept in
``RUN/logs/STAGE.log``, its ``--json`` summary recorded), so each stage is exactly what a user can
run by hand, and a crashed stage cannot leave the orchestrator in a half state.  ``RUN/pipeline.json``
records each finished stage with a fingerprint of everything it depends on (its recipe sections
and the fingerprints of the stages it reads).  A re-run skips the stages whose fingerprint still
matches, and re-runs a changed stage and everything downstream of it; an interrupted training
stage continues from its last checkpoint (the trainer's own resume), an interrupted conversion from
its search state.  Everything is written inside the run directory; the original model, the data
files and the recipe are only read.
"""
from __future__ import annotations

import collections
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import yaml

from mindyouzhi.errors import UserError
from mindyouzhi.io_utils import read_json, write_json_atomic
from mindyouzhi.paths import check_outputs

from . import finance_data
from .recipe import PipelineRecipe

STATE = "pipeline.json"

# The rows of the paper's tables: label → the stage that produces the model.
ROWS = {"original": None, "transmla": "convert-transmla", "ours": "convert", "gkd": "gkd", "gkd+sft": "sft"}


@dataclass
class Stage:
    name: str
    sections: tuple[str, ...]          # recipe sections it reads
    needs: tuple[str, ...]             # stages whose outputs it reads
    run: Callable[["PipelineRun"], dict]
    outputs: tuple[str, ...] = ()      # what it writes, relative to the run directory
    when: Callable[["PipelineRun"], bool] = field(default=lambda run: True)
    # What the stage builds in code from the recipe (the eval stages: the held-out tasks, each with the
    # task it is scored as): part of the fingerprint, so scoring a held-out split as another task
    # re-runs the stage.  Edits inside a scorer's code are not seen (`--overwrite` or a new run).
    derived: Callable[["PipelineRun"], object] = field(default=lambda run: None)


class PipelineRun:
    def __init__(self, recipe: PipelineRecipe, out: Path, log: Callable[[str], None] = print):
        self.recipe = recipe
        self.out = Path(out)
        self.log = log
        self.state_path = self.out / STATE
        self.state = read_json(self.state_path, "pipeline state") if self.state_path.exists() else {"stages": {}}

    # -- paths -----------------------------------------------------------------------------------
    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def model_of(self, row: str) -> Path:
        stage = ROWS[row]
        if stage is None:
            return Path(self.recipe["original"])
        if stage in ("gkd", "sft"):
            return self.path("train", stage, "final")
        return self.path("models", stage)

    def rows(self) -> list[str]:
        return [row for row in ROWS if row != "transmla" or self.recipe["baseline"]]

    # -- child commands ---------------------------------------------------------------------------
    def cli(self, stage: str, *args: str, parse_json: bool = True) -> dict:
        """Run ``mindyouzhi ARGS --json``; its summary, or a one-line error naming the log."""
        log = self.path("logs", f"{stage}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "mindyouzhi.cli", *args] + (["--json"] if parse_json else [])
        env = dict(os.environ, MINDYOUZHI_NO_PROGRESS="1")
        with open(log, "a", encoding="utf-8") as err:
            err.write(f"$ mindyouzhi {' '.join(args)}\n")
            err.flush()
            done = subprocess.run(command, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        if done.returncode != 0:
            reason = _failure_reason(log.read_text(encoding="utf-8", errors="replace"), done.returncode)
            words = " ".join(itertools.takewhile(lambda arg: not arg.startswith("-"), args))
            raise UserError(f"pipeline stage {stage}: `mindyouzhi {words}` failed: {reason} (log {log})")
        if not parse_json:
            return {}
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        return json.loads(lines[-1]) if lines else {}

    # -- fingerprints and state -------------------------------------------------------------------
    def fingerprint(self, stage: Stage) -> str:
        parts = [self.recipe.digest(*stage.sections)] + [self.state["stages"].get(need, {}).get("fingerprint", "")
                                                          for need in stage.needs]
        derived = stage.derived(self)
        if derived is not None:
            parts.append(json.dumps(derived, sort_keys=True, default=str))
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    def done(self, stage: Stage) -> bool:
        entry = self.state["stages"].get(stage.name)
        return bool(entry) and entry.get("status") == "done" and entry.get("fingerprint") == self.fingerprint(stage)

    def start(self, stage: Stage) -> str:
        """Mark the stage as started.  If it last ran (or started) with other inputs, its outputs are
        stale: they are removed (they are this run's own files) so the stage starts afresh; a stage
        interrupted with the same inputs keeps them and resumes (search state, training checkpoints)."""
        entry = self.state["stages"].get(stage.name)
        fingerprint = self.fingerprint(stage)
        how = "fresh"
        if entry and entry.get("fingerprint") != fingerprint:
            for relative in stage.outputs:
                target = self.path(relative)
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                elif target.exists() or target.is_symlink():
                    target.unlink()
            how = "inputs changed: its earlier outputs were removed"
        elif entry:
            how = "resuming an interrupted run"
        self.state["stages"][stage.name] = {"fingerprint": fingerprint, "status": "started",
                                            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_json_atomic(self.state_path, self.state)
        return how

    def record(self, stage: Stage, result: dict, seconds: float) -> None:
        self.state["stages"][stage.name].update(status="done", seconds=round(seconds, 1), result=result,
                                                finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        write_json_atomic(self.state_path, self.state)

    def result(self, name: str) -> dict:
        return self.state["stages"][name]["result"]


def _failure_reason(log_text: str, returncode: int) -> str:
    """The child's own one-line error, else the exception line of its traceback, else its exit code."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:") or re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", line):
            return line
    return f"exit code {returncode}"


# -- stages -----------------------------------------------------------------------------------------
def _flags(options: dict) -> list[str]:
    args = []
    for key, value in options.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            args.append(flag)
        elif value not in (False, None):
            args += [flag, str(value)]
    return args


def _convert(run: PipelineRun, stage: str, options: dict) -> dict:
    out = run.path("models", stage)
    return run.cli(stage, "convert", "--model", run.recipe["original"], "--out", str(out),
                   "--work-dir", str(run.path("work", stage)), "--overwrite", *_flags(options))


def stage_convert(run: PipelineRun) -> dict:
    return _convert(run, "convert", run.recipe["convert"])


def stage_convert_transmla(run: PipelineRun) -> dict:
    return _convert(run, "convert-transmla", {**run.recipe["convert"], **run.recipe["baseline"]})


def stage_data(run: PipelineRun) -> dict:
    """The SFT pool and the held-out items (see ``finance_data``)."""
    spec = run.recipe["data"]
    seed = int(spec.get("seed", 42))
    root = run.path("data")
    scratch = root / "generated"
    scratch.mkdir(parents=True, exist_ok=True)
    held = root / "heldout"
    held.mkdir(parents=True, exist_ok=True)
    pool: list[dict] = []
    summary: dict = {}
    origin: dict[str, str] = {}   # record → the data section it came from (to count what compress keeps)

    def take(section: str, records: list[dict]) -> None:
        pool.extend(records)
        for record in records:
            origin.setdefault(_record_key(record), section)

    def generate(kind: list[str], name: str, count: int, generator_seed: int) -> Path:
        path = scratch / f"{name}.jsonl"
        run.cli("data", "data", *kind, "--out", str(path), "--count", str(count), "--seed", str(generator_seed),
                "--overwrite", parse_json=False)
        return path

    if spec.get("fpb"):
        train, test = finance_data.split_fpb(Path(spec["fpb"]["path"]), float(spec["fpb"].get("held_out", 0.3)), seed)
        sft, _ = finance_data.fpb_records(train)
        _, items = finance_data.fpb_records(test)
        take("fpb", sft)
        finance_data.write_jsonl(held / "fpb.jsonl", items)
        finance_data.write_fpb_lines(held / "fpb.txt", test)
        summary["fpb"] = {"train": len(sft), "held_out": len(items)}
    for name, command, splitter in (("amounts", ["amounts", "generate"], finance_data.amount_splits),
                                    ("banking", ["banking", "generate"], finance_data.banking_splits)):
        if spec.get(name):
            train_count, test_count = int(spec[name]["train"]), int(spec[name]["held_out"])
            train_path = generate(command, f"{name}-train", train_count, seed)
            # The held-out pool comes from another seed and is filtered against the training items.
            pool_path = generate(command, f"{name}-pool", 3 * test_count, seed + 1)
            sft, items = splitter(train_path, pool_path, test_count)
            take(name, sft)
            finance_data.write_jsonl(held / f"{name}.jsonl", items)
            summary[name] = {"train": len(sft), "held_out": len(items)}
    if spec.get("refusal"):
        path = generate(["refusal"], "refusal", int(spec["refusal"]["train"]), seed)
        records = [{"instruction": r["question"], "output": r["answer"]} for r in finance_data.read_jsonl(path)]
        take("refusal", records)
        summary["refusal"] = {"train": len(records)}
    for source in spec.get("instructions") or []:
        records = finance_data.instruction_records(Path(source))
        take("instructions", records)
        summary.setdefault("instructions", {})[str(source)] = len(records)
    if not pool:
        raise UserError("recipe data: no training data configured (fpb, amounts, banking, refusal or instructions)")
    pool_path = root / "pool.jsonl"
    finance_data.write_jsonl(pool_path, pool)
    sft_path = root / "sft.jsonl"
    budget = spec.get("budget")
    if budget:
        run.cli("data", "data", "compress", str(pool_path), "--out", str(sft_path), "--budget", str(budget),
                "--seed", str(seed), "--overwrite", parse_json=False)
    else:
        shutil.copyfile(pool_path, sft_path)
    kept = collections.Counter(origin.get(_record_key(record), "unknown")
                               for record in finance_data.read_jsonl(sft_path))
    summary["sft_records"] = sum(kept.values())
    summary["pool_records"] = len(pool)
    summary["sft_records_by_section"] = dict(kept)   # what a `budget` left of each section
    return summary


def _record_key(record: dict) -> str:
    """A record's identity across `data compress`, which adds its `tags`."""
    return json.dumps({k: v for k, v in record.items() if k != "tags"}, sort_keys=True, ensure_ascii=False)


def stage_annotate(run: PipelineRun) -> dict:
    spec = run.recipe["annotate"]
    return run.cli("annotate", "data", "annotate", "--model", run.recipe["original"],
                   "--input", str(run.path("data", "sft.jsonl")), "--out", str(run.path("data", "gkd.jsonl")),
                   "--overwrite", *_flags(spec))


def _deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in (override or {}).items():
        merged[key] = _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def training_recipe(run: PipelineRun, mode: str) -> dict:
    """The training recipe of a stage: the CPU defaults of recipes/*_smollm2_cpu.yaml, the pipeline's
    models and data, then the recipe's own ``gkd:``/``sft:`` section on top.

    Two keys of ``gkd:`` are the pipeline's own: ``annotated_loss`` (``response`` | ``all``: which
    tokens of the teacher-annotated conversations are distilled) and ``mix`` (more training sources,
    e.g. validation text, appended after the annotated conversations)."""
    gkd = mode == "gkd"
    base = {
        "run_mode": mode, "seed": 42, "output_dir": str(run.path("train", mode)),
        "model": {"student": str(run.model_of("ours") if gkd else run.model_of("gkd")), "trainable": "all"},
        "train_dataset": {"seq_length": 512, "packing": True, "shuffle": True,
                          "sources": [{"path": str(run.path("data", "gkd.jsonl" if gkd else "sft.jsonl")),
                                       "format": "sft"}]},
        "runner_config": {"epochs": 1 if gkd else 2, "batch_size": 2, "gradient_accumulation_steps": 4,
                          "save_steps": 25, "keep_checkpoints": 2},
        "runner_wrapper": {"use_clip_grad": True, "max_grad_norm": 1.0},
        "optimizer": {"type": "AdamW", "betas": [0.9, 0.95], "eps": 1.0e-8, "weight_decay": 0.0},
        "lr_schedule": {"type": "CosineWithWarmUpLR", "learning_rate": 2.0e-4 if gkd else 2.0e-5, "lr_end": 0.0,
                        "warmup_ratio": 0.05 if gkd else 0.01},
        "recompute_config": {"recompute": True},   # layer by layer: a 135M model's step fits a few GiB
        "parallel_config": {"data_parallel": 1, "model_parallel": 1, "pipeline_stage": 1},
        "context": {"mode": 0, "device_target": "CPU", "cpu_precision": "auto"},
    }
    section = dict(run.recipe[mode] or {})
    if gkd:
        base["model"]["teacher"] = run.recipe["original"]
        base["gkd"] = {"lmbda": 0.0, "beta": 0.0, "temperature": 1.0}
        annotated = base["train_dataset"]["sources"][0]
        annotated["loss"] = section.pop("annotated_loss", "response")
        mix = section.pop("mix", [])
        if not isinstance(mix, list):
            raise UserError(f"--recipe {run.recipe.path}: gkd.mix must be a list of training sources "
                            f"({{path, format, max_samples}}), got {type(mix).__name__}")
        base["train_dataset"]["sources"] = [annotated, *mix]
    recipe = _deep_merge(base, section)
    for key in ("output_dir",):
        recipe[key] = base[key]  # the run directory owns where things are written
    return recipe


def write_training_recipe(run: PipelineRun, mode: str, directory: Optional[Path] = None) -> Path:
    """Write and validate a training stage's recipe (also done in a scratch directory before the
    first stage runs, so a typo in ``gkd:``/``sft:`` is reported at once, not after the conversion)."""
    from mindyouzhi.train.config import load_recipe

    path = (directory or run.path("train")) / f"{mode}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(training_recipe(run, mode), sort_keys=False, allow_unicode=True), encoding="utf-8")
    try:
        load_recipe(path, check_paths=False)
    except UserError as exc:
        raise UserError(f"--recipe {run.recipe.path}: section {mode}: {exc}") from None
    return path


def _train(run: PipelineRun, mode: str) -> dict:
    return run.cli(mode, "train", "--config", str(write_training_recipe(run, mode)))


def stage_gkd(run: PipelineRun) -> dict:
    return _train(run, "gkd")


def stage_sft(run: PipelineRun) -> dict:
    return _train(run, "sft")


def heldout_tasks(run: PipelineRun) -> list[dict]:
    """The finance tasks SFT teaches, on their held-out splits (absent splits are left out)."""
    held = run.path("data", "heldout")
    limit = run.recipe["eval"].get("heldout_limit")   # first N held-out items of each task (all if unset)
    tasks = []
    if (held / "fpb.jsonl").is_file():
        tasks.append({"task": "label-jsonl", "data": str(held / "fpb.jsonl"), "name": "FPB held-out (gen)",
                      "chat": True, "max_new_tokens": 8})
        tasks.append({"task": "fpb", "data": str(held / "fpb.txt"), "name": "FPB held-out (ll)",
                      "scoring": "calibrated"})
    if (held / "amounts.jsonl").is_file():
        tasks.append({"task": "rmb-amounts", "data": str(held / "amounts.jsonl"), "name": "RMB amounts held-out",
                      "chat": True, "max_new_tokens": 64})
    if (held / "banking.jsonl").is_file():
        tasks.append({"task": "gen-jsonl", "data": str(held / "banking.jsonl"), "name": "Banking intent/slots held-out",
                      "chat": True, "max_new_tokens": 128})
    return [dict(task, limit=limit) for task in tasks] if limit else tasks


def _heldout_identity(run: PipelineRun) -> list[dict]:
    """The held-out tasks as the eval fingerprint sees them: paths relative to the run directory (a
    moved run stays valid)."""
    return [dict(task, data=os.path.relpath(task["data"], run.out)) for task in heldout_tasks(run)]


def suite_config(run: PipelineRun) -> Path:
    spec = run.recipe["eval"]
    tasks = [dict(task, group=task.get("group", "general")) for task in spec.get("tasks") or []]
    tasks += [dict(task, group="finance-heldout") for task in heldout_tasks(run)]
    config = {"defaults": spec.get("defaults") or {}, "tasks": [{k: v for k, v in t.items() if k != "group"} for t in tasks]}
    path = run.path("eval", "suite.yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    write_json_atomic(run.path("eval", "groups.json"), {t.get("name", t["task"]): t["group"] for t in tasks})
    return path


def evaluate_row(run: PipelineRun, row: str) -> dict:
    spec = run.recipe["eval"]
    model = str(run.model_of(row))
    stage = f"eval-{row}"
    result: dict = {"model": model}
    ppl = spec.get("ppl")
    if ppl:
        result["ppl"] = run.cli(stage, "eval", "ppl", "--model", model, "--data", str(ppl["data"]),
                                *_flags({"seq_len": ppl.get("seq_len"), "max_windows": ppl.get("max_windows")}))
    kl = spec.get("kl")
    if kl and row != "original":
        result["kl"] = run.cli(stage, "eval", "kl", "--teacher", run.recipe["original"], "--student", model,
                               "--data", str(kl["data"]),
                               *_flags({"seq_len": kl.get("seq_len"), "max_windows": kl.get("max_windows")}))
    out = run.path("eval", row)
    run.cli(stage, "eval", "suite", "--model", model, "--label", row, "--config", str(suite_config(run)),
            "--out", str(out), parse_json=False)
    result["suite"] = str(out / "results.json")
    return result


def stage_export(run: PipelineRun) -> dict:
    fmt = run.recipe["export"]["format"]
    return run.cli("export", "export", "--model", str(run.model_of("gkd+sft")), "--format", fmt,
                   "--out", str(run.path("export", fmt)), "--overwrite")


def stage_capacity(run: PipelineRun) -> dict:
    """KV bytes per token and max concurrency of each row's shape at equal memory.  Training changes
    weights, not shapes, so the trained rows share the converted model's figures, and the original's
    come from the comparison `capacity` makes for a converted model."""
    spec = run.recipe["capacity"]
    rows = {}
    for row in ("ours", "transmla"):
        if row not in run.rows():
            continue
        result = run.cli("capacity", "capacity", "--model", str(run.model_of(row)), "--memory", str(spec["memory"]),
                         "--context", str(spec["context"]), "--dtype", str(spec.get("dtype", "bf16")))
        rows[row] = _capacity_row(result, "converted")
        rows.setdefault("original", _capacity_row(result, "original"))
    for row in ("gkd", "gkd+sft"):
        rows[row] = rows["ours"]
    return rows


def _capacity_row(result: dict, side: str) -> dict:
    return {"kv_bytes_per_token": result[side]["kv_bytes_per_token"], "max_sequences": result[side]["max_sequences"],
            "memory_bytes": result["memory_bytes"], "context": result["context"], "dtype": result["dtype"]}


def stage_tables(run: PipelineRun) -> dict:
    from .tables import build_tables

    tables = build_tables(run)
    (run.out / "tables.md").write_text(tables["markdown"], encoding="utf-8")
    write_json_atomic(run.out / "tables.json", tables)
    return {"tables": str(run.out / "tables.md"), "acceptance": tables["acceptance"]}


# The order rows are evaluated in: the reference, then the trained rows (what the run is for), then
# the untrained conversions — an evaluation cut short leaves the least informative rows missing.
EVAL_ORDER = ("original", "gkd+sft", "gkd", "ours", "transmla")


def stages() -> list[Stage]:
    evals = [Stage(f"eval-{row}", ("original", "eval", "data"), tuple(n for n in (ROWS[row], "data") if n),
                   (lambda r, row=row: evaluate_row(r, row)), (f"eval/{row}",),
                   when=(lambda r, row=row: row in r.rows()), derived=_heldout_identity) for row in EVAL_ORDER]
    return [
        Stage("convert", ("original", "convert"), (), stage_convert, ("models/convert", "work/convert")),
        Stage("convert-transmla", ("original", "convert", "baseline"), (), stage_convert_transmla,
              ("models/convert-transmla", "work/convert-transmla"), when=lambda r: bool(r.recipe["baseline"])),
        Stage("data", ("data",), (), stage_data, ("data/generated", "data/heldout", "data/pool.jsonl", "data/sft.jsonl")),
        Stage("annotate", ("original", "annotate"), ("data",), stage_annotate, ("data/gkd.jsonl", "data/.gkd.jsonl.partial")),
        Stage("gkd", ("original", "gkd"), ("convert", "annotate"), stage_gkd, ("train/gkd",)),
        Stage("sft", ("sft",), ("gkd", "data"), stage_sft, ("train/sft",)),
        *evals,
        Stage("export", ("export",), ("sft",), stage_export, ("export",)),
        Stage("capacity", ("capacity",), ("convert", "convert-transmla"), stage_capacity),
        Stage("tables", ("eval",), tuple(f"eval-{row}" for row in ROWS) + ("capacity",), stage_tables,
              ("tables.md", "tables.json")),
    ]


STAGE_NAMES = [stage.name for stage in stages()]


def recipe_inputs(recipe: PipelineRecipe) -> dict:
    """Every path the recipe reads (the run directory may be none of them, nor hold or sit in one)."""
    data, evaluation = recipe["data"], recipe["eval"]
    inputs = {"--recipe": recipe.path, "original": recipe["original"], "convert.calib": recipe["convert"].get("calib"),
              "data.fpb.path": (data.get("fpb") or {}).get("path"),
              "eval.ppl.data": (evaluation.get("ppl") or {}).get("data"),
              "eval.kl.data": (evaluation.get("kl") or {}).get("data")}
    inputs.update({f"data.instructions[{i}]": path for i, path in enumerate(data.get("instructions") or [])})
    return inputs


def run_pipeline(recipe: PipelineRecipe, out: Path, until: Optional[str] = None, log: Callable[[str], None] = print,
                 overwrite: bool = False) -> dict:
    """Run (or resume) the pipeline in ``out``; ``overwrite`` discards an earlier run there first."""
    if until is not None and until not in STAGE_NAMES:
        raise UserError(f"--until {until!r}: expected one of {', '.join(STAGE_NAMES)}")
    out = Path(out)
    state = out / STATE
    if out.exists() and not (out.is_dir() and (state.is_file() or not any(out.iterdir()))):
        raise UserError(f"--out {out}: exists and is not a pipeline run directory (no {STATE}); choose a new directory")
    check_outputs({"--out": out}, recipe_inputs(recipe), overwrite=True, directories=("--out",))
    if overwrite and state.is_file():
        log(f"--overwrite: the earlier run in {out} is discarded")
        shutil.rmtree(out)
    run = PipelineRun(recipe, out, log)
    with tempfile.TemporaryDirectory() as scratch:
        for mode in ("gkd", "sft"):
            write_training_recipe(run, mode, Path(scratch))
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.sections, sort_keys=False, allow_unicode=True), encoding="utf-8")
    report = {"out": str(out), "stages": {}}
    for stage in stages():
        if not stage.when(run):
            continue
        if run.done(stage):
            log(f"{stage.name}: done earlier (same inputs), skipped")
            report["stages"][stage.name] = "skipped"
        else:
            how = run.start(stage)
            log(f"{stage.name}: running" + ("" if how == "fresh" else f" ({how})"))
            started = time.perf_counter()
            result = stage.run(run)
            run.record(stage, result, time.perf_counter() - started)
            log(f"{stage.name}: done in {time.perf_counter() - started:.0f} s")
            report["stages"][stage.name] = "ran"
        if stage.name == until:
            break
    report["state"] = str(state)
    if "tables" in run.state["stages"] and report["stages"].get("tables"):
        report["tables"] = run.result("tables")
    return report
