"""Layer-adaptive FreqFold (YouZhi): greedy per-layer fold choice, last layer first.

Round for layer l (from L−1 down to 0): layers < l are the original GQA layers, layers > l are
converted with their chosen folds, every candidate fold for layer l is tried, and the one with the
lowest criterion on the *search* windows is kept.  Layers < l never change during the search, so
the hidden states entering every layer are computed once (one original forward) and each candidate
runs only layers l … L−1 and the head: about ``|S|·(L+1)/2`` full-forward equivalents instead of
``L·|S|``.  The state (decided layers, every evaluated candidate) is written atomically after each
round; a killed search resumes where it stopped and ends with the same plan.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

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
from .layers import convert_stage1, convert_stage2, full_rank, hybrid_config

CRITERIA = ("stage1", "final", "kl")


class HybridEvaluator:
    """Scores hybrid models on fixed search windows, reusing the unchanged original prefix."""

    def __init__(self, config: ModelConfig, store: SafetensorsStore, windows: np.ndarray, criterion: str = "stage1",
                 batch_size: int = 8, spill_dir: Optional[Path] = None, where: str = "checkpoint"):
        if criterion not in CRITERIA:
            raise UserError(f"--criterion {criterion}: expected one of {', '.join(CRITERIA)}")
        self.config, self.store, self.criterion, self.where = config, store, criterion, where
        self.inputs, self.targets = windows[:, :-1], windows[:, 1:]
        self.batch_size = batch_size
        self.runner = LayerRunner(self.inputs.shape[1], batch_size)
        globals_ = read_global_weights(store, config, where)
        self._norm = to_tensor(globals_["model.norm.weight"])
        self._head = to_tensor(globals_.get("lm_head.weight", globals_["model.embed_tokens.weight"]))
        self._eps = float(config.rms_norm_eps)
        self.boundaries = self._original_pass(globals_["model.embed_tokens.weight"], spill_dir)
        self.layer_forwards_at_start = self.runner.layer_forwards
        self.evaluations = 0

    def _original_pass(self, embed: np.ndarray, spill_dir: Optional[Path]) -> list[np.ndarray]:
        """Hidden states entering every layer (and leaving the last) for the original model."""
        shape = self.inputs.shape + (self.config.hidden_size,)
        count = self.config.num_hidden_layers + 1
        if spill_dir is not None:
            spill_dir.mkdir(parents=True, exist_ok=True)
            store = [np.lib.format.open_memmap(spill_dir / f"hidden_{i:04d}.npy", "w+", np.float32, shape) for i in range(count)]
        else:
            store = [np.empty(shape, np.float32) for _ in range(count)]
        store[0][...] = embed[self.inputs]
        bar = progress_bar(self.config.num_hidden_layers, "search prefix", "layer")
        for index in range(self.config.num_hidden_layers):
            weights = read_layer_weights(self.store, self.config, index, self.where)
            store[index + 1][...] = self.runner.run(self.config, index, weights, np.asarray(store[index]))
            bar.update(1)
        bar.close()
        return store

    def full_forward_equivalents(self) -> float:
        return self.runner.layer_forwards / (self.inputs.shape[0] * self.config.num_hidden_layers)

    def score(self, start: int, layers: Sequence[Callable[[np.ndarray], np.ndarray]]) -> float:
        """Criterion with layers ``start…L−1`` replaced by ``layers`` (original prefix reused)."""
        assert len(layers) == self.config.num_hidden_layers - start
        self.evaluations += 1
        total, count = 0.0, 0
        for begin in range(0, self.inputs.shape[0], self.batch_size):
            end = begin + self.batch_size
            hidden = np.asarray(self.boundaries[start][begin:end])
            for layer in layers:
                hidden = layer(hidden)
            if self.criterion == "kl":
                values = head_rows(head_kl, to_tensor(hidden), to_tensor(np.asarray(self.boundaries[-1][begin:end])),
                                   self._norm, self._head, self._eps)
            else:
                values = head_rows(head_nll, to_tensor(hidden), to_tensor(self.targets[begin:end], ms.int32),
                                   self._norm, self._head, self._eps)
            values = values.astype(np.float64)
            total += float(values.sum())
            count += values.size
        mean = total / count
        return mean if self.criterion == "kl" else math.exp(mean)

    def original_score(self) -> float:
        return self.score(self.config.num_hidden_layers, [])


@dataclass
class CandidateFactory:
    """Builds the converted layer l with fold f as a runnable closure (for the chosen criterion)."""

    evaluator: HybridEvaluator
    grams: GramCache
    rope_dim: int
    rank: Optional[int]
    _cache: dict = field(default_factory=dict)

    def __call__(self, layer: int, fold: int, keep: bool = False) -> Callable[[np.ndarray], np.ndarray]:
        key = (layer, fold)
        if key in self._cache:
            return self._cache[key]
        ev = self.evaluator
        config = ev.config
        original = read_layer_weights(ev.store, config, layer, ev.where)
        gram = np.asarray(self.grams[layer])
        stage1 = convert_stage1(config, original, gram, fold, self.rope_dim)
        weights, rank = stage1.weights, stage1.rank
        if ev.criterion in ("final", "kl") and self.rank is not None:
            # In the hybrid, layer l's input is the original model's, so G_A is its stage-2 statistic too.
            converted = convert_stage2(stage1, gram, self.rank)
            weights, rank = converted.weights, converted.rank
        plan = [None] * config.num_hidden_layers
        ranks = [None] * config.num_hidden_layers
        plan[layer], ranks[layer] = fold, rank
        layer_config = hybrid_config(config, plan, ranks, self.rope_dim)
        run = ev.runner.cell(layer_config, layer, weights)
        if keep:
            self._cache[key] = run
        return run

    def forget(self, layer: int, fold: int) -> None:
        self._cache.pop((layer, fold), None)


@dataclass
class SearchState:
    """Everything a resumed search needs; saved after each round."""

    fingerprint: dict
    candidates: list[int]
    decided: dict[int, int] = field(default_factory=dict)
    scores: dict[int, dict[int, float]] = field(default_factory=dict)
    original: Optional[float] = None
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"fingerprint": self.fingerprint, "candidates": self.candidates, "original": self.original,
                "seconds": self.seconds,
                "decided": {str(k): v for k, v in self.decided.items()},
                "scores": {str(k): {str(f): s for f, s in v.items()} for k, v in self.scores.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "SearchState":
        return cls(fingerprint=data["fingerprint"], candidates=list(data["candidates"]), original=data.get("original"),
                   seconds=float(data.get("seconds", 0.0)),
                   decided={int(k): int(v) for k, v in data["decided"].items()},
                   scores={int(k): {int(f): float(s) for f, s in v.items()} for k, v in data["scores"].items()})

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


def greedy_last_to_first(num_layers: int, candidates: Sequence[int],
                         evaluate: Callable[[int, int, dict[int, int]], float], state: SearchState,
                         on_round: Optional[Callable[[int], None]] = None) -> dict[int, int]:
    """The YouZhi greedy search over any criterion ``evaluate(layer, fold, decided_later_layers)``.

    Rounds already in ``state.decided`` are skipped (resume); ties keep the smaller fold.
    """
    for layer in range(num_layers - 1, -1, -1):
        if layer in state.decided:
            continue
        later = {k: v for k, v in state.decided.items() if k > layer}
        scores = state.scores.setdefault(layer, {})
        for fold in candidates:
            if fold not in scores:
                scores[fold] = float(evaluate(layer, fold, later))
        state.decided[layer] = min(candidates, key=lambda f: (scores[f], f))
        if on_round:
            on_round(layer)
    return {layer: state.decided[layer] for layer in range(num_layers)}


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


def run_adaptive_search(evaluator: HybridEvaluator, factory: CandidateFactory, candidates: list[int],
                        state_path: Optional[Path], fingerprint: dict, uniform_guard: bool = True,
                        trajectories: bool = True, selected: Optional[set[int]] = None) -> SearchOutcome:
    """Greedy search over the ``selected`` layers (default all); other layers stay GQA."""
    started = time.perf_counter()
    config = evaluator.config
    num_layers = config.num_hidden_layers
    selected = set(range(num_layers)) if selected is None else set(selected)
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

    def chosen_suffix(layer: int, later: dict[int, int]) -> list[Callable]:
        return [chosen[k] if k in chosen else chosen.setdefault(k, layer_fn(k, later[k], keep=True))
                for k in range(layer + 1, num_layers)]

    def evaluate(layer: int, fold: int, later: dict[int, int]) -> float:
        return evaluator.score(layer, [factory(layer, fold)] + chosen_suffix(layer, later))

    bar = progress_bar(num_layers, "adaptive search", "layer", initial=len(state.decided))

    def on_round(layer: int) -> None:
        state.seconds = prior_seconds + time.perf_counter() - started
        state.save(state_path)
        bar.update(1)

    plan_by_layer = greedy_last_to_first(num_layers, candidates, evaluate, state, on_round)
    bar.close()
    search_equivalents = evaluator.full_forward_equivalents()
    plan = [plan_by_layer[i] if i in selected else None for i in range(num_layers)]
    order = sorted(selected, reverse=True)
    rounds = [{"layer": layer, "scores": {str(f): state.scores[layer][f] for f in candidates}, "chosen": state.decided[layer]}
              for layer in order]
    adaptive_traj = [(rank + 1, state.scores[layer][state.decided[layer]]) for rank, layer in enumerate(order)]
    adaptive_score = adaptive_traj[-1][1] if adaptive_traj else state.original
    trajectory = {"adaptive": adaptive_traj}
    uniform_scores: dict[int, float] = {}
    first = min(selected) if selected else num_layers
    if uniform_guard or trajectories:
        for fold in candidates:
            layers = [layer_fn(i, fold, keep=trajectories) for i in range(num_layers)]
            uniform_scores[fold] = evaluator.score(first, layers[first:])
            if trajectories:
                trajectory[f"uniform f={fold}"] = [
                    (rank + 1, uniform_scores[fold] if layer == first else evaluator.score(layer, layers[layer:]))
                    for rank, layer in enumerate(order)]
                for i in range(num_layers):
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
                         seconds=prior_seconds + time.perf_counter() - started, fell_back_to_uniform=fell_back)


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


def _original_layer(evaluator: HybridEvaluator, index: int) -> Callable[[np.ndarray], np.ndarray]:
    cache = evaluator.__dict__.setdefault("_original_cells", {})
    if index not in cache:
        weights = read_layer_weights(evaluator.store, evaluator.config, index, evaluator.where)
        cache[index] = evaluator.runner.cell(evaluator.config, index, weights)
    return cache[index]
