"""Layer-adaptive FreqFold (YouZhi): greedy per-layer fold choice, last layer first.

Round for layer l (from L−1 down to 0): layers > l are converted with their chosen folds, every
candidate fold for layer l is tried, and the one with the lowest criterion on the *search* windows
is kept.  What the layers < l are during round l is the search *context*:

* ``original`` (the YouZhi paper): the original GQA layers.
* ``uniform`` (default): the best uniform fold, i.e. the search starts from TransMLA's plan (every
  candidate fold scored uniformly) and each round tries the layer's alternatives with every other
  layer as it will be deployed.  The current plan is always one of the round's candidates, so the
  criterion never rises from round to round and the plan is never worse than the best uniform one
  on the search windows.  Chosen on validation text (docs/BENCHMARKS.md): a fold's cost measured
  with GQA below it does not carry over to the converted model.

Layers < l never change during the search, so the hidden states entering every layer are computed
once (one forward of the context model) and each candidate runs only layers l … L−1 and the head:
about ``|S|·(L+1)/2`` full-forward equivalents instead of ``L·|S|``.  The state (uniform scores,
decided layers, every evaluated candidate) is written atomically after each round; a killed search
resumes where it stopped and ends with the same plan.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
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
from mindyouzhi.models.runner import head_kl, head_nll, head_rows
from mindyouzhi.progress import progress_bar

from .calibration import GramCache, LayerRunner
from .layers import convert_stage1, convert_stage2, full_rank, hybrid_config, split_attention
from .lowrank import DEFAULT_KEY_WEIGHT, DEFAULT_LOWRANK
from .positions import DEFAULT_NOPE_ROTATION
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
                values = head_rows(head_kl, to_tensor(hidden), to_tensor(np.asarray(self.original[-1][begin:end])),
                                   self._norm, self._head, self._eps)
            else:
                values = head_rows(head_nll, to_tensor(hidden), to_tensor(self.targets[begin:end], ms.int32),
                                   self._norm, self._head, self._eps)
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
    """Builds the converted layer l with fold f as a ``SearchLayer`` (for the chosen criterion).

    With ``final``/``kl`` the candidate is what would be deployed: stage 1 with fold f, then the
    stage-2 compression to ``rank`` with ``lowrank`` (in the hybrid, layer l's input is the
    original model's, so its Gram G_A is the stage-2 statistic too).  A candidate is converted
    once: its attention weights are kept (in ``spill_dir`` if given, else in memory when
    ``keep``); the MLP and norms, which the conversion does not touch, are read from the
    checkpoint when the layer runs.
    """

    evaluator: HybridEvaluator
    grams: GramCache
    rope_dim: int
    rank: Optional[int]
    lowrank: str = DEFAULT_LOWRANK
    key_weight: float = DEFAULT_KEY_WEIGHT
    rorope: str = DEFAULT_RORO
    nope_rotation: str = DEFAULT_NOPE_ROTATION
    spill_dir: Optional[Path] = None
    _cache: dict = field(default_factory=dict)  # (layer, fold) → SearchLayer

    def __call__(self, layer: int, fold: int, keep: bool = False) -> SearchLayer:
        key = (layer, fold)
        if key in self._cache:
            return self._cache[key]
        ev = self.evaluator
        config = ev.config
        original = read_layer_weights(ev.store, config, layer, ev.where)
        gram = np.asarray(self.grams[layer])
        profile = self.grams.profile(layer) if self.nope_rotation == "mean" else None
        stage1 = convert_stage1(config, original, gram, fold, self.rope_dim, rorope=self.rorope, profile=profile)
        weights, rank = stage1.weights, stage1.rank
        if ev.criterion in ("final", "kl") and self.rank is not None:
            converted = convert_stage2(stage1, gram, self.rank, self.lowrank, self.key_weight)
            weights, rank = converted.weights, converted.rank
        plan = [None] * config.num_hidden_layers
        ranks = [None] * config.num_hidden_layers
        plan[layer], ranks[layer] = fold, rank
        layer_config = hybrid_config(config, plan, ranks, self.rope_dim)
        converted = {f"self_attn.{k}": np.asarray(v, np.float32) for k, v in split_attention(weights)[0].items()}
        del original, weights
        if self.spill_dir is not None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            path = self.spill_dir / f"layer{layer:04d}_fold{fold}.npz"
            np.savez(path, **converted)
            converted = None
        else:
            path = None

        def load() -> dict:
            own = dict(np.load(path)) if path is not None else converted
            return {**_unconverted_weights(ev, layer), **own}

        run = SearchLayer(ev.runner, layer_config, layer, load)
        if keep or path is not None:
            self._cache[key] = run
        return run

    def forget(self, layer: int, fold: int) -> None:
        """Drop the candidate (and its spilled file): a later call converts it again."""
        self._cache.pop((layer, fold), None)
        if self.spill_dir is not None:
            (self.spill_dir / f"layer{layer:04d}_fold{fold}.npz").unlink(missing_ok=True)


def _unconverted_weights(evaluator: HybridEvaluator, layer: int) -> dict:
    """The weights of layer ``layer`` that the conversion leaves as they are (MLP, norms)."""
    return split_attention(read_layer_weights(evaluator.store, evaluator.config, layer, evaluator.where))[1]


def _int_keyed(table: dict, value=float) -> dict:
    return {int(k): {int(f): value(v) for f, v in row.items()} for k, row in table.items()}


def _str_keyed(table: dict) -> dict:
    return {str(k): {str(f): v for f, v in row.items()} for k, row in table.items()}


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
    plan: list[int]
    adaptive_score: float
    uniform_scores: dict[int, float]
    original: float
    rounds: list[dict]
    trajectory: dict  # label → list of (converted layers, score)
    evaluations: int
    full_forward_equivalents: float
    search_forward_equivalents: float
    seconds: float
    fell_back_to_uniform: Optional[int] = None
    context: str = "original"
    baseline: Optional[int] = None  # context "uniform": the best uniform fold the search started from


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


def run_adaptive_search(evaluator: HybridEvaluator, factory: CandidateFactory, candidates: list[int],
                        state_path: Optional[Path], fingerprint: dict, uniform_guard: bool = True,
                        trajectories: bool = True, selected: Optional[set[int]] = None,
                        shortlist: Optional[int] = None, context: str = DEFAULT_SEARCH_CONTEXT) -> SearchOutcome:
    """Greedy search over the ``selected`` layers (default all); other layers stay GQA.

    ``shortlist`` = k: each round ranks every candidate by its layer-local output error (one layer
    pass each) and runs the full criterion only for the best k (and the layer's fold in the context).
    ``context``: see the module docstring.  With ``uniform``, the uniform plans are scored first and
    ``uniform_guard``/``trajectories`` have nothing left to do (the plan starts from the best one).
    """
    if context not in SEARCH_CONTEXTS:
        raise UserError(f"--search-context {context}: expected one of {', '.join(SEARCH_CONTEXTS)}")
    started = time.perf_counter()
    config = evaluator.config
    num_layers = config.num_hidden_layers
    selected = set(range(num_layers)) if selected is None else set(selected)
    first = min(selected) if selected else num_layers
    state = SearchState.load_or_new(state_path, fingerprint, candidates)
    for layer in range(num_layers):
        if layer not in selected:
            state.decided.setdefault(layer, 0)  # 0 marks "kept as GQA" in the state file
    if state.original is None:
        state.original = evaluator.original_score()
        state.save(state_path)
    prior_seconds = state.seconds
    chosen: dict[int, Callable] = {}

    def layer_fn(k: int, fold: int, keep: bool = False) -> Callable:
        return factory(k, fold, keep) if k in selected else _original_layer(evaluator, k)

    def checkpoint() -> None:
        state.seconds = prior_seconds + time.perf_counter() - started
        state.save(state_path)

    baseline = None
    if context == "uniform" and selected:
        baseline = _score_uniform_plans(evaluator, candidates, selected, state, layer_fn, checkpoint)
        evaluator.set_context([layer_fn(i, baseline, keep=True) for i in range(num_layers)])

    def chosen_suffix(layer: int, later: dict[int, int]) -> list[Callable]:
        return [chosen[k] if k in chosen else chosen.setdefault(k, layer_fn(k, later[k], keep=True))
                for k in range(layer + 1, num_layers)]

    def incumbent() -> tuple[float, Sequence[float]]:
        """The current plan's criterion: the last scored round's choice (a round decided without
        scores kept the baseline, so the model did not change), else the best uniform plan."""
        scored = [k for k in selected if state.decided.get(k) in state.scores.get(k, {})]
        if scored:
            k = min(scored)
            return state.scores[k][state.decided[k]], state.windows[k][state.decided[k]]
        return state.uniform[baseline], state.uniform_windows[baseline]

    def evaluate(layer: int, fold: int, later: dict[int, int]) -> Evaluation:
        if fold == baseline:  # the current plan itself: already scored
            return incumbent()
        per_window = evaluator.window_scores(layer, [factory(layer, fold)] + chosen_suffix(layer, later))
        return evaluator.aggregate(per_window), per_window

    def proxy(layer: int, fold: int) -> float:
        return evaluator.local_error(layer, factory(layer, fold))

    bar = progress_bar(num_layers, "adaptive search", "layer", initial=len(state.decided))

    def on_round(layer: int) -> None:
        for fold in candidates:  # the round's losers are not needed again
            if fold != state.decided[layer]:
                factory.forget(layer, fold)
        checkpoint()
        bar.update(1)

    plan_by_layer = greedy_last_to_first(num_layers, candidates, evaluate, state, on_round, proxy, shortlist,
                                         incumbent=baseline)
    bar.close()
    search_equivalents = evaluator.full_forward_equivalents()
    plan = [plan_by_layer[i] if i in selected else None for i in range(num_layers)]
    order = sorted(selected, reverse=True)
    rounds = [_round_report(state, layer) for layer in order]
    if baseline is not None:
        adaptive_score = incumbent()[0] if order else state.original
        uniform_scores = dict(state.uniform)
        steps = [(0, state.uniform[baseline])]
        for done, layer in enumerate(order, start=1):
            scores = state.scores.get(layer, {})
            steps.append((done, scores[state.decided[layer]] if state.decided[layer] in scores else steps[-1][1]))
        flat = [(0, steps[0][1]), (len(order), steps[0][1])]
        return SearchOutcome(plan=plan, adaptive_score=adaptive_score, uniform_scores=uniform_scores,
                             original=state.original, rounds=rounds,
                             trajectory={"adaptive": steps, f"uniform f={baseline}": flat},
                             evaluations=evaluator.evaluations,
                             full_forward_equivalents=evaluator.full_forward_equivalents(),
                             search_forward_equivalents=search_equivalents,
                             seconds=prior_seconds + time.perf_counter() - started, context=context, baseline=baseline)
    adaptive_traj = [(rank + 1, state.scores[layer][state.decided[layer]]) for rank, layer in enumerate(order)
                     if state.decided[layer] in state.scores.get(layer, {})]
    if order and (not adaptive_traj or adaptive_traj[-1][0] != len(order)):  # last round decided by the proxy alone
        final_layers = [layer_fn(i, plan_by_layer[i]) for i in range(first, num_layers)]
        adaptive_traj.append((len(order), evaluator.score(first, final_layers)))
    adaptive_score = adaptive_traj[-1][1] if adaptive_traj else state.original
    trajectory = {"adaptive": adaptive_traj}
    uniform_scores: dict[int, float] = {}
    if uniform_guard or trajectories:
        for fold in candidates:
            layers = [layer_fn(i, fold, keep=trajectories) for i in range(num_layers)]
            uniform_scores[fold] = evaluator.score(first, layers[first:])
            if trajectories:
                trajectory[f"uniform f={fold}"] = [
                    (rank + 1, uniform_scores[fold] if layer == first else evaluator.score(layer, layers[layer:]))
                    for rank, layer in enumerate(order)]
            for i in selected:  # the adaptive plan's own layers stay (the plan may still be re-scored)
                if plan_by_layer[i] != fold:
                    factory.forget(i, fold)
    fell_back = None
    if uniform_guard and uniform_scores:
        best = min(uniform_scores, key=lambda f: (uniform_scores[f], f))
        if uniform_scores[best] < adaptive_score:
            fell_back, adaptive_score = best, uniform_scores[best]
            plan = [best if i in selected else None for i in range(num_layers)]
    return SearchOutcome(plan=plan, adaptive_score=adaptive_score, uniform_scores=uniform_scores, original=state.original,
                         rounds=rounds, trajectory=trajectory, evaluations=evaluator.evaluations,
                         full_forward_equivalents=evaluator.full_forward_equivalents(),
                         search_forward_equivalents=search_equivalents,
                         seconds=prior_seconds + time.perf_counter() - started, fell_back_to_uniform=fell_back,
                         context=context)


def _score_uniform_plans(evaluator: HybridEvaluator, candidates: Sequence[int], selected: set[int], state: SearchState,
                         layer_fn: Callable, checkpoint: Callable[[], None]) -> int:
    """Score every uniform plan (kept in ``state``; resumable) and return the best fold.  Spilled
    candidates stay on disk for the rounds' local errors; each round deletes its losers."""
    num_layers = evaluator.config.num_hidden_layers
    first = min(selected)
    for fold in candidates:
        if fold not in state.uniform:
            per_window = evaluator.window_scores(first, [layer_fn(i, fold) for i in range(first, num_layers)])
            state.uniform[fold] = evaluator.aggregate(per_window)
            state.uniform_windows[fold] = [float(v) for v in per_window]
            checkpoint()
    return min(state.uniform, key=lambda f: (state.uniform[f], f))


def best_uniform(evaluator: HybridEvaluator, factory: CandidateFactory, candidates: list[int],
                 selected: Optional[set[int]] = None) -> tuple[int, dict[int, float]]:
    """The TransMLA baseline: one fold for every (selected) layer, best on the search windows."""
    num_layers = evaluator.config.num_hidden_layers
    selected = set(range(num_layers)) if selected is None else set(selected)
    first = min(selected)
    scores = {}
    for fold in candidates:
        layers = [factory(i, fold) if i in selected else _original_layer(evaluator, i) for i in range(first, num_layers)]
        scores[fold] = evaluator.score(first, layers)
    return min(scores, key=lambda f: (scores[f], f)), scores


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
