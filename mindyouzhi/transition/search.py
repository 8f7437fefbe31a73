"""Layer-adaptive FreqFold (YouZhi): greedy per-layer fold choice, last layer first.

Round for layer l (from L−1 down to 0): layers > l are converted with their chosen folds, every
candidate fold for layer l is tried, and the one with the lowest criterion on the *search* windows
is kept.  What the layers < l are during round l is the search *context*:

* ``original`` (the YouZhi paper): the original GQA layers.
* ``uniform`` (default): the best uniform fold, i.e. the search starts from TransMLA's plan (the
  uniform plans scored outward from a start fold while they improve, ``score_uniform_plans``) and
  each round tries the layer's alternatives with every other
  layer as it will be deployed.  The current plan is always one of the round's candidates, so the
  criterion never rises from round to round and the plan is never worse than the best uniform one
  on the search windows.  Chosen on validation text (docs/BENCHMARKS.md): a fold's cost measured
  with GQA below it does not carry over to the converted model.

The search scores what is written.  Every candidate is converted by ``pipeline.convert_layer``
from per-layer statistics, and the outcome names those statistics, so the written model is the
one scored.  In the ``uniform`` context each uniform plan is converted from its own calibration
stream (``UniformStatistics``: the model ``--freqfold F`` writes, with the default
``--statistics``), and the rounds convert their candidates from the best plan's statistics — the
inputs the layer sees in the context it is judged in.  In the ``original`` context the
statistics are the original model's.

Layers < l never change during the search, so the hidden states entering every layer are computed
once (one forward of the context model) and each candidate runs only layers l … L−1 and the head:
about ``|S|·(L+1)/2`` full-forward equivalents instead of ``L·|S|``.  The state (uniform scores,
decided layers, every evaluated candidate) is written atomically after each round; a killed search
resumes where it stopped and ends with the same plan.

``run_adaptive_search`` reads top to bottom: load the state, score the original model, (context
``uniform``) score the uniform plans and start from the best, run the greedy rounds, (context
``original``) compare with the uniform plans, report.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import mindspore as ms

from mindyouzhi.convert_weights.safetensors_io import SafetensorsStore
from mindyouzhi.errors import UserError
from mindyouzhi.io_utils import read_json, write_json_atomic
from mindyouzhi.models.config import ModelConfig
from mindyouzhi.models.decoder import read_global_weights, read_layer_weights
from mindyouzhi.models.layers import to_tensor
from mindyouzhi.models.runner import head_functions, head_rows
from mindyouzhi.progress import progress_bar

from .calibration import GramCache, LayerRunner
from .folds import rope_stride, seed_fold
from .layers import split_attention
from .lowrank import DEFAULT_KEY_WEIGHT, DEFAULT_LOWRANK
from .pipeline import DEFAULT_STATISTICS, ConversionPlan, convert_layer, load_statistics, save_statistics, stream_conversion
from .positions import PLAN_NOPE_ROTATION
from .rorope import DEFAULT_RORO

CRITERIA = ("stage1", "final", "kl")
SEARCH_CONTEXTS = ("uniform", "original")
DEFAULT_SEARCH_CONTEXT = "uniform"
DEFAULT_SHORTLIST = 2  # candidates per round that get the full criterion after the local-error ranking


class HybridEvaluator:
    """Scores hybrid models on fixed search windows, reusing the unchanged original prefix."""

    def __init__(self, config: ModelConfig, store: SafetensorsStore, windows: np.ndarray, criterion: str = "stage1",
                 batch_size: int = 8, spill_dir: Optional[Path] = None, where: str = "checkpoint",
                 precision: str = "fp32"):
        if criterion not in CRITERIA:
            raise UserError(f"--criterion {criterion}: expected one of {', '.join(CRITERIA)}")
        self.config, self.store, self.criterion, self.where = config, store, criterion, where
        self.inputs, self.targets = windows[:, :-1], windows[:, 1:]
        self.batch_size = batch_size
        self.runner = LayerRunner(self.inputs.shape[1], batch_size, precision)  # the head stays fp32
        globals_ = read_global_weights(store, config, where)
        self._norm = to_tensor(globals_["model.norm.weight"])
        self._head = to_tensor(globals_.get("lm_head.weight", globals_["model.embed_tokens.weight"]))
        self._eps = float(config.rms_norm_eps)
        self._heads = head_functions("fp32")
        self.spill_dir = spill_dir
        self.original = self._pass([_original_layer(self, i) for i in range(config.num_hidden_layers)],
                                   globals_["model.embed_tokens.weight"][self.inputs], spill_dir, "search prefix")
        self.boundaries = self.original  # hidden states entering each layer in the search context
        self._reference: Optional[tuple[int, np.ndarray]] = None
        self.layer_forwards_at_start = self.runner.layer_forwards
        self.evaluations = 0

    def _pass(self, layers: Sequence[Callable[[np.ndarray], np.ndarray]], hidden: np.ndarray,
              spill_dir: Optional[Path], label: str) -> list:
        """Hidden states entering every layer (and leaving the last) of the model ``layers``."""
        store = [_Spilled.save(spill_dir, 0, hidden)]
        bar = progress_bar(self.config.num_hidden_layers, label, "layer")
        for index, layer in enumerate(layers):
            hidden = layer(hidden)
            store.append(_Spilled.save(spill_dir, index + 1, hidden))
            bar.update(1)
        bar.close()
        return store

    def set_context(self, layers: Sequence[Callable[[np.ndarray], np.ndarray]]) -> None:
        """Evaluate later candidates on top of the model ``layers`` (one per layer) instead of the
        original: its hidden states entering every layer are computed once here."""
        spill = self.spill_dir / "context" if self.spill_dir is not None else None
        self.boundaries = self._pass(layers, np.asarray(self.original[0][0:self.inputs.shape[0]]), spill,
                                     "search context")
        self._reference = None

    def full_forward_equivalents(self) -> float:
        return self.runner.layer_forwards / (self.inputs.shape[0] * self.config.num_hidden_layers)

    def window_scores(self, start: int, layers: Sequence[Callable[[np.ndarray], np.ndarray]]) -> np.ndarray:
        """Per search window, the mean criterion (NLL or KL per token) with layers ``start…L−1`` replaced.

        Layer by layer over all windows (one layer's weights in memory at a time: the layers are
        ``SearchLayer``s that load theirs when called)."""
        assert len(layers) == self.config.num_hidden_layers - start
        self.evaluations += 1
        hidden_all = np.asarray(self.boundaries[start][0:self.inputs.shape[0]])
        for layer in layers:
            hidden_all = layer(hidden_all)
        out = np.empty(self.inputs.shape[0])
        for begin in range(0, self.inputs.shape[0], self.batch_size):
            end = begin + self.batch_size
            hidden = hidden_all[begin:end]
            if self.criterion == "kl":
                other, fn = to_tensor(np.asarray(self.original[-1][begin:end])), self._heads.kl
            else:
                other, fn = to_tensor(self.targets[begin:end], ms.int32), self._heads.nll
            values = head_rows(fn, to_tensor(hidden), other, self._norm, self._head, self._eps)
            out[begin:end] = values.astype(np.float64).mean(axis=1)
        return out

    def aggregate(self, per_window: np.ndarray) -> float:
        """Windows have equal length, so the mean of window means is the token mean (ppl for NLL)."""
        mean = float(np.mean(per_window))
        return mean if self.criterion == "kl" else math.exp(mean)

    def score(self, start: int, layers: Sequence[Callable[[np.ndarray], np.ndarray]]) -> float:
        """Criterion with layers ``start…L−1`` replaced by ``layers`` (the context's prefix reused)."""
        return self.aggregate(self.window_scores(start, layers))

    def local_error(self, layer: int, run: Callable[[np.ndarray], np.ndarray]) -> float:
        """Relative squared error of layer ``layer``'s output against the original layer's, on the
        inputs the layer sees in the search context (one layer pass; one more per layer for the
        reference when the context is not the original model).

        The cheap proxy that shortlists candidates before the full criterion: a layer's choice
        changes only its own output on those inputs, and the rest of the network maps that error
        to the loss the same way for every candidate of the round.
        """
        count = self.inputs.shape[0]
        inputs = np.asarray(self.boundaries[layer][0:count])
        if self.boundaries is self.original:
            reference = np.asarray(self.original[layer + 1][0:count])
        else:
            if self._reference is None or self._reference[0] != layer:
                self._reference = (layer, _original_layer(self, layer)(inputs))
            reference = self._reference[1]
        output = run(inputs)
        error, energy = 0.0, 0.0
        for begin in range(0, count, self.batch_size):
            rows = slice(begin, begin + self.batch_size)
            want = reference[rows].astype(np.float64)
            error += float(np.sum((output[rows] - want) ** 2))
            energy += float(np.sum((want - inputs[rows]) ** 2))
        return error / max(energy, 1e-30)

    def original_score(self) -> float:
        context, self.boundaries = self.boundaries, self.original
        try:
            return self.score(self.config.num_hidden_layers, [])
        finally:
            self.boundaries = context


class _Spilled:
    """One layer boundary [n, T, D] kept in memory, or in an ``.npy`` file read by slices.

    Slices are read with plain file I/O, not a memory map: mapped pages of 31 boundaries would
    count in the process RSS (≈ 0.6 GB for SmolLM2 and 8k search tokens)."""

    def __init__(self, array: Optional[np.ndarray] = None, path: Optional[Path] = None, shape=None, offset: int = 0):
        self.array, self.path, self.shape, self.offset = array, path, shape, offset

    @classmethod
    def save(cls, directory: Optional[Path], index: int, array: np.ndarray):
        array = np.ascontiguousarray(array, np.float32)
        if directory is None:
            return array
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"hidden_{index:04d}.npy"
        with open(path, "wb") as handle:
            np.lib.format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False, "shape": array.shape})
            offset = handle.tell()
            array.tofile(handle)
        return cls(path=path, shape=array.shape, offset=offset)

    def __getitem__(self, rows: slice) -> np.ndarray:
        begin, end, _ = rows.indices(self.shape[0])
        row = int(np.prod(self.shape[1:]))
        with open(self.path, "rb") as handle:
            handle.seek(self.offset + 4 * row * begin)
            return np.fromfile(handle, np.float32, count=row * (end - begin)).reshape((end - begin,) + self.shape[1:])


