"""``mindyouzhi convert``: validate everything, calibrate, choose the fold plan, convert, report.

All argument and data checks run before any expensive work, and the output directory appears only
when complete (written under a temporary name, then renamed).  Searches keep their state in a
work directory next to the output, so a killed run resumes.
"""
from __future__ import annotations

import re
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Union


from mindyouzhi.cli_support import DEFAULT_WINDOW
from mindyouzhi.convert_weights.safetensors_io import SafetensorsStore
from mindyouzhi.errors import UserError
from mindyouzhi.fingerprint import digest, reuse_or_reset
from mindyouzhi.generated_text import generated_texts, parse_spec, role_specs
from mindyouzhi.io_utils import (atomic_output_dir, locked_work_dir, peak_rss_bytes, read_json, sha256_file,
                                 write_json_atomic)
from mindyouzhi.models.config import ModelConfig, check_window, window_length
from mindyouzhi.models.decoder import read_global_weights
from mindyouzhi.paths import check_outputs, check_work_dir
from mindyouzhi.textdata import DEFAULT_TEXT_FIELD

from .calibration import (CALIB_SAMPLING, DEFAULT_FORWARD_PRECISION, GramCache, calibration_windows, resolve_forward_precision,
                          text_windows)
from .folds import DEFAULT_ROPE_STRIDE, check_fold, collapse, legal_folds, paper_label, rope_stride, seed_fold
from .layers import full_rank
from .lowrank import DEFAULT_KEY_WEIGHT, DEFAULT_LOWRANK, LOWRANK_METHODS
from .positions import DEFAULT_NOPE_ROTATION, check_nope_rotation
from .rorope import DEFAULT_RORO, RORO_METHODS
from .pipeline import DEFAULT_STATISTICS, ConversionPlan, check_convertible, compute_original_grams, convert_streaming, copy_side_files
from .plots import plot_plan, plot_trajectory
from .search import (CRITERIA, DEFAULT_SEARCH_CONTEXT, DEFAULT_SHORTLIST, CandidateFactory, HybridEvaluator,
                     PositionLayout, UniformStatistics, best_uniform, choose_position_layout,
                     run_adaptive_search)


@dataclass
class ConvertOptions:
    model: Path
    out: Path
    calib: Path
    rope_dim: Optional[int] = None
    # RoPE pair p at θ_{s·p} (folds.rope_stride): "auto" (scored, with --nope-rotation auto), an integer,
    # or None for TransMLA's head_dim/rope_dim
    rope_stride: Union[int, str, None] = DEFAULT_ROPE_STRIDE
    kv_lora_rank: Union[int, str, None] = None  # int, "full", or None for the default
    freqfold: str = "adaptive"  # "adaptive" | "uniform" | an integer
    search_data: Optional[Path] = None
    search_tokens: int = 8192
    search_seq_len: Optional[int] = None  # None: DEFAULT_WINDOW (the served context: a 512-token search misjudged
    # folds, docs/BENCHMARKS.md), or the model's context if shorter
    calib_tokens: int = 128 * 256
    calib_seq_len: int = 256
    calib_sampling: Optional[str] = None  # "rows" | "slots"; None: rows for files, slots for generate: text
    forward_precision: str = DEFAULT_FORWARD_PRECISION  # "auto" | "bf16" | "fp32": projections of calibration/search passes
    layers: Optional[str] = None
    latent_norm: bool = False
    stage: int = 2
    criterion: str = "final"
    folds: Optional[list[int]] = None
    plan: Optional[Path] = None  # a report.json whose fold_plan is reused (no search)
    lowrank: str = DEFAULT_LOWRANK
    key_weight: float = DEFAULT_KEY_WEIGHT
    shortlist: Optional[int] = DEFAULT_SHORTLIST
    search_context: str = DEFAULT_SEARCH_CONTEXT  # "uniform" | "original": the layers below a searched one
    statistics: str = DEFAULT_STATISTICS
    rorope: str = DEFAULT_RORO
    nope_rotation: str = DEFAULT_NOPE_ROTATION
    eval_data: Optional[Path] = None
    text_field: str = DEFAULT_TEXT_FIELD  # the text field/column of .jsonl/.parquet data
    eval_seq_len: Optional[int] = None  # None: DEFAULT_WINDOW, or the model's context if shorter
    eval_max_windows: Optional[int] = None
    seed: int = 42
    overwrite: bool = False
    work_dir: Optional[Path] = None
    restart: bool = False
    batch_size: int = 8
    uniform_guard: bool = True
    trajectories: bool = True
    rope_all: bool = False  # exactness mode (RoPE on every component); hidden from the CLI help


