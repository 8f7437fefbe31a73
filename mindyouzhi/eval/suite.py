"""Several benchmarks on one or more models, with a side-by-side table (the paper's Tables 2/3).

The config is YAML::

    defaults:            # optional: applied to every task unless the task sets the key itself
      batch_size: 4
      limit: 100
    tasks:
      - task: fineval                       # any name in mindyouzhi.eval.tasks.TASKS
        data: ${MINDYOUZHI_SHARED}/data/eval/fineval/val
        shots: 5
        name: FinEval val                   # optional label for the table
      - task: fpb
        data: /data/fpb/Sentences_AllAgree.txt
      - task: kl                            # KL(first model ‖ each other model)
        data: /data/wikitext-2/wiki.test.raw
        seq_len: 512
        max_windows: 8

Relative paths are resolved against the config file's directory; ``$VARS`` and ``~`` are expanded.
The first model is the reference: the table shows every other model's difference to it, the share
of items where its prediction equals the reference's, and the ``kl`` rows.  Models are loaded one at
a time (the reference stays loaded when a ``kl`` task needs it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from mindyouzhi.errors import UserError
from mindyouzhi.io_utils import read_yaml

from .bench import SCORING_MODES, BenchSettings, PreparedTask, prepare_task, run_prepared, summary
from .kl import DEFAULT_SEQ_LEN, run_kl
from .lm import LanguageModel, load_language_model
from .tasks import TASKS

KL_TASK = "kl"
BENCH_KEYS = {"task", "data", "name", "shots", "limit", "fewshot_data", "scoring", "max_new_tokens", "chat", "batch_size",
              "max_batch_tokens"}
KL_KEYS = {"task", "data", "name", "seq_len", "max_windows", "batch_size", "buckets"}
_INT_KEYS = {"shots", "limit", "max_new_tokens", "batch_size", "max_batch_tokens", "seq_len", "max_windows"}


@dataclass(frozen=True)
class SuiteEntry:
    name: str
    task: str
    data: Path
    settings: dict = field(default_factory=dict)

    @property
    def is_kl(self) -> bool:
        return self.task == KL_TASK


def _resolve(base: Path, value) -> Path:
    path = Path(os.path.expanduser(os.path.expandvars(str(value))))
    return path if path.is_absolute() else base / path


def _check_entry(path: Path, index: int, raw) -> dict:
    where = f"{path}: tasks[{index}]"
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping with at least 'task' and 'data'")
    task = raw.get("task")
    if task != KL_TASK and task not in TASKS:
        raise UserError(f"{where}: task {task!r} is not one of {', '.join([*TASKS, KL_TASK])}")
    if "data" not in raw:
        raise UserError(f"{where}: missing 'data'")
    allowed = KL_KEYS if task == KL_TASK else BENCH_KEYS
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)} for task {task} (allowed: {', '.join(sorted(allowed))})")
    for key in _INT_KEYS & set(raw):
        if raw[key] is not None and (not isinstance(raw[key], int) or isinstance(raw[key], bool)):
            raise UserError(f"{where}: '{key}' must be an integer, got {raw[key]!r}")
    if "scoring" in raw and raw["scoring"] not in SCORING_MODES:
        raise UserError(f"{where}: 'scoring' must be one of {', '.join(SCORING_MODES)}")
    return raw


def load_suite_config(path) -> list[SuiteEntry]:
    path = Path(path)
    config = read_yaml(path, "--config", "suite config")
    entries, _ = entries_from_config(config, path.parent, f"--config {path}")
    return entries


def entries_from_config(config, base: Path, source: str, skip_missing: bool = False) -> tuple[list[SuiteEntry], list[str]]:
    """Validated entries of a parsed config (paths relative to ``base``) and, with ``skip_missing``,
    the names of the tasks left out because their data is not there (else that is an error)."""
    if not isinstance(config, dict) or not isinstance(config.get("tasks"), list) or not config["tasks"]:
        raise UserError(f"{source}: expected a mapping with a non-empty 'tasks' list")
    unknown = sorted(set(config) - {"defaults", "tasks"})
    if unknown:
        raise UserError(f"{source}: unknown top-level key(s) {', '.join(unknown)} (allowed: defaults, tasks)")
    defaults = config.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise UserError(f"{source}: 'defaults' must be a mapping")
    entries, names, skipped = [], set(), []
    for index, raw in enumerate(config["tasks"]):
        raw = _check_entry(Path(source), index, raw)
        allowed = KL_KEYS if raw["task"] == KL_TASK else BENCH_KEYS
        merged = {**{key: value for key, value in defaults.items() if key in allowed}, **raw}
        settings = {key: value for key, value in merged.items() if key not in {"task", "data", "name"}}
        if settings.get("fewshot_data"):
            settings["fewshot_data"] = _resolve(base, settings["fewshot_data"])
        name = str(raw.get("name") or _default_name(raw["task"], settings))
        if name in names:
            name = f"{name} #{index + 1}"
        names.add(name)
        # A preset lists the usual file names of a benchmark: the first one present is used.
        candidates = raw["data"] if isinstance(raw["data"], list) else [raw["data"]]
        data = next((path for path in (_resolve(base, value) for value in candidates) if path.exists()), None)
        if data is None:
            if skip_missing:
                skipped.append(f"{name} (no {' or '.join(str(_resolve(base, value)) for value in candidates)})")
                continue
            # Checked now, not after the first model has run the earlier tasks.
            raise UserError(f"{source}: tasks[{index}] ({name}): data {_resolve(base, candidates[0])} not found")
        entries.append(SuiteEntry(name, raw["task"], data, settings))
    return entries, skipped


def _default_name(task: str, settings: dict) -> str:
    if task == KL_TASK:
        return f"kl (seq {settings.get('seq_len', DEFAULT_SEQ_LEN)})"
    shots = settings.get("shots", TASKS[task].default_shots)
    return f"{task} ({shots}-shot)" if shots else task


def model_labels(model_dirs: Sequence, labels: Sequence[str] = ()) -> list[str]:
    if labels and len(labels) != len(model_dirs):
        raise UserError(f"--label given {len(labels)} time(s) for {len(model_dirs)} --model(s): give one per model or none")
    chosen = list(labels) if labels else [Path(model_dir).name or str(model_dir) for model_dir in model_dirs]
    unique = []
    for label in chosen:
        candidate, count = label, 1
        while candidate in unique:
            count += 1
            candidate = f"{label}#{count}"
        unique.append(candidate)
    return unique


def _prepare(entry: SuiteEntry) -> PreparedTask:
    settings = entry.settings
    return prepare_task(
        entry.task, entry.data, shots=settings.get("shots"), limit=settings.get("limit"),
        fewshot_data=settings.get("fewshot_data"), scoring=settings.get("scoring", "loglik"),
    )


def _run_entry(entry: SuiteEntry, prepared: Optional[PreparedTask], lm: LanguageModel,
               reference: Optional[LanguageModel], progress: bool) -> dict:
    settings = entry.settings
    if entry.is_kl:
        return run_kl(
            reference, lm, entry.data,
            seq_len=settings.get("seq_len", DEFAULT_SEQ_LEN), max_windows=settings.get("max_windows"),
            batch_size=settings.get("batch_size", 1), buckets=settings.get("buckets"), show_progress=progress,
        )
    bench_settings = BenchSettings(
        batch_size=settings.get("batch_size", 1),
        scoring=settings.get("scoring", "loglik"),
        max_new_tokens=settings.get("max_new_tokens"),
        chat=bool(settings.get("chat", False)),
        max_batch_tokens=settings.get("max_batch_tokens", BenchSettings.max_batch_tokens),
        progress=progress,
    )
    return run_prepared(lm, prepared, bench_settings)


def _agreement(reference_rows: Sequence[dict], rows: Sequence[dict]) -> Optional[float]:
    """Share of items where both models predict the same answer (choice tasks only)."""
    if not rows or "pred" not in rows[0] or len(rows) != len(reference_rows):
        return None
    same = sum(mine["pred"] == theirs["pred"] for mine, theirs in zip(rows, reference_rows))
    return round(same / len(rows), 6)


def run_suite(
    model_dirs: Sequence,
    entries: Sequence[SuiteEntry],
    labels: Sequence[str] = (),
    *,
    loader: Callable[[object], LanguageModel] = load_language_model,
    progress: bool = True,
) -> dict:
    if not model_dirs:
        raise UserError("give at least one --model")
    labels = model_labels(model_dirs, labels)
    needs_reference = any(entry.is_kl for entry in entries)
    if needs_reference and len(model_dirs) < 2:
        raise UserError("a 'kl' task compares models with the first --model: give at least two --model")
    # Every benchmark's data is read and validated before the first (slow) model load.
    prepared = {entry.name: _prepare(entry) for entry in entries if not entry.is_kl}
    results: dict[str, dict[str, dict]] = {entry.name: {} for entry in entries}
    reference: Optional[LanguageModel] = None
    for index, (label, model_dir) in enumerate(zip(labels, model_dirs)):
        lm = loader(model_dir)
        for entry in entries:
            if entry.is_kl and index == 0:
                continue  # KL of the reference to itself is 0 by definition
            results[entry.name][label] = _run_entry(entry, prepared.get(entry.name), lm, reference, progress)
        if index == 0 and needs_reference:
            reference = lm
        del lm  # drop each model before loading the next; only the reference may stay, for KL
    tasks = []
    for entry in entries:
        by_model = results[entry.name]
        record = {
            "name": entry.name,
            "task": entry.task,
            "data": str(entry.data),
            "settings": {key: str(value) if isinstance(value, Path) else value for key, value in entry.settings.items()},
            "metric": "kl_mean" if entry.is_kl else by_model[labels[0]]["primary_metric"],
            "results": by_model,
        }
        if not entry.is_kl:
            reference_rows = by_model[labels[0]]["items"]
            record["agreement_with_reference"] = {
                label: _agreement(reference_rows, by_model[label]["items"]) for label in labels[1:]
            }
        tasks.append(record)
    return {
        "reference": labels[0],
        "models": [{"label": label, "dir": str(model_dir)} for label, model_dir in zip(labels, model_dirs)],
        "tasks": tasks,
    }


def suite_summary(result: dict) -> dict:
    """The suite result without per-item rows."""
    tasks = [
        {**task, "results": {label: summary(value) for label, value in task["results"].items()}}
        for task in result["tasks"]
    ]
    return {**result, "tasks": tasks}


def _percent(value: float) -> str:
    return f"{100 * value:.2f}"


def render_markdown(result: dict) -> str:
    """The comparison table: one row per task metric, one column per model, then Δ to the reference."""
    labels = [model["label"] for model in result["models"]]
    reference, others = labels[0], labels[1:]
    head = ["task", "metric", "n", *labels, *[f"Δ {label}" for label in others]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for task in result["tasks"]:
        by_model = task["results"]
        if task["task"] == KL_TASK:
            for metric, title in (("kl_mean", "KL(ref‖model) mean"), ("top1_agreement", "top-1 agreement")):
                cells = ["—"] + [f"{by_model[label][metric]:.4f}" for label in others]
                n = next(iter(by_model.values()))["tokens"] if by_model else 0
                lines.append("| " + " | ".join([task["name"], title, f"{n} tok", *cells, *[""] * len(others)]) + " |")
            continue
        # JSON-scored generation also gets its per-field accuracy: exact match alone hides partial slots.
        shown = [task["metric"]] + [name for name in ("field_accuracy",) if name in by_model[reference]["metrics"]]
        for metric in shown:
            values = [by_model[label]["metrics"][metric] for label in labels]
            deltas = [f"{100 * (value - values[0]):+.2f}" for value in values[1:]]
            row = [task["name"], f"{metric} (%)", str(by_model[reference]["n"]), *[_percent(value) for value in values], *deltas]
            lines.append("| " + " | ".join(row) + " |")
    table = "\n".join(lines)
    agreement_rows = [task for task in result["tasks"] if task.get("agreement_with_reference")]
    if others and agreement_rows:
        table += f"\n\nPrediction agreement with {reference} (% of items with the same answer):\n\n"
        table += "| task | " + " | ".join(others) + " |\n|---|" + "---:|" * len(others) + "\n"
        for task in agreement_rows:
            cells = []
            for label in others:
                value = task["agreement_with_reference"].get(label)
                cells.append("—" if value is None else _percent(value))
            table += f"| {task['name']} | " + " | ".join(cells) + " |\n"
    return table.rstrip("\n") + "\n"


# --------------------------------------------------------------------------------------------
# The paper's two tables as presets
# --------------------------------------------------------------------------------------------
# Data paths are relative to a data root laid out as benchmarks are downloaded (default
# $MINDYOUZHI_SHARED/data/eval); each lists the usual file names, the first present is used, and a
# benchmark without data is left out of the table and named.  LiveCodeBench (general) and
# OpenFinData (finance) are in the paper's tables but have no task here: they are always named as
# not run.  Generation tasks use the chat template (the paper evaluates instruct models).
PRESETS: dict[str, dict] = {
    "general": {
        "title": "General benchmarks",
        "not_supported": ["LiveCodeBench"],
        "tasks": [
            {"task": "ceval", "data": ["ceval"], "name": "C-Eval", "shots": 5},
            {"task": "ifeval", "data": ["ifeval/input_data.jsonl", "ifeval/data/input_data.jsonl"], "name": "IFEval",
             "chat": True, "max_new_tokens": 512},
            {"task": "math500", "data": ["math500/test.jsonl", "math500/math_splits/test.jsonl"], "name": "MATH-500",
             "chat": True, "max_new_tokens": 512},
            {"task": "hellaswag", "data": ["hellaswag/hellaswag_val.jsonl", "hellaswag/hellaswag_val_full.txt.bz2"],
             "name": "HellaSwag"},
            {"task": "sst5", "data": ["sst5/trees/test.txt", "sst5/stsa.fine.test"], "name": "SST-5",
             "scoring": "calibrated"},
            {"task": "crossner", "data": ["crossner/ner_data", "crossner"], "name": "CrossNER", "chat": True,
             "max_new_tokens": 128},
        ],
    },
    "finance": {
        "title": "Finance benchmarks",
        "not_supported": ["OpenFinData"],
        "tasks": [
            {"task": "cflue", "data": ["cflue/data/knowledge", "cflue/knowledge"], "name": "CFLUE"},
            {"task": "financeiq", "data": ["financeiq", "FinanceIQ"], "name": "FinanceIQ", "shots": 5},
            {"task": "fineval", "data": ["fineval"], "name": "FinEval", "shots": 5},
            {"task": "fpb", "data": ["fpb/Sentences_AllAgree.txt", "fpb/Sentences_50Agree.txt"], "name": "FPB",
             "scoring": "calibrated"},
        ],
    },
}


def default_data_root() -> Path:
    shared = os.environ.get("MINDYOUZHI_SHARED")
    return Path(shared) / "data" / "eval" if shared else Path.cwd()


def preset_entries(name: str, data_root: Optional[Path] = None, limit: Optional[int] = None,
                   batch_size: Optional[int] = None) -> tuple[list[SuiteEntry], list[str]]:
    """The preset's runnable entries and the benchmarks it leaves out (no task, or no data)."""
    if name not in PRESETS:
        raise UserError(f"--preset {name!r} is not one of {', '.join(PRESETS)}")
    root = Path(data_root) if data_root is not None else default_data_root()
    if not root.is_dir():
        raise UserError(f"--data-root {root}: not a directory (the folder holding ceval/, fineval/, ...)")
    defaults = {key: value for key, value in (("limit", limit), ("batch_size", batch_size)) if value is not None}
    config = {"defaults": defaults, "tasks": PRESETS[name]["tasks"]}
    entries, skipped = entries_from_config(config, root, f"--preset {name}", skip_missing=True)
    if not entries:
        raise UserError(f"--preset {name}: none of its benchmarks has data under {root} ({'; '.join(skipped)})")
    return entries, [f"{task} (no task in mindyouzhi)" for task in PRESETS[name]["not_supported"]] + skipped


def render_paper_table(result: dict, title: str = "", not_run: Sequence[str] = ()) -> str:
    """The paper's layout: one row per model, one column per benchmark (its primary metric, %), Avg.

    The average is over the benchmarks in the table; KL rows are not benchmarks and are left out.
    """
    tasks = [task for task in result["tasks"] if task["task"] != KL_TASK]
    labels = [model["label"] for model in result["models"]]
    head = ["Model", *[task["name"] for task in tasks], "Avg"]
    lines = [f"**{title}**\n" if title else "", "| " + " | ".join(head) + " |",
             "|---|" + "---:|" * (len(head) - 1)]
    for label in labels:
        values = [100 * task["results"][label]["metrics"][task["metric"]] for task in tasks]
        average = sum(values) / len(values) if values else 0.0
        lines.append("| " + " | ".join([label, *(f"{value:.2f}" for value in values), f"{average:.2f}"]) + " |")
    notes = [f"{task['name']}: {task['metric']}, n={task['results'][labels[0]]['n']}" for task in tasks]
    lines.append("\n" + "; ".join(notes))
    if not_run:
        lines.append("Not run: " + "; ".join(not_run))
    return "\n".join(line for line in lines if line != "").rstrip("\n") + "\n"