class SearchLayer:
    """One layer of a hybrid under evaluation: ``layer(hidden)`` → hidden, for [n, T, D] arrays.

    Holds no tensors between calls: ``load()`` returns the layer's weights when it runs (from the
    checkpoint, a spilled candidate file or a small in-memory dict), so an evaluation keeps one
    layer's weights alive at a time whatever the number of decided and candidate layers."""

    def __init__(self, runner: LayerRunner, config: ModelConfig, index: int, load: Callable[[], dict]):
        self.runner, self.config, self.index, self.load = runner, config, index, load

    def __call__(self, hidden: np.ndarray) -> np.ndarray:
        return self.runner.cell(self.config, self.index, self.load())(hidden)


@dataclass
class CandidateFactory:
    """Builds the converted layer l with fold f as a ``SearchLayer``, from the statistics in ``grams``.

    ``grams`` holds per-layer statistics in ``pipeline.save_statistics``'s layout (the original
    model's from ``compute_original_grams``, or a uniform plan's stream from ``UniformStatistics``);
    a layer is converted by ``pipeline.convert_layer``, the function that writes the model, so a
    plan written from the same ``grams`` is the plan scored.  With ``final``/``kl`` the candidate is
    the deployed layer (stage 1 with fold f, then the low rank to ``rank``); with ``stage1`` (or
    ``rank`` None) the stage-1 layer.  A candidate is converted once: its attention weights are
    kept (in ``spill_dir`` if given, else in memory when ``keep``); the MLP and norms, which the
    conversion does not touch, are read from the checkpoint when the layer runs.
    """

    evaluator: HybridEvaluator
    grams: GramCache
    rope_dim: int
    rank: Optional[int]
    lowrank: str = DEFAULT_LOWRANK
    key_weight: float = DEFAULT_KEY_WEIGHT
    rorope: str = DEFAULT_RORO
    nope_rotation: str = PLAN_NOPE_ROTATION
    spill_dir: Optional[Path] = None
    rope_all: bool = False
    rope_stride: Optional[int] = None
    _cache: dict = field(default_factory=dict)  # (layer, fold) → SearchLayer

    def plan(self, folds: Sequence[Optional[int]]) -> ConversionPlan:
        """How the search converts its layers, for the fold plan ``folds``."""
        stage = 2 if self.evaluator.criterion in ("final", "kl") and self.rank is not None else 1
        return ConversionPlan(self.rope_dim, list(folds), self.rank, stage, rope_all=self.rope_all, lowrank=self.lowrank,
                              key_weight=self.key_weight, rorope=self.rorope, nope_rotation=self.nope_rotation,
                              rope_stride=self.rope_stride)

    def __call__(self, layer: int, fold: int, keep: bool = False) -> SearchLayer:
        if (layer, fold) in self._cache:
            return self._cache[(layer, fold)]
        ev = self.evaluator
        original = read_layer_weights(ev.store, ev.config, layer, ev.where)
        converted = convert_layer(ev.config, layer, original, fold, load_statistics(self.grams, layer),
                                  self.plan(self._folds(layer, fold)))
        return self.put(layer, fold, converted.final, keep)

    def put(self, layer: int, fold: int, weights: dict, keep: bool = False) -> SearchLayer:
        """Layer ``layer`` with fold ``fold`` as converted elsewhere (``weights``: local names)."""
        ev = self.evaluator
        layer_config = self.plan(self._folds(layer, fold)).final_config(ev.config)
        attention = {f"self_attn.{k}": np.asarray(v, np.float32) for k, v in split_attention(weights)[0].items()}
        path = None
        if self.spill_dir is not None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            path = self._path(layer, fold)
            np.savez(path, **attention)
            attention = None

        def load() -> dict:
            own = dict(np.load(path)) if path is not None else attention
            return {**_unconverted_weights(ev, layer), **own}

        run = SearchLayer(ev.runner, layer_config, layer, load)
        if keep or path is not None:
            self._cache[(layer, fold)] = run
        return run

    def forget(self, layer: int, fold: int) -> None:
        """Drop the candidate (and its spilled file): a later call converts it again."""
        self._cache.pop((layer, fold), None)
        if self.spill_dir is not None:
            self._path(layer, fold).unlink(missing_ok=True)

    def _folds(self, layer: int, fold: int) -> list[Optional[int]]:
        folds: list[Optional[int]] = [None] * self.evaluator.config.num_hidden_layers
        folds[layer] = fold
        return folds

    def _path(self, layer: int, fold: int) -> Path:
        return self.spill_dir / f"layer{layer:04d}_fold{fold}.npz"