def parse_layers(spec: Optional[str], num_layers: int) -> set[int]:
    """``"all"``, ``"0-3,7"``, ``"last:4"`` → set of layer indices."""
    if spec is None or spec.strip() == "all":
        return set(range(num_layers))
    spec = spec.strip()
    match = re.fullmatch(r"last:(\d+)", spec)
    if match:
        count = int(match.group(1))
        if not 0 < count <= num_layers:
            raise UserError(f"--layers {spec}: expected last:N with 1 ≤ N ≤ {num_layers}")
        return set(range(num_layers - count, num_layers))
    chosen: set[int] = set()
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise UserError(f"--layers {spec}: expected 'all', 'last:N' or a list like '0-3,7'")
        low, high = int(match.group(1)), int(match.group(2) or match.group(1))
        if low > high or high >= num_layers:
            raise UserError(f"--layers {spec}: layer indices must lie in 0…{num_layers - 1}")
        chosen.update(range(low, high + 1))
    return chosen


def _file(path: Optional[Path], flag: str) -> Optional[Path]:
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: file not found")
    return path


def _resolve(options: ConvertOptions):
    """All validation that needs no heavy work; returns (config, rope_dim, strides, rank, layers, fixed plan):
    ``strides`` are the RoPE strides the conversion may use (one unless ``--rope-stride auto``), each
    legal for the fixed plan and the candidate folds (``_candidate_folds``)."""
    config = ModelConfig.from_dir(options.model)
    check_convertible(config, str(options.model))
    inputs = {"--model": options.model, **_text_sources(options), "--plan": options.plan}
    check_outputs({"--out": options.out}, inputs, options.overwrite, directories={"--out"})
    check_work_dir(options.work_dir, options.out, inputs)
    rope_dim = options.rope_dim if options.rope_dim is not None else config.head_dim // 2
    if options.rope_all:
        rope_dim = config.head_dim
    c = collapse(config.head_dim, rope_dim)
    if options.rope_all:
        strides = [c]  # (unused: the exactness mode keeps RoPE on every component at its own frequency)
    elif options.rope_stride == "auto":
        # TransMLA's first (a tie keeps it).  Given folds (--freqfold F, F1,…, --plan) were written in
        # TransMLA's terms: auto keeps its stride for them (a search chooses, see _choose_layout)
        fixed = options.plan is not None or options.freqfold not in ("adaptive", "uniform")
        strides = [c] if fixed and options.plan is None else [s for s in range(c, 0, -1) if c % s == 0]
    elif isinstance(options.rope_stride, str):
        raise UserError(f"--rope-stride {options.rope_stride}: expected 'auto' or an integer from 1 to "
                        f"head_dim/rope_dim = {c}")
    else:
        strides = [rope_stride(config.head_dim, rope_dim, options.rope_stride)]
    limit = full_rank(config, rope_dim, options.rope_all)
    rank = options.kv_lora_rank
    if rank is None:
        rank = min(4 * config.head_dim, limit)
    elif isinstance(rank, str):
        if rank != "full":
            try:
                rank = int(rank)
            except ValueError:
                raise UserError(f"--kv-lora-rank {rank}: expected a positive integer or 'full'") from None
        else:
            rank = None
    if rank is not None and not 0 < rank <= limit:
        raise UserError(f"--kv-lora-rank {rank}: the maximum for this model is {limit} "
                        f"(2 × {config.num_key_value_heads} KV heads × head_dim {config.head_dim} − rope_dim {rope_dim})")
    if options.stage not in (1, 2):
        raise UserError(f"--stage {options.stage}: expected 1 or 2")
    if options.criterion not in CRITERIA:
        raise UserError(f"--criterion {options.criterion}: expected one of {', '.join(CRITERIA)}")
    if options.rorope not in RORO_METHODS:
        raise UserError(f"--rorope {options.rorope}: expected one of {', '.join(RORO_METHODS)}")
    check_nope_rotation(options.nope_rotation)
    if options.lowrank not in LOWRANK_METHODS:
        raise UserError(f"--lowrank {options.lowrank}: expected one of {', '.join(LOWRANK_METHODS)}")
    if not options.key_weight > 0:
        raise UserError(f"--key-weight {options.key_weight}: must be positive")
    if options.shortlist is not None and options.shortlist < 1:
        raise UserError(f"--shortlist {options.shortlist}: must be at least 1")
    strides, fixed_plan = _fixed_plan(options, config, rope_dim, strides)
    if options.folds and not options.rope_all:
        strides = _legal_for(strides, options.folds, config, rope_dim, "--folds")
    layers = parse_layers(options.layers, config.num_hidden_layers)
    explicit = options.plan is not None or "," in str(options.freqfold)
    if explicit and options.layers is not None:
        raise UserError("--layers cannot be combined with a per-layer fold plan: mark GQA layers with null in the plan")
    generated = role_specs(_text_sources(options), options.seed)
    needs = {"--calib": (options.calib_tokens, "--calib-tokens"), "--search-data": (options.search_tokens, "--search-tokens"),
             "--eval-data": (options.eval_seq_len, "--eval-seq-len")}
    if options.search_data is None and fixed_plan is None:  # the search samples its windows from --calib
        needs["--calib"] = max(needs["--calib"], needs["--search-data"])
    for flag, spec in generated.items():
        if spec.tokens < needs[flag][0]:
            raise UserError(f"{flag} generate:{spec.tokens}: fewer tokens than {needs[flag][1]} {needs[flag][0]} needs")
    for flag, path in _text_sources(options).items():
        if flag not in generated:
            _file(path, flag)
    if options.eval_data is not None and "--eval-data" not in generated:
        eval_hash = sha256_file(options.eval_data)
        for flag, path in (("--calib", options.calib), ("--search-data", options.search_data)):
            if path is not None and flag not in generated and sha256_file(path) == eval_hash:
                raise UserError(f"{flag} {path} and --eval-data {options.eval_data} are the same data: calibration and "
                                "search must never see the evaluation split")
    if options.latent_norm and options.stage == 1:
        raise UserError("--latent-norm applies to the low-rank stage; it cannot be combined with --stage 1")
    if options.latent_norm and fixed_plan is None:
        raise UserError(f"--latent-norm with --freqfold {options.freqfold}: the fold search scores layers without a "
                        "latent norm, so it would not write the model it scored; search without it, then convert "
                        "again with --plan <out>/report.json --latent-norm")
    return config, rope_dim, strides, rank, layers, fixed_plan


