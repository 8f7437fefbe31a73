"""Training recipes: YAML in MindFormers' layout, validated before any work starts.

A recipe reads like a MindFormers config (``runner_config``, ``optimizer``, ``lr_schedule`` with
``type: CosineWithWarmUpLR``, ``parallel_config``, ``context``) plus the sections GKD needs
(``model.teacher``, ``gkd``).  ``recipes/*.yaml`` are the reference; the full key list is
``SCHEMA`` below and ``docs/training.md``.

Every string may use ``${VAR}`` or ``${VAR:-default}`` (environment expansion, e.g.
``${MINDYOUZHI_SHARED}/data/wikitext-2/wiki.valid.tokens``).  Unknown keys, wrong types, an unset
variable, a missing model directory or data file are all reported as one ``UserError`` naming the
recipe file and the dotted key, before a model is loaded.  Relative paths are relative to the
current directory, as in MindFormers.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from mindyouzhi.errors import UserError

from .bf16_ops import CPU_PRECISIONS, DEFAULT_CPU_PRECISION

RUN_MODES = ("gkd", "sft")
DATA_FORMATS = ("auto", "text", "sft")
LOSS_SPANS = ("response", "all")
TRAINABLE = ("all", "attention")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
SFT_SUFFIXES = (".json", ".jsonl")

# The paper's SFT defaults (2 epochs, cosine to 0, warmup ratio 0.01); GKD runs one pass by default.
DEFAULT_EPOCHS = {"sft": 2, "gkd": 1}


class _Req:
    """Marker: the key is required."""


REQUIRED = _Req()


def _positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _non_negative_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(predicate: Callable[[Any], bool], expected: str):
    return predicate, expected


INT_POS = _check(_positive_int, "a positive integer")
INT_NONNEG = _check(_non_negative_int, "a non-negative integer")
INT_ANY = _check(lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")
NUM_POS = _check(lambda v: _number(v) and v > 0, "a positive number")
NUM_NONNEG = _check(lambda v: _number(v) and v >= 0, "a non-negative number")
FRACTION = _check(lambda v: _number(v) and 0 <= v <= 1, "a number between 0 and 1")
FRACTION_OPEN = _check(lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)")
BOOL = _check(lambda v: isinstance(v, bool), "true or false")
STR = _check(lambda v: isinstance(v, str) and v != "", "a non-empty string")
OPT_STR = _check(lambda v: v is None or (isinstance(v, str) and v != ""), "a string or null")
OPT_INT_POS = _check(lambda v: v is None or _positive_int(v), "a positive integer or null")
OPT_INT_NONNEG = _check(lambda v: v is None or _non_negative_int(v), "a non-negative integer or null")
BETAS = _check(lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_number(b) and 0 <= b < 1 for b in v),
               "a list of two numbers in [0, 1)")


def _one_of(*choices):
    return _check(lambda v: v in choices, "one of " + ", ".join(repr(c) for c in choices))


# section → key → (check, default).  ``None`` as a section value means "any mapping is refused".
SCHEMA: dict[str, dict[str, tuple]] = {
    "": {  # top level scalars
        "run_mode": (_one_of(*RUN_MODES), REQUIRED),
        "seed": (INT_NONNEG, 42),
        "output_dir": (STR, REQUIRED),
    },
    "model": {
        "student": (STR, REQUIRED),          # the model to train (a converted MLA dir, or any model dir)
        "teacher": (OPT_STR, None),          # GKD: the frozen original model
        "trainable": (_one_of(*TRAINABLE), "all"),
        # a fresh run rescales every MLA layer's factor pairs to equal entry scales first (exact:
        # models/balance.py); false trains the student's tensors as they are
        "balance_mla": (BOOL, True),
        # fp32 master weights always; bf16/fp16 compute is planned for Ascend (CPU has no bf16 MatMul)
        "compute_dtype": (_one_of(*COMPUTE_DTYPES), "float32"),
    },
    "train_dataset": {
        "sources": (None, REQUIRED),         # list of {path, format, max_samples}; validated below
        "seq_length": (INT_POS, 512),
        "packing": (BOOL, False),
        # with packing: "shared" = one causal mask over the window (examples see each other),
        # "isolated" = block-diagonal (each example attends only to itself)
        "packed_attention": (_one_of("shared", "isolated"), "shared"),
        "shuffle": (BOOL, True),
    },
    "eval_dataset": {                        # optional: perplexity of the final model on this text
        "path": (STR, REQUIRED),
        "seq_length": (INT_POS, 512),
        "max_windows": (OPT_INT_POS, None),
    },
    "gkd": {
        "lmbda": (FRACTION, 0.0),            # on-policy fraction (student-generated responses)
        "beta": (FRACTION, 0.0),             # 0 = forward KL(teacher‖student); else generalized JSD
        "temperature": (NUM_POS, 1.0),       # softmax temperature of both distributions in the loss
        "max_new_tokens": (INT_POS, 64),     # on-policy generation length
        "generation_temperature": (NUM_NONNEG, 1.0),
        "top_p": (_check(lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"), 1.0),
    },
    "runner_config": {
        "epochs": (INT_POS, None),           # default per run_mode (DEFAULT_EPOCHS)
        "batch_size": (INT_POS, 1),          # micro-batch per worker
        "gradient_accumulation_steps": (INT_POS, 1),
        "max_steps": (INT_ANY, -1),          # > 0: stop after this many optimizer steps (a budget)
        "save_steps": (INT_NONNEG, 0),       # checkpoint every N steps (0 = only at the end)
        "log_steps": (INT_POS, 1),
        "keep_checkpoints": (INT_POS, 2),
        "overwrite_output": (BOOL, False),   # with --no-resume: discard earlier checkpoints and logs
    },
    "runner_wrapper": {
        "use_clip_grad": (BOOL, True),
        "max_grad_norm": (NUM_POS, 1.0),
    },
    "optimizer": {
        "type": (_one_of("AdamW", "adamw"), "AdamW"),
        "betas": (BETAS, [0.9, 0.999]),
        "eps": (NUM_POS, 1e-8),
        "weight_decay": (NUM_NONNEG, 0.0),
    },
    "lr_schedule": {
        "type": (_one_of("CosineWithWarmUpLR", "cosine"), "CosineWithWarmUpLR"),
        "learning_rate": (NUM_POS, REQUIRED),
        "lr_end": (NUM_NONNEG, 0.0),
        "warmup_ratio": (FRACTION_OPEN, 0.01),
        "warmup_steps": (OPT_INT_NONNEG, None),  # overrides warmup_ratio when set
        "warmup_lr_init": (NUM_NONNEG, 0.0),
        "total_steps": (INT_ANY, -1),        # -1 = the run's length
    },
    "recompute_config": {                   # MindFormers' name; true = layer-by-layer with recomputation
        "recompute": (BOOL, False),          # (bounded memory, fast compile; see train/steps.py)
    },
    "parallel_config": {
        "data_parallel": (INT_POS, 1),       # dp × mp × pp = the number of msrun workers
        "model_parallel": (INT_POS, 1),      # shard strategies over attention heads, MLP width, vocabulary
        "pipeline_stage": (INT_POS, 1),
        "optimizer_shard": (BOOL, False),    # MindSpore's parallel optimizer: master weights + moments / dp
        "micro_batch_num": (INT_POS, 1),     # pipeline micro-batches in flight (1F1B)
    },
    "memory_plan": {                         # config.json contents for planning models that do not exist yet
        "student_config": (_check(lambda v: isinstance(v, dict), "a mapping (config.json contents)"), None),
        "teacher_config": (_check(lambda v: isinstance(v, dict), "a mapping (config.json contents)"), None),
    },
    "context": {
        "mode": (_one_of(0, 1, "GRAPH_MODE", "PYNATIVE_MODE"), 0),
        "device_target": (_one_of("auto", "CPU", "Ascend"), "auto"),
        "max_device_memory": (OPT_STR, None),
        "device_id": (OPT_INT_NONNEG, None),
        # CPU: the projections and LM head of the train step in bf16 (fp32 accumulation) or fp32;
        # auto = bf16 where the CPU has native bf16 dot products (train/bf16_ops.py)
        "cpu_precision": (_one_of(*CPU_PRECISIONS), DEFAULT_CPU_PRECISION),
    },
}
SOURCE_KEYS = {"path": (STR, REQUIRED), "format": (_one_of(*DATA_FORMATS), "auto"), "max_samples": (OPT_INT_POS, None),
               # sft data: train on the responses only, or on every token of the conversation (e.g.
               # distilling the teacher's distribution over the prompts as well)
               "loss": (_one_of(*LOSS_SPANS), "response")}
OPTIONAL_SECTIONS = ("eval_dataset", "memory_plan")


@dataclass
class DataSource:
    path: Path
    format: str  # resolved: "text" or "sft"
    max_samples: Optional[int] = None
    loss: str = "response"  # sft sources: "response" or "all" tokens are targets


@dataclass
class Recipe:
    """A validated recipe.  Section dicts hold every key with its default filled in."""

    path: Path
    run_mode: str
    seed: int
    output_dir: Path
    model: dict
    train_dataset: dict
    sources: list[DataSource]
    gkd: dict
    runner_config: dict
    runner_wrapper: dict
    optimizer: dict
    lr_schedule: dict
    parallel_config: dict
    context: dict
    recompute_config: dict = field(default_factory=lambda: {"recompute": False})
    eval_dataset: Optional[dict] = None
    memory_plan: Optional[dict] = None
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def student(self) -> Path:
        return Path(self.model["student"])

    @property
    def teacher(self) -> Optional[Path]:
        return Path(self.model["teacher"]) if self.model.get("teacher") else None

    @property
    def recompute(self) -> bool:
        return bool(self.recompute_config["recompute"])

    @property
    def graph_mode(self) -> bool:
        return self.context["mode"] in (0, "GRAPH_MODE")

    @property
    def workers(self) -> int:
        """msrun workers the layout needs: data × model × pipeline parallel."""
        pc = self.parallel_config
        return pc["data_parallel"] * pc["model_parallel"] * pc["pipeline_stage"]

    def global_batch(self, world: int) -> int:
        return self.runner_config["batch_size"] * self.runner_config["gradient_accumulation_steps"] * world

    def training_fingerprint(self) -> str:
        """Hash of what must not change across a resume (data, batch layout, objective, schedule)."""
        keep = {
            "run_mode": self.run_mode, "seed": self.seed, "student": str(self.student),
            "sources": [(str(s.path), s.format, s.max_samples) for s in self.sources],
            "train_dataset": self.train_dataset, "gkd": self.gkd if self.run_mode == "gkd" else None,
            "batch": (self.runner_config["batch_size"], self.runner_config["gradient_accumulation_steps"]),
            "epochs": self.runner_config["epochs"], "max_steps": self.runner_config["max_steps"],
            "optimizer": self.optimizer, "lr_schedule": self.lr_schedule,
            "trainable": self.model["trainable"], "data_parallel": self.parallel_config["data_parallel"],
            "balance_mla": self.model["balance_mla"],
        }
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("raw")
        return json.loads(json.dumps(data, default=str))


# -- environment expansion -------------------------------------------------------------------------
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: Any, where: str, key: str = "") -> Any:
    """Expand ``${VAR}`` / ``${VAR:-default}`` in every string of a YAML tree."""
    if isinstance(value, dict):
        return {k: expand_env(v, where, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ and os.environ[name] != "":
            return os.environ[name]
        if default is not None:
            return default
        raise UserError(f"{where}: {key}: environment variable {name} is not set (write ${{{name}:-default}} "
                        f"for a fallback)")

    return _VAR.sub(substitute, value)


# -- loading and validation ------------------------------------------------------------------------
def _bad(where: str, key: str, expected: str, value: Any) -> UserError:
    return UserError(f"{where}: {key} must be {expected}, got {value!r}")


def _validate_section(data: Any, spec: dict, where: str, prefix: str) -> dict:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{where}: {prefix} must be a mapping of keys, got {type(data).__name__}")
    unknown = sorted(set(data) - set(spec))
    if unknown:
        raise UserError(f"{where}: unknown key {prefix + '.' if prefix else ''}{unknown[0]} "
                        f"(expected one of: {', '.join(sorted(spec))})")
    out = {}
    for key, (check, default) in spec.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in data or data[key] is None and default is not REQUIRED:
            if default is REQUIRED:
                raise UserError(f"{where}: missing required key {dotted}")
            out[key] = default
            continue
        value = data[key]
        if check is not None:
            predicate, expected = check
            if isinstance(value, float) and value.is_integer() and expected.endswith("integer"):
                value = int(value)
            if not predicate(value):
                raise _bad(where, dotted, expected, value)
        out[key] = value
    return out


def load_recipe(path: str | os.PathLike, check_paths: bool = True) -> Recipe:
    """Read, expand and validate a recipe; with ``check_paths`` also every model dir and data file."""
    from mindyouzhi.io_utils import read_yaml

    path = Path(path)
    where = f"recipe {path}"
    raw = read_yaml(path, "--config", "recipe file")
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping of sections at the top level")
    data = expand_env(raw, where)

    sections = {name for name in SCHEMA if name}
    top_scalars = SCHEMA[""]
    unknown = sorted(set(data) - sections - set(top_scalars))
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]} (expected one of: "
                        f"{', '.join(sorted(sections | set(top_scalars)))})")
    top = _validate_section({k: data[k] for k in top_scalars if k in data}, top_scalars, where, "")
    parsed = {}
    for name in sections:
        if name in OPTIONAL_SECTIONS and data.get(name) is None:
            parsed[name] = None
            continue
        parsed[name] = _validate_section(data.get(name), SCHEMA[name], where, name)

    run_mode = top["run_mode"]
    rc = parsed["runner_config"]
    if rc["epochs"] is None:
        rc["epochs"] = DEFAULT_EPOCHS[run_mode]
    if run_mode == "gkd" and not parsed["model"]["teacher"]:
        raise UserError(f"{where}: run_mode gkd needs model.teacher (the original model to distil from)")
    if run_mode == "sft" and "gkd" in data:
        raise UserError(f"{where}: key gkd is only valid with run_mode gkd (this recipe is sft)")
    sched = parsed["lr_schedule"]
    if sched["lr_end"] > sched["learning_rate"]:
        raise _bad(where, "lr_schedule.lr_end", f"at most learning_rate ({sched['learning_rate']})", sched["lr_end"])
    context = parsed["context"]

    sources = _sources(parsed["train_dataset"]["sources"], where)
    recipe = Recipe(path=path, run_mode=run_mode, seed=top["seed"], output_dir=Path(top["output_dir"]),
                    model=parsed["model"], train_dataset=parsed["train_dataset"], sources=sources, gkd=parsed["gkd"],
                    runner_config=rc, runner_wrapper=parsed["runner_wrapper"], optimizer=parsed["optimizer"],
                    lr_schedule=sched, parallel_config=parsed["parallel_config"], context=context,
                    recompute_config=parsed["recompute_config"], eval_dataset=parsed["eval_dataset"],
                    memory_plan=parsed["memory_plan"], raw=data)
    if check_paths:
        check_recipe_paths(recipe)
    return recipe


def _sources(value: Any, where: str) -> list[DataSource]:
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: train_dataset.sources must be a non-empty list of data files "
                        f"(each a path or {{path, format, max_samples}})")
    out = []
    for index, entry in enumerate(value):
        key = f"train_dataset.sources[{index}]"
        if isinstance(entry, str):
            entry = {"path": entry}
        spec = _validate_section(entry, SOURCE_KEYS, where, key)
        source_path = Path(spec["path"])
        fmt = spec["format"]
        if fmt == "auto":
            fmt = "sft" if source_path.suffix in SFT_SUFFIXES or source_path.is_dir() else "text"
        if spec["loss"] != "response" and fmt != "sft":
            raise UserError(f"{where}: {key}.loss applies to sft data only (text data trains on every token)")
        out.append(DataSource(source_path, fmt, spec["max_samples"], spec["loss"]))
    return out


def _check_model_dir(where: str, key: str, model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise UserError(f"{where}: {key} {model_dir}: model directory not found")
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{where}: {key} {model_dir}: no config.json (expected an HF-layout model directory)")


def sft_files(source: DataSource, where: str, key: str) -> list[Path]:
    """The JSON/JSONL files of an SFT source (a file, or every *.json/*.jsonl of a directory)."""
    if source.path.is_dir():
        files = sorted(p for p in source.path.iterdir() if p.suffix in SFT_SUFFIXES and p.is_file())
        if not files:
            raise UserError(f"{where}: {key} {source.path}: directory has no .json or .jsonl files")
        return files
    return [source.path]


def check_recipe_paths(recipe: Recipe) -> None:
    where = f"recipe {recipe.path}"
    _check_model_dir(where, "model.student", recipe.student)
    if recipe.run_mode == "gkd":
        _check_model_dir(where, "model.teacher", recipe.teacher)
    for index, source in enumerate(recipe.sources):
        key = f"train_dataset.sources[{index}].path"
        if source.format == "text" and not source.path.is_file():
            raise UserError(f"{where}: {key} {source.path}: data file not found")
        if source.format == "sft":
            if not source.path.exists():
                raise UserError(f"{where}: {key} {source.path}: data file not found")
            sft_files(source, where, key)
    if recipe.eval_dataset and not Path(recipe.eval_dataset["path"]).is_file():
        raise UserError(f"{where}: eval_dataset.path {recipe.eval_dataset['path']}: data file not found")
    out = recipe.output_dir
    if out.exists() and not out.is_dir():
        raise UserError(f"{where}: output_dir {out} exists and is not a directory")