@dataclass
class UniformStatistics:
    """Every uniform plan converted from its own calibration stream, as ``--freqfold F`` writes it.

    ``convert(factory, fold, selected)`` runs ``pipeline.stream_conversion`` for the uniform plan
    (``statistics``: which streams, ``precision``: their projections), hands each converted layer to
    the factory as candidate (layer, fold) and keeps the plan's statistics in ``directory/fold<F>``
    — so the uniform scores are those of the models a uniform conversion writes, and the search
    can build its later candidates from the best plan's statistics."""

    calib: np.ndarray
    statistics: str = DEFAULT_STATISTICS
    precision: str = "fp32"
    batch_size: int = 8
    directory: Optional[Path] = None
    streams: int = 0  # calibration streams run (cost accounting)
    _memory: dict = field(default_factory=dict)  # fold → GramCache when there is no directory

    def convert(self, factory: CandidateFactory, fold: int, selected: set[int]) -> GramCache:
        ev = factory.evaluator
        folds = [fold if i in selected else None for i in range(ev.config.num_hidden_layers)]
        plan = replace(factory.plan(folds), statistics=self.statistics, forward_precision=self.precision)
        self.discard(fold)
        cache = self.cache(fold)
        for index, stats, layer in stream_conversion(ev.config, ev.store, plan, self.calib, self.batch_size, ev.where,
                                                     f"uniform f={fold}"):
            if stats is not None:
                save_statistics(cache, index, stats)
                factory.put(index, fold, layer.final, keep=True)
        self.streams += 1
        return cache

    def cache(self, fold: int) -> GramCache:
        if self.directory is None or fold in self._memory:
            return self._memory.setdefault(fold, GramCache())
        return GramCache(self.directory / f"fold{fold}")

    def adopt(self, fold: int, cache: GramCache) -> None:
        """Take over the statistics of the uniform plan ``fold`` converted elsewhere from the same
        stream (the position-layout choice's): moved into ``directory`` when both are on disk."""
        self.discard(fold)
        if self.directory is not None and cache.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            os.replace(cache.directory, self.directory / f"fold{fold}")
        else:
            self._memory[fold] = cache

    def complete(self, fold: int, selected: set[int]) -> bool:
        cache = self.cache(fold)
        return all(index in cache for index in selected)

    def discard(self, fold: int) -> None:
        self._memory.pop(fold, None)
        if self.directory is not None:
            shutil.rmtree(self.directory / f"fold{fold}", ignore_errors=True)