def _legal_for(strides: list[int], folds, config: ModelConfig, rope_dim: int, where: str) -> list[int]:
    """The strides for which every fold in ``folds`` is legal (the error of the first stride if none)."""
    folds = sorted({f for f in folds if f is not None})
    legal = [s for s in strides if all(f in legal_folds(config.head_dim, rope_dim, stride=s) for f in folds)]
    if not legal:
        for fold in folds:
            check_fold(fold, config.head_dim, rope_dim, where, strides[0])
    return legal


def _candidate_folds(options: ConvertOptions, config: ModelConfig, rope_dim: int, stride: int) -> list[int]:
    return options.folds or legal_folds(config.head_dim, rope_dim, stride=stride)


def _with_windows(options: ConvertOptions) -> ConvertOptions:
    """Window lengths, token budgets and batch sizes: positive, within the model's context (the
    search and evaluation windows, when not given, are the default clamped to it)."""
    config = ModelConfig.from_dir(options.model)
    check_window(options.calib_seq_len, "--calib-seq-len", config)
    searching = options.plan is None and options.freqfold in ("adaptive", "uniform")
    options = replace(options, search_seq_len=window_length(options.search_seq_len, DEFAULT_WINDOW, "--search-seq-len",
                                                            config, notice=searching),
                      eval_seq_len=window_length(options.eval_seq_len, DEFAULT_WINDOW, "--eval-seq-len", config,
                                                 notice=options.eval_data is not None))
    budgets = [("--calib-tokens", options.calib_tokens, options.calib_seq_len)]
    if searching:
        budgets.append(("--search-tokens", options.search_tokens, options.search_seq_len))
    for flag, tokens, seq_len in budgets:
        if tokens < seq_len:
            seq_flag = flag.replace("-tokens", "-seq-len")
            raise UserError(f"{flag} {tokens}: must be at least one window of {seq_flag} {seq_len}")
    if options.batch_size < 1:
        raise UserError(f"--batch-size {options.batch_size}: must be at least 1")
    if options.eval_max_windows is not None and options.eval_max_windows < 1:
        raise UserError(f"--eval-max-windows {options.eval_max_windows}: must be at least 1")
    return options


def _text_sources(options: ConvertOptions) -> dict:
    return {"--calib": options.calib, "--search-data": options.search_data, "--eval-data": options.eval_data}


def _with_generated_text(options: ConvertOptions) -> tuple[ConvertOptions, dict[str, str]]:
    """``generate:`` sources replaced by their cached text files; flag → how each source was made."""
    specs = role_specs(_text_sources(options), options.seed)
    origins = {flag: "file" for flag, value in _text_sources(options).items() if value is not None}
    if not specs:
        return options, origins
    paths = generated_texts(options.model, list(specs.values()))
    fields = {"--calib": "calib", "--search-data": "search_data", "--eval-data": "eval_data"}
    origins.update({flag: spec.describe() for flag, spec in specs.items()})
    return replace(options, **{fields[flag]: path for flag, path in zip(specs, paths)}), origins


def _fixed_plan(options: ConvertOptions, config: ModelConfig, rope_dim: int,
                strides: list[int]) -> tuple[list[int], Optional[list[Optional[int]]]]:
    """The per-layer folds when no search runs (``--plan report.json``, ``--freqfold F`` or ``F1,F2,…``;
    None for a search) and the strides among ``strides`` they are legal for."""
    layers = config.num_hidden_layers
    if options.plan is not None:
        if options.freqfold not in ("adaptive",):
            raise UserError(f"--plan {options.plan} and --freqfold {options.freqfold}: give one of them")
        report = read_json(_file(options.plan, "--plan"), "--plan")
        folds = report.get("fold_plan") if isinstance(report, dict) else None
        if not isinstance(folds, list) or not all(f is None or isinstance(f, int) for f in folds):
            raise UserError(f"--plan {options.plan}: expected a report.json with a 'fold_plan' list of folds (or null)")
        if report.get("rope_dim") not in (None, rope_dim):
            raise UserError(f"--plan {options.plan}: the plan was searched for rope_dim {report['rope_dim']}, "
                            f"this conversion uses --rope-dim {rope_dim}")
        planned = report.get("rope_stride", config.head_dim // rope_dim)  # (absent: written before the option)
        if planned not in strides:
            raise UserError(f"--plan {options.plan}: the plan's folds are for RoPE stride {planned}, this conversion "
                            f"uses {strides[0]}; pass --rope-stride {planned} (or auto)")
        strides = [planned]
        where = f"--plan {options.plan}"
    elif options.freqfold in ("adaptive", "uniform"):
        return strides, None
    else:
        parts = [p.strip() for p in str(options.freqfold).split(",")]
        try:
            folds = [int(p) for p in parts]
        except ValueError:
            raise UserError(f"--freqfold {options.freqfold}: expected 'adaptive', 'uniform', a fold F "
                            "or one fold per layer (F1,F2,…)") from None
        if len(folds) == 1:
            folds = folds * layers
        where = "--freqfold"
    if len(folds) != layers:
        raise UserError(f"{where}: {len(folds)} folds for a model with {layers} layers")
    if not options.rope_all:
        strides = _legal_for(strides, folds, config, rope_dim, where)
    return strides, folds


def convert(options: ConvertOptions) -> dict:
    started = time.perf_counter()
    options = _with_windows(options)
    config, rope_dim, strides, rank, layers, fixed_plan = _resolve(options)
    converts_nothing = options.rope_all or (fixed_plan is not None and all(
        f is None or i not in layers for i, f in enumerate(fixed_plan)))
    if converts_nothing:  # no position-free component to rotate, no stride to choose
        strides = strides[:1]
        if options.nope_rotation == "auto":
            options = replace(options, nope_rotation="none")
    rotations = ["mean", "none"] if options.nope_rotation == "auto" else [options.nope_rotation]
    layouts = [PositionLayout(s, r) for s in strides for r in rotations]
    choosing = len(layouts) > 1
    if not choosing:
        options = replace(options, rope_stride=layouts[0].rope_stride, nope_rotation=layouts[0].nope_rotation)
    if options.calib_sampling not in (None, *CALIB_SAMPLING):
        raise UserError(f"--calib-sampling {options.calib_sampling}: expected one of {', '.join(CALIB_SAMPLING)}")
    precision, fallback = resolve_forward_precision(options.forward_precision)
    if fallback:
        print(f"note: the conversion's forward passes run in fp32 ({fallback})", file=sys.stderr)
    # Generated text is independent rows of one sampling run: any window is as good as a row start.
    sampling = options.calib_sampling or ("slots" if parse_spec(options.calib, "--calib") else None)
    options, origins = _with_generated_text(options)
    from mindyouzhi.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(options.model)
    timings: dict[str, float] = {}
    data_files = {"calib": options.calib, "search": options.search_data or options.calib, "eval": options.eval_data}
    hashes = {role: {"path": str(path), "sha256": sha256_file(path)} for role, path in data_files.items() if path}
    for role, flag in (("calib", "--calib"), ("search", "--search-data" if options.search_data else "--calib"),
                       ("eval", "--eval-data")):
        if role in hashes:
            hashes[role]["source"] = origins[flag]
    t0 = time.perf_counter()
    calib, sampling = calibration_windows(tokenizer, options.calib, options.calib_tokens, options.calib_seq_len,
                                          options.seed, sampling, options.text_field)
    search_windows = None
    # tokenized before the work dir exists: a data error leaves nothing behind.  The position-layout
    # choice (--rope-stride / --nope-rotation auto) scores its plans on the search windows (given
    # --search-data even without a search), else on calibration windows.
    if fixed_plan is None or (choosing and options.search_data is not None):
        search_windows = text_windows(tokenizer, data_files["search"], options.search_tokens, options.search_seq_len,
                                      options.seed + 1, "--search-data" if options.search_data else "--calib",
                                      options.text_field, tokens_flag="--search-tokens")
    choice_windows = search_windows
    if choice_windows is None and choosing:
        choice_windows = calib[:max(1, options.search_tokens // options.calib_seq_len)]
    eval_windows = _eval_windows(options, tokenizer) if options.eval_data is not None else None
    timings["calibration_tokenize"] = time.perf_counter() - t0
    store = SafetensorsStore(options.model)
    model_identity = _model_fingerprint(options.model)
    grams_fingerprint = {"model": model_identity, "calib": hashes["calib"]["path"],
                         "calib_sha256": hashes["calib"]["sha256"], "calib_tokens": options.calib_tokens,
                         "calib_seq_len": options.calib_seq_len, "calib_sampling": sampling,
                         "text_field": options.text_field, "seed": options.seed, "forward_precision": precision,
                         "windows_sha256": _array_hash(calib),
                         "nope_rotation": options.nope_rotation}  # the profiles
    work = options.work_dir or options.out.parent / f".{options.out.name}.work"
    named = options.work_dir is not None or work.is_symlink()  # a link the user made is theirs: one subdir of it
    with locked_work_dir(work, options.out, options.restart, named=named, remove_on_success=True,
                         scratch=("hidden", "candidates", "rotation")) as work:  # spilled, rebuilt by every run
        search_info: dict = {}
        statistics = None  # a search's: the statistics of the layers it scored
        evaluator = None
        position_choice = chosen_plan = None
        if choosing:
            t0 = time.perf_counter()
            evaluator = HybridEvaluator(config, store, choice_windows, options.criterion, options.batch_size,
                                        spill_dir=work / "hidden", where=str(options.model), precision=precision)
            position_choice, chosen_plan = _choose_layout(options, config, evaluator, calib, rope_dim, rank,
                                                                layouts, layers, fixed_plan, precision, work,
                                                                grams_fingerprint)
            options = replace(options, **position_choice["chosen"])
            timings["position_layout"] = time.perf_counter() - t0
            if fixed_plan is not None:
                evaluator = None
                # a uniform fixed plan is the plan just scored: written from its statistics (no third stream)
                folds = {f for i, f in enumerate(fixed_plan) if f is not None and i in layers}
                scored = next(c["fold"] for c in position_choice["candidates"]
                              if {k: c[k] for k in ("rope_stride", "nope_rotation")} == position_choice["chosen"])
                if (chosen_plan is not None and folds == {scored} and not options.latent_norm
                        and (options.stage == 1 or options.criterion in ("final", "kl"))):
                    statistics = chosen_plan.statistics
        candidates = _candidate_folds(options, config, rope_dim, options.rope_stride)
        if fixed_plan is not None:
            plan_folds = [f if i in layers else None for i, f in enumerate(fixed_plan)]
        else:
            # The search scores layers converted from per-layer statistics and hands them over, so
            # the layers written below are the ones it scored (docs/conversion.md §5).
            fingerprint = {"model": model_identity, "search": hashes["search"]["sha256"],
                           "calib": hashes["calib"]["sha256"], "criterion": options.criterion, "rope_dim": rope_dim,
                           "rope_stride": options.rope_stride,
                           "rank": rank, "seed": options.seed, "search_tokens": options.search_tokens,
                           "search_seq_len": options.search_seq_len, "calib_tokens": options.calib_tokens,
                           "forward_precision": precision,
                           "layers": sorted(layers), "lowrank": options.lowrank, "key_weight": options.key_weight,
                           "rorope": options.rorope, "nope_rotation": options.nope_rotation,
                           "shortlist": options.shortlist, "context": options.search_context,
                           "grams": digest(grams_fingerprint), "search_windows_sha256": _array_hash(search_windows),
                           "text_field": options.text_field, "statistics": options.statistics,
                           "freqfold": options.freqfold, "stage": options.stage, "rope_all": options.rope_all}
            grams = GramCache()  # context "uniform": replaced by the best uniform plan's statistics
            if options.freqfold == "adaptive" and options.search_context == "original":
                t0 = time.perf_counter()  # the paper's context: candidates from the original model's statistics
                reuse_or_reset(work / "grams", grams_fingerprint, "calibration statistics")
                grams = GramCache(work / "grams")
                compute_original_grams(config, store, calib, grams, options.batch_size, str(options.model),
                                       "none" if options.rope_all else options.nope_rotation, precision)
                timings["calibration"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            if evaluator is None:  # (the rotation choice's evaluator already scores these windows)
                evaluator = HybridEvaluator(config, store, search_windows, options.criterion, options.batch_size,
                                            spill_dir=work / "hidden", where=str(options.model), precision=precision)
            timings["search_prefix"] = time.perf_counter() - t0
            # the candidates are the layers written: stage-1 layers when --stage 1 is written
            factory = CandidateFactory(evaluator, grams, rope_dim, rank if options.stage == 2 else None, options.lowrank,
                                       options.key_weight, options.rorope, options.nope_rotation,
                                       spill_dir=work / "candidates", rope_all=options.rope_all,
                                       rope_stride=options.rope_stride)
            reuse_or_reset(work / "statistics", {**fingerprint, "candidates": candidates}, "the uniform plans' statistics")
            uniform = UniformStatistics(calib, options.statistics, precision, options.batch_size, work / "statistics")
            t0 = time.perf_counter()
            # the position-layout choice scored a uniform plan of the chosen layout on these windows,
            # converted as this search converts it: the search takes it over (its first plan)
            if options.freqfold == "uniform":
                plans = best_uniform(evaluator, factory, candidates, layers, uniform, chosen_plan)
                plan_folds = [plans.best if i in layers else None for i in range(config.num_hidden_layers)]
                statistics = plans.statistics
                search_info = {"mode": "uniform", "uniform_scores": {str(f): s for f, s in plans.scores.items()},
                               "chosen": plans.best,
                               "evaluations": evaluator.evaluations,
                               "full_forward_equivalents": evaluator.full_forward_equivalents(),
                               "calibration_streams": uniform.streams}
            else:
                reuse_or_reset(work / "search_state.json", {**fingerprint, "candidates": candidates}, "the search state")
                outcome = run_adaptive_search(evaluator, factory, candidates, work / "search_state.json", fingerprint,
                                              options.uniform_guard, options.trajectories, layers, options.shortlist,
                                              options.search_context, uniform, chosen_plan)
                plan_folds, statistics = outcome.plan, outcome.statistics
                search_info = {
                    "mode": "adaptive", "criterion": options.criterion, "shortlist": options.shortlist,
                    "context": outcome.context, "baseline": outcome.baseline,
                    "original": outcome.original,
                    "adaptive": outcome.adaptive_score,
                    "uniform_scores": {str(f): s for f, s in outcome.uniform_scores.items()},
                    "fell_back_to_uniform": outcome.fell_back_to_uniform, "rounds": outcome.rounds,
                    "trajectory": {k: [list(p) for p in v] for k, v in outcome.trajectory.items()},
                    "evaluations": outcome.evaluations,
                    "full_forward_equivalents": outcome.full_forward_equivalents,
                    "search_forward_equivalents": outcome.search_forward_equivalents,
                    "budget_forward_equivalents": len(layers) * len(candidates),
                    "calibration_streams": outcome.calibration_streams,
                    "search_seconds": outcome.seconds,
                }
            timings["search"] = time.perf_counter() - t0
            search_info["search_windows"] = list(search_windows.shape)
        plan = ConversionPlan(rope_dim, plan_folds, rank, options.stage, options.latent_norm, options.rope_all,
                              options.lowrank, options.key_weight, options.statistics, options.rorope,
                              options.nope_rotation, precision, options.rope_stride)
        with atomic_output_dir(options.out, options.overwrite) as tmp:
            t0 = time.perf_counter()
            result = convert_streaming(options.model, tmp, plan, calib, keep_stage1=options.eval_data is not None,
                                       batch_size=options.batch_size, statistics=statistics)
            timings["convert"] = time.perf_counter() - t0
            (tmp / "config.json").write_text(_json(result.config.to_hf_dict()))
            copy_side_files(options.model, tmp)
            ppl = {}
            if options.eval_data is not None:
                t0 = time.perf_counter()
                ppl = _evaluate_stages(options, config, result, eval_windows, store, tmp)
                timings["evaluation"] = time.perf_counter() - t0
            report = _report(options, config, result, plan, rank, candidates, search_info, ppl, hashes, timings, started,
                             sampling, fallback)
            if position_choice is not None:
                report["position_choice"] = position_choice
            if search_info.get("trajectory"):
                plot_trajectory(search_info["trajectory"], search_info["original"], tmp / "search_trajectory.png",
                                ylabel=f"search criterion ({options.criterion})",
                                xlabel="search rounds (layers decided, last first)" if search_info.get("context") == "uniform"
                                else None)
            if any(f is not None for f in plan_folds):
                plot_plan(plan_folds, tmp / "fold_plan.png", {"rope_dim": rope_dim, "kv_lora_rank": rank or "full"})
            write_json_atomic(tmp / "report.json", report)
    return report


def _choose_layout(options, config, evaluator, calib, rope_dim, rank, layouts, layers, fixed_plan, precision,
                   work: Path, grams_fingerprint: dict):
    """``--rope-stride auto`` / ``--nope-rotation auto`` (``search.choose_position_layout``): each layout's
    uniform plan at the fold the fixed plan uses most, or (a search) at the candidate fold nearest to
    ``2·s`` (``folds.seed_fold``: the strides are compared at equal folding) over the layers it
    converts: (the choice, the chosen layout's ``search.UniformPlans`` when this run converted it)."""
    from collections import Counter

    if fixed_plan is not None:
        selected = {i for i, f in enumerate(fixed_plan) if f is not None and i in layers}
        planned = Counter(fixed_plan[i] for i in selected).most_common(1)[0][0]
    else:
        selected, planned = set(layers), None
    stage_rank = rank if options.stage == 2 else None

    def fold_for(layout: PositionLayout) -> int:
        if planned is not None:
            return planned
        return seed_fold(_candidate_folds(options, config, rope_dim, layout.rope_stride), layout.rope_stride)

    def directory(layout: PositionLayout) -> Path:
        return work / "rotation" / f"stride{layout.rope_stride}-{layout.nope_rotation}"

    def factory_for(layout: PositionLayout) -> CandidateFactory:
        return CandidateFactory(evaluator, GramCache(), rope_dim, stage_rank, options.lowrank, options.key_weight,
                                options.rorope, layout.nope_rotation, spill_dir=directory(layout),
                                rope_all=options.rope_all, rope_stride=layout.rope_stride)

    def statistics_for(layout: PositionLayout) -> UniformStatistics:
        return UniformStatistics(calib, options.statistics, precision, options.batch_size,
                                 directory(layout).with_name(directory(layout).name + "-statistics"))

    fingerprint = {"grams": digest(grams_fingerprint), "folds": [fold_for(layout) for layout in layouts],
                   "layouts": [layout.label for layout in layouts], "layers": sorted(selected), "rank": stage_rank,
                   "rope_dim": rope_dim, "lowrank": options.lowrank, "key_weight": options.key_weight,
                   "rorope": options.rorope, "statistics": options.statistics, "criterion": options.criterion,
                   "windows_sha256": _array_hash(evaluator.inputs), "rope_all": options.rope_all}
    choice, statistics = choose_position_layout(evaluator, layouts, fold_for, factory_for, statistics_for, selected,
                                                work / "position_layout.json", fingerprint)
    choice["requested"] = {"rope_stride": options.rope_stride, "nope_rotation": options.nope_rotation}
    return choice, statistics


def _json(obj) -> str:
    import json

    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def _model_fingerprint(model_dir: Path) -> str:
    """Cheap identity of a model dir (hashing its weights would cost a full read): config and
    tokenizer bytes, weight file names, sizes and modification times (ns)."""
    import hashlib

    sha = hashlib.sha256((Path(model_dir) / "config.json").read_bytes())
    for path in sorted(Path(model_dir).iterdir()):
        if path.suffix == ".safetensors" or path.name.startswith("tokenizer"):
            stat = path.stat()
            sha.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return sha.hexdigest()


def _array_hash(array) -> str:
    import hashlib

    import numpy as np

    array = np.ascontiguousarray(array)
    return hashlib.sha256(f"{array.dtype}{array.shape}".encode() + array.tobytes()).hexdigest()


def _eval_windows(options, tokenizer):
    """The --eval-data windows, cut before any work so a short file fails at once."""
    from mindyouzhi.eval.ppl import token_stream, windows

    return windows(token_stream(tokenizer, options.eval_data, "--eval-data", options.text_field), options.eval_seq_len,
                   options.eval_max_windows, options.eval_data, "--eval-data")


def _evaluate_stages(options, config, result, data, store, out_tmp: Path) -> dict:
    from mindyouzhi.eval.ppl import perplexity
    from mindyouzhi.models.runner import ModelRunner

    out = {"windows": int(data.shape[0]), "seq_len": int(data.shape[1])}
    out["original"] = perplexity(ModelRunner.from_dir(options.model, with_tokenizer=False), data).ppl
    if result.stage1_weights is not None and result.config.mla is not None:
        weights = dict(result.stage1_weights)
        weights.update(read_global_weights(store, config))
        ranks = [full_rank(config, result.config.mla.rope_dim, result.config.mla.rope_all) if f is not None else None
                 for f in result.config.mla.fold_plan]
        stage1_config = result.config.replace(mla=replace(result.config.mla, kv_lora_rank=ranks, latent_norm=False,
                                                          stage=1, extra={}))
        out["stage1"] = perplexity(ModelRunner.from_weights(stage1_config, weights), data).ppl
        del weights
    out["final"] = perplexity(ModelRunner.from_dir(out_tmp, with_tokenizer=False), data).ppl
    return out


def _report(options, config, result, plan, rank, candidates, search_info, ppl, hashes, timings, started,
            sampling: str, precision_fallback: Optional[str]) -> dict:
    kv_before = [config.kv_values_per_token(i) for i in range(config.num_hidden_layers)]
    kv_after = [result.config.kv_values_per_token(i) for i in range(config.num_hidden_layers)]
    return {
        "model": str(options.model),
        "rope_dim": plan.rope_dim,
        "rope_stride": rope_stride(config.head_dim, plan.rope_dim, plan.rope_stride) if not plan.rope_all else None,
        "kv_lora_rank": rank if rank is not None else "full",
        "stage": plan.stage,
        "latent_norm": plan.latent_norm,
        "freqfold": options.freqfold if options.plan is None else f"plan:{options.plan}",
        "lowrank": {"method": plan.lowrank, "key_weight": plan.key_weight},
        "statistics": plan.statistics,
        "rorope": plan.rorope,
        "nope_rotation": plan.nope_rotation,
        "fold_plan": plan.fold_plan,
        "fold_plan_paper_labels": [paper_label(f, config.head_dim, plan.rope_dim, plan.rope_stride) if f is not None else None
                                   for f in plan.fold_plan],
        "candidate_folds": candidates,
        "criterion": options.criterion if search_info else None,
        "search": search_info,
        "ppl": ppl,
        "kv_values_per_token_per_layer": {"before": kv_before, "after": kv_after},
        "kv_values_per_token": {"before": int(sum(kv_before)), "after": int(sum(kv_after)),
                                "reduction": 1.0 - sum(kv_after) / sum(kv_before)},
        "layers": result.layers,
        "data": hashes,
        "calibration": {"tokens": options.calib_tokens, "seq_len": options.calib_seq_len, "seed": options.seed,
                        "sampling": sampling},
        "forward_precision": {"used": plan.forward_precision, "requested": options.forward_precision,
                              "fallback_reason": precision_fallback},
        "timings_seconds": {k: round(v, 3) for k, v in {**timings, "total": time.perf_counter() - started}.items()},
        "peak_rss_bytes": peak_rss_bytes(),
    }