def _unconverted_weights(evaluator: HybridEvaluator, layer: int) -> dict:
    """The weights of layer ``layer`` that the conversion leaves as they are (MLP, norms)."""
    return split_attention(read_layer_weights(evaluator.store, evaluator.config, layer, evaluator.where))[1]


def _int_keyed(table: dict, value=float) -> dict:
    return {int(k): {int(f): value(v) for f, v in row.items()} for k, row in table.items()}


def _str_keyed(table: dict) -> dict:
    return {str(k): {str(f): v for f, v in row.items()} for k, row in table.items()}


@dataclass
class UniformPlans:
    """Uniform plans scored on the search windows: each plan's criterion and per-window values, and
    the statistics the best plan is written from."""

    scores: dict[int, float]
    windows: dict[int, list]
    statistics: GramCache

    @property
    def best(self) -> int:
        return best_fold(self.scores)


def best_fold(scores: dict[int, float]) -> int:
    """The fold with the lowest criterion (the smaller fold of equals)."""
    return min(scores, key=lambda f: (scores[f], f))


@dataclass
class SearchState:
    """Everything a resumed search needs; saved after each round."""

    fingerprint: dict
    candidates: list[int]
    decided: dict[int, int] = field(default_factory=dict)
    scores: dict[int, dict[int, float]] = field(default_factory=dict)  # layer → fold → criterion
    windows: dict[int, dict[int, list]] = field(default_factory=dict)  # layer → fold → per-window criterion
    proxy: dict[int, dict[int, float]] = field(default_factory=dict)  # layer → fold → local output error
    uniform: dict[int, float] = field(default_factory=dict)  # fold → the uniform plan's criterion (context uniform)
    uniform_windows: dict[int, list] = field(default_factory=dict)  # fold → its per-window criterion
    original: Optional[float] = None
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"fingerprint": self.fingerprint, "candidates": self.candidates, "original": self.original,
                "seconds": self.seconds, "decided": {str(k): v for k, v in self.decided.items()},
                "scores": _str_keyed(self.scores), "windows": _str_keyed(self.windows), "proxy": _str_keyed(self.proxy),
                "uniform": {str(f): v for f, v in self.uniform.items()},
                "uniform_windows": {str(f): v for f, v in self.uniform_windows.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "SearchState":
        return cls(fingerprint=data["fingerprint"], candidates=list(data["candidates"]), original=data.get("original"),
                   seconds=float(data.get("seconds", 0.0)),
                   decided={int(k): int(v) for k, v in data["decided"].items()},
                   scores=_int_keyed(data["scores"]), windows=_int_keyed(data.get("windows", {}), list),
                   proxy=_int_keyed(data.get("proxy", {})),
                   uniform={int(f): float(v) for f, v in data.get("uniform", {}).items()},
                   uniform_windows={int(f): list(v) for f, v in data.get("uniform_windows", {}).items()})

    @classmethod
    def load_or_new(cls, path: Optional[Path], fingerprint: dict, candidates: list[int]) -> "SearchState":
        if path is not None and path.is_file():
            state = cls.from_json(read_json(path, "search state"))
            if state.fingerprint != fingerprint or state.candidates != candidates:
                raise UserError(f"{path}: the saved search is for different inputs (model, data, folds or criterion); "
                                "remove the work directory or pass --restart")
            return state
        return cls(fingerprint=fingerprint, candidates=list(candidates))

    def save(self, path: Optional[Path]) -> None:
        if path is not None:
            write_json_atomic(path, self.to_json())


Evaluation = Union[float, tuple[float, Sequence[float]]]


def greedy_last_to_first(num_layers: int, candidates: Sequence[int],
                         evaluate: Callable[[int, int, dict[int, int]], Evaluation], state: SearchState,
                         on_round: Optional[Callable[[int], None]] = None,
                         proxy: Optional[Callable[[int, int], float]] = None,
                         shortlist: Optional[int] = None, incumbent: Optional[int] = None) -> dict[int, int]:
    """The YouZhi greedy search over any criterion ``evaluate(layer, fold, decided_later_layers)``.

    ``evaluate`` returns the criterion, or (criterion, per-window values) for the bootstrap.  With
    ``proxy`` and ``shortlist`` = k, only the k candidates with the lowest ``proxy(layer, fold)``
    are evaluated by the criterion, plus ``incumbent`` (the fold the layer has in the search
    context) if it is not among them.  Rounds already in ``state.decided`` are skipped (resume);
    ties keep the smaller fold.
    """
    for layer in range(num_layers - 1, -1, -1):
        if layer in state.decided:
            continue
        later = {k: v for k, v in state.decided.items() if k > layer}
        pool = list(candidates)
        if proxy is not None and shortlist and shortlist < len(pool):
            errors = state.proxy.setdefault(layer, {})
            for fold in pool:
                if fold not in errors:
                    errors[fold] = float(proxy(layer, fold))
            pool = sorted(pool, key=lambda f: (errors[f], f))[:shortlist]
            if incumbent is not None and incumbent not in pool:
                pool.append(incumbent)
        scores = state.scores.setdefault(layer, {})
        if len(pool) == 1:  # nothing left to compare: the criterion would only cost time
            state.decided[layer] = pool[0]
            if on_round:
                on_round(layer)
            continue
        for fold in pool:
            if fold not in scores:
                result = evaluate(layer, fold, later)
                if isinstance(result, tuple):
                    result, per_window = result
                    state.windows.setdefault(layer, {})[fold] = [float(v) for v in per_window]
                scores[fold] = float(result)
        state.decided[layer] = min(pool, key=lambda f: (scores[f], f))
        if on_round:
            on_round(layer)
    return {layer: state.decided[layer] for layer in range(num_layers)}


def bootstrap_margin(chosen: Sequence[float], runner_up: Sequence[float], samples: int = 2000,
                     seed: int = 0) -> dict:
    """How robust a round's choice is to the search windows: paired bootstrap over windows.

    Returns the mean per-token criterion gap (runner-up − chosen), its 5–95 % bootstrap interval
    and the share of resamples in which the chosen candidate still wins.
    """
    gap = np.asarray(runner_up, np.float64) - np.asarray(chosen, np.float64)
    picks = np.random.default_rng(seed).integers(0, len(gap), size=(samples, len(gap)))
    means = gap[picks].mean(axis=1)
    return {"gap": float(gap.mean()), "gap_p05": float(np.percentile(means, 5)),
            "gap_p95": float(np.percentile(means, 95)), "p_chosen_wins": float((means > 0).mean())}


@dataclass
class SearchOutcome:
    plan: list[Optional[int]]
    adaptive_score: float  # the criterion of ``plan`` built from ``statistics``: the model written
    uniform_scores: dict[int, float]
    original: float
    rounds: list[dict]
    trajectory: dict  # label → list of (converted layers, score)
    evaluations: int
    full_forward_equivalents: float
    search_forward_equivalents: float
    seconds: float
    statistics: GramCache  # what every layer of ``plan`` is to be converted from (pipeline.convert_streaming)
    fell_back_to_uniform: Optional[int] = None
    context: str = "original"
    baseline: Optional[int] = None  # context "uniform": the best uniform fold the search started from
    calibration_streams: int = 0  # uniform plans converted from their own calibration stream


def _round_report(state: SearchState, layer: int) -> dict:
    scores = state.scores.get(layer, {})
    chosen = state.decided[layer]
    report = {"layer": layer, "chosen": chosen, "scores": {str(f): v for f, v in scores.items()}}
    if layer in state.proxy:
        report["proxy"] = {str(f): v for f, v in state.proxy[layer].items()}
    others = sorted((f for f in scores if f != chosen), key=lambda f: scores[f])
    windows = state.windows.get(layer, {})
    if others and chosen in windows and others[0] in windows:
        report["runner_up"] = others[0]
        report["bootstrap"] = bootstrap_margin(windows[chosen], windows[others[0]])
    return report


class _Search:
    """One adaptive search: the evaluator, the candidates, the saved state and what was decided.

    ``run_adaptive_search`` calls its steps in order; each step reads and writes the fields below.
    """

    def __init__(self, evaluator: HybridEvaluator, factory: CandidateFactory, candidates: list[int],
                 state: SearchState, state_path: Optional[Path], selected: Optional[set[int]],
                 uniform: Optional[UniformStatistics], seed: Optional[UniformPlans] = None):
        self.evaluator, self.factory, self.candidates = evaluator, factory, list(candidates)
        self.state, self.state_path, self.uniform, self.seed = state, state_path, uniform, seed
        self.num_layers = evaluator.config.num_hidden_layers
        self.selected = set(range(self.num_layers)) if selected is None else set(selected)
        self.first = min(self.selected) if self.selected else self.num_layers
        self.order = sorted(self.selected, reverse=True)  # the rounds: last layer first
        self.started, self.prior_seconds = time.perf_counter(), state.seconds
        self.baseline: Optional[int] = None  # context "uniform": the plan every round starts from
        self.decided_layers: dict[int, SearchLayer] = {}
        self.search_equivalents = 0.0
        self.fell_back: Optional[int] = None
        self.uniform_scores: dict[int, float] = {}
        self.trajectory: dict = {}

    # --- small helpers ---------------------------------------------------------------------
    def layer(self, index: int, fold: int, keep: bool = False) -> SearchLayer:
        """Layer ``index`` converted with ``fold``, or the original layer if it is not searched."""
        return self.factory(index, fold, keep) if index in self.selected else _original_layer(self.evaluator, index)

    def uniform_layers(self, fold: int, start: int, keep: bool = False) -> list[SearchLayer]:
        return [self.layer(i, fold, keep) for i in range(start, self.num_layers)]

    def checkpoint(self) -> None:
        self.state.seconds = self.prior_seconds + time.perf_counter() - self.started
        self.state.save(self.state_path)

    # --- step 1 (context "uniform"): score the uniform plans, start from the best ------------
    def start_from_best_uniform(self) -> None:
        self.baseline = self.score_uniform_plans()
        self.evaluator.set_context([self.layer(i, self.baseline, keep=True) for i in range(self.num_layers)])

    def score_uniform_plans(self) -> int:
        """Score the uniform plans outward from the start fold (resumable); the best fold.

        From the start fold (the seed's, else ``folds.seed_fold``), each direction goes on to the next
        smaller / larger candidate while the plan keeps improving: the first plan no better than
        its neighbour ends that direction.  When the criterion is unimodal in the fold (every uniform
        search on record, docs/BENCHMARKS.md) this finds the best fold while skipping the hopeless
        ones, each of which would cost a calibration stream."""
        self._adopt_seed()
        order = sorted(self.candidates)
        start = order.index(self._start_fold())
        self._uniform_score(order[start])
        for step in (-1, 1):
            i = start
            while 0 <= i + step < len(order) and self._uniform_score(order[i + step]) < self.state.uniform[order[i]]:
                i += step
        best = best_fold(self.state.uniform)
        if self.uniform is not None:  # later candidates come from the best plan's statistics
            self._keep_only_statistics_of(best)
        return best

    def _start_fold(self) -> int:
        if self.seed is not None and self.uniform is not None and self.seed.best in self.candidates:
            return self.seed.best
        stride = rope_stride(self.evaluator.config.head_dim, self.factory.rope_dim, self.factory.rope_stride)
        return seed_fold(self.candidates, stride)

    def _adopt_seed(self) -> None:
        """A uniform plan already scored on these windows and converted as this search would (the
        position-layout choice's) is taken over with its statistics instead of being converted again."""
        seed = self.seed  # (without per-plan statistics every plan comes from factory.grams: no seed)
        if seed is None or self.uniform is None or seed.best not in self.candidates or seed.best in self.state.uniform:
            return
        self.state.uniform[seed.best] = seed.scores[seed.best]
        self.state.uniform_windows[seed.best] = [float(v) for v in seed.windows[seed.best]]
        self.uniform.adopt(seed.best, seed.statistics)
        self.checkpoint()

    def _uniform_score(self, fold: int) -> float:
        if fold not in self.state.uniform:
            self._score_uniform_plan(fold)
        return self.state.uniform[fold]

    def _score_uniform_plan(self, fold: int) -> None:
        if self.uniform is not None:
            self.uniform.convert(self.factory, fold, self.selected)
        per_window = self.evaluator.window_scores(self.first, self.uniform_layers(fold, self.first))
        self.state.uniform[fold] = self.evaluator.aggregate(per_window)
        self.state.uniform_windows[fold] = [float(v) for v in per_window]
        self.checkpoint()
        if self.uniform is not None:  # only the best plan's statistics (and layers) are needed later
            self._keep_only_statistics_of(best_fold(self.state.uniform))

    def _keep_only_statistics_of(self, best: int) -> None:
        for fold in self.candidates:
            if fold != best:
                self.uniform.discard(fold)
                for index in self.selected:
                    self.factory.forget(index, fold)
        if not self.uniform.complete(best, self.selected):  # e.g. a resumed run whose work dir lost them
            self.uniform.convert(self.factory, best, self.selected)
        self.factory.grams = self.uniform.cache(best)

    # --- step 2: the greedy rounds, last layer first ----------------------------------------
    def run_rounds(self, shortlist: Optional[int]) -> None:
        self.bar = progress_bar(self.num_layers, "adaptive search", "layer", initial=len(self.state.decided))
        greedy_last_to_first(self.num_layers, self.candidates, self.evaluate, self.state, self.finish_round,
                             self.local_error, shortlist, incumbent=self.baseline)
        self.bar.close()
        self.search_equivalents = self.evaluator.full_forward_equivalents()
        self.trajectory["adaptive"] = self.adaptive_trajectory()

    def evaluate(self, layer: int, fold: int, later: dict[int, int]) -> Evaluation:
        """The criterion with layer ``layer`` at ``fold``, the later layers as decided."""
        if fold == self.baseline:  # the current plan itself: already scored
            return self.incumbent()
        suffix = [self.decided_layer(k, later[k]) for k in range(layer + 1, self.num_layers)]
        per_window = self.evaluator.window_scores(layer, [self.factory(layer, fold)] + suffix)
        return self.evaluator.aggregate(per_window), per_window

    def decided_layer(self, index: int, fold: int) -> SearchLayer:
        if index not in self.decided_layers:
            self.decided_layers[index] = self.layer(index, fold, keep=True)
        return self.decided_layers[index]

    def incumbent(self) -> tuple[float, Sequence[float]]:
        """The current plan's criterion: the last scored round's choice (a round decided without
        scores kept the baseline, so the model did not change), else the best uniform plan."""
        state = self.state
        scored = [k for k in self.selected if state.decided.get(k) in state.scores.get(k, {})]
        if scored:
            k = min(scored)
            return state.scores[k][state.decided[k]], state.windows[k][state.decided[k]]
        return state.uniform[self.baseline], state.uniform_windows[self.baseline]

    def local_error(self, layer: int, fold: int) -> float:
        return self.evaluator.local_error(layer, self.factory(layer, fold))

    def finish_round(self, layer: int) -> None:
        for fold in self.candidates:  # the round's losers are not needed again
            if fold != self.state.decided[layer]:
                self.factory.forget(layer, fold)
        self.checkpoint()
        self.bar.update(1)

    def plan(self) -> list[Optional[int]]:
        return [self.state.decided[i] if i in self.selected else None for i in range(self.num_layers)]

    # --- step 3 (context "original"): the uniform plans, as a guard and for the plot --------
    def compare_with_uniform_plans(self, guard: bool, trajectories: bool) -> None:
        if not (guard or trajectories) or not self.selected:
            return
        plan = self.plan()
        for fold in self.candidates:
            layers = self.uniform_layers(fold, 0, keep=trajectories)
            self.uniform_scores[fold] = self.evaluator.score(self.first, layers[self.first:])
            if trajectories:
                self.trajectory[f"uniform f={fold}"] = [
                    (done, self.uniform_scores[fold] if layer == self.first else self.evaluator.score(layer, layers[layer:]))
                    for done, layer in enumerate(self.order, start=1)]
            for index in self.selected:  # the plan's own layers stay (it may still be re-scored)
                if plan[index] != fold:
                    self.factory.forget(index, fold)
        self.fell_back = None
        if guard:
            best = min(self.uniform_scores, key=lambda f: (self.uniform_scores[f], f))
            if self.uniform_scores[best] < self.adaptive_score():
                self.fell_back = best

    # --- the result -------------------------------------------------------------------------
    def adaptive_trajectory(self) -> list[tuple[int, float]]:
        """(layers decided, criterion of the plan so far) after each round that scored it."""
        state, steps = self.state, []
        if self.baseline is not None:
            steps.append((0, state.uniform[self.baseline]))
        for done, layer in enumerate(self.order, start=1):
            scores = state.scores.get(layer, {})
            if state.decided[layer] in scores:
                steps.append((done, scores[state.decided[layer]]))
            elif self.baseline is not None:  # decided without scores: the plan did not change
                steps.append((done, steps[-1][1]))
        if self.baseline is None and self.order and (not steps or steps[-1][0] != len(self.order)):
            # context "original", the last round decided by the local error alone: score the plan once
            folds = self.plan()
            steps.append((len(self.order), self.evaluator.score(self.first, [self.layer(i, folds[i]) for i in
                                                                             range(self.first, self.num_layers)])))
        return steps

    def adaptive_score(self) -> float:
        steps = self.trajectory["adaptive"]
        return steps[-1][1] if steps else self.state.original

    def outcome(self, context: str) -> SearchOutcome:
        score, plan = self.adaptive_score(), self.plan()
        if self.baseline is not None:
            self.uniform_scores = dict(self.state.uniform)
            self.trajectory[f"uniform f={self.baseline}"] = [(0, self.state.uniform[self.baseline]),
                                                             (len(self.order), self.state.uniform[self.baseline])]
        if self.fell_back is not None:
            score = self.uniform_scores[self.fell_back]
            plan = [self.fell_back if i in self.selected else None for i in range(self.num_layers)]
        return SearchOutcome(plan=plan, adaptive_score=score, uniform_scores=self.uniform_scores,
                             original=self.state.original, rounds=[_round_report(self.state, k) for k in self.order],
                             trajectory=self.trajectory, evaluations=self.evaluator.evaluations,
                             full_forward_equivalents=self.evaluator.full_forward_equivalents(),
                             search_forward_equivalents=self.search_equivalents,
                             seconds=self.prior_seconds + time.perf_counter() - self.started,
                             statistics=self.factory.grams, fell_back_to_uniform=self.fell_back, context=context,
                             baseline=self.baseline, calibration_streams=self.uniform.streams if self.uniform else 0)


def run_adaptive_search(evaluator: HybridEvaluator, factory: CandidateFactory, candidates: list[int],
                        state_path: Optional[Path], fingerprint: dict, uniform_guard: bool = True,
                        trajectories: bool = True, selected: Optional[set[int]] = None,
                        shortlist: Optional[int] = None, context: str = DEFAULT_SEARCH_CONTEXT,
                        uniform: Optional[UniformStatistics] = None, seed: Optional[UniformPlans] = None
                        ) -> SearchOutcome:
    """Greedy search over the ``selected`` layers (default all); other layers stay GQA.

    ``context``: see the module docstring.  With ``uniform`` (context "uniform"), each uniform plan
    is converted from its own calibration stream and the rounds' candidates from the best plan's
    statistics; without it every candidate comes from ``factory.grams``.  The uniform plans are
    scored outward from ``seed`` (a plan scored on these windows, taken over) or ``folds.seed_fold``
    (``_Search.score_uniform_plans``).  Either way the outcome's
    ``statistics`` are those of every layer scored, so ``convert_streaming(…, statistics=…)``
    writes the plan that was scored.  ``shortlist`` = k: each round ranks every candidate by its
    layer-local output error (one layer pass each) and runs the criterion for the best k only (and
    the layer's fold in the context).  ``uniform_guard``/``trajectories`` apply to the "original"
    context (in "uniform" the plan starts from the best uniform one).
    """
    if context not in SEARCH_CONTEXTS:
        raise UserError(f"--search-context {context}: expected one of {', '.join(SEARCH_CONTEXTS)}")
    state = SearchState.load_or_new(state_path, fingerprint, candidates)
    search = _Search(evaluator, factory, candidates, state, state_path, selected,
                     uniform if context == "uniform" else None, seed if context == "uniform" else None)
    for layer in range(search.num_layers):
        if layer not in search.selected:
            state.decided.setdefault(layer, 0)  # 0 marks "kept as GQA" in the state file
    if state.original is None:
        state.original = evaluator.original_score()
        search.checkpoint()
    if context == "uniform" and search.selected:
        search.start_from_best_uniform()
    search.run_rounds(shortlist)
    if context == "original":
        search.compare_with_uniform_plans(uniform_guard, trajectories)
    return search.outcome(context)


def best_uniform(evaluator: HybridEvaluator, factory: CandidateFactory, candidates: list[int],
                 selected: Optional[set[int]] = None, uniform: Optional[UniformStatistics] = None,
                 seed: Optional[UniformPlans] = None) -> UniformPlans:
    """The TransMLA baseline: one fold for every (selected) layer, best on the search windows (the
    plans scored outward from ``seed`` or ``folds.seed_fold``, ``_Search.score_uniform_plans``)."""
    search = _Search(evaluator, factory, candidates, SearchState({}, list(candidates)), None, selected, uniform, seed)
    search.score_uniform_plans()
    return UniformPlans(dict(search.state.uniform), dict(search.state.uniform_windows), factory.grams)


@dataclass(frozen=True)
class PositionLayout:
    """How positions reach the converted layers: the stride of the RoPE slice (``folds.rope_stride``)
    and the rotation of the position-free components (``positions``), both resolved."""

    rope_stride: int
    nope_rotation: str  # "mean" | "none"

    @property
    def label(self) -> str:
        return f"stride {self.rope_stride}, {self.nope_rotation}"


def choose_position_layout(evaluator: HybridEvaluator, layouts: Sequence[PositionLayout],
                           fold_for: Callable[[PositionLayout], int],
                           factory_for: Callable[[PositionLayout], CandidateFactory],
                           statistics_for: Callable[[PositionLayout], UniformStatistics], selected: Optional[set[int]],
                           state_path: Path, fingerprint: dict) -> tuple[dict, Optional[UniformPlans]]:
    """``--rope-stride auto`` / ``--nope-rotation auto``: the layout whose uniform plan (at
    ``fold_for(layout)``) scores best on the evaluator's windows, each plan converted as it would be
    written (``factory_for``, its own calibration stream ``statistics_for``).  A tie keeps the earlier
    layout.  The scores are kept in ``state_path`` (a killed run does not score again).  Returns the
    choice and, when this run converted it, the chosen layout's plan (its score, per-window values
    and statistics: a search in that layout takes it over), else None."""
    state = read_json(state_path, "the position-layout choice") if state_path.is_file() else {}
    scores = state.get("scores", {}) if state.get("fingerprint") == fingerprint else {}
    plans: dict[str, UniformPlans] = {}
    for layout in layouts:
        if layout.label not in scores:
            plans[layout.label] = best_uniform(evaluator, factory_for(layout), [fold_for(layout)], selected,
                                               statistics_for(layout))
            scores[layout.label] = plans[layout.label].scores[fold_for(layout)]
            write_json_atomic(state_path, {"fingerprint": fingerprint, "scores": scores})
    chosen = min(layouts, key=lambda layout: scores[layout.label])  # the first of equals
    return ({"chosen": {"rope_stride": chosen.rope_stride, "nope_rotation": chosen.nope_rotation},
             "candidates": [{"rope_stride": layout.rope_stride, "nope_rotation": layout.nope_rotation,
                             "fold": fold_for(layout), "score": scores[layout.label]} for layout in layouts],
             "criterion": evaluator.criterion,
             "windows": [int(evaluator.inputs.shape[0]), int(evaluator.inputs.shape[1]) + 1]},
            plans.get(chosen.label))


def layer_sensitivity(evaluator: HybridEvaluator, factory: CandidateFactory, candidates: list[int]) -> dict:
    """The paper's Figure 4: each layer alone converted with each fold, all others GQA."""
    config = evaluator.config
    original = evaluator.original_score()
    table: dict[int, dict[int, float]] = {}
    bar = progress_bar(config.num_hidden_layers * len(candidates), "layer sensitivity", "eval")
    for layer in range(config.num_hidden_layers):
        suffix = [_original_layer(evaluator, i) for i in range(layer + 1, config.num_hidden_layers)]
        table[layer] = {}
        for fold in candidates:
            table[layer][fold] = evaluator.score(layer, [factory(layer, fold)] + suffix) - original
            bar.update(1)
    bar.close()
    return {"original": original, "delta": table}


def _original_layer(evaluator: HybridEvaluator, index: int) -> SearchLayer:
    return SearchLayer(evaluator.runner, evaluator.config, index,
                       lambda: read_layer_weights(evaluator.store, evaluator.config, index, evaluator.where))
