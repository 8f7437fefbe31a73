"""``data compress``: stratified, hierarchical compression of a sample pool to a budget.

Two passes over the input, never holding its text:

1. **Scan** (streaming): per sample keep only compact metadata — byte offset, cost (1 or tokens),
   quality, complexity, primary category, standalone zlib size — in typed arrays.
2. **Select** in priority order:

   a. *coverage* — one seat per category (its best sample, preferring quality ≥ threshold);
   b. *quality* — samples with quality ≥ ``min_quality`` share the budget before any other;
   c. *categories* — the budget is water-filled across categories (equal shares, capped by what a
      category holds, or proportional shares), so small categories are kept whole;
   d. *difficulty* — each category's share is water-filled across easy/medium/hard;
   e. *information* — inside each cluster (category × difficulty) a lazy, batched greedy picks
      the samples that add the most zlib-compressed bytes to what the cluster already selected
      (the entropy-law / ZIP idea: redundant samples compress away, informative ones do not).
      A zlib compressor holding the selection is *copied* to score a candidate, so one score costs
      O(candidate length), not O(selection); zlib's 32 KiB window bounds the context it sees.

   Samples below the threshold then fill what the budget has left with the same b–e steps, and a
   last pass spends any remainder that the token granularity left over.
3. **Write**: the selected lines are re-read by offset in file order and written atomically.

Everything is a deterministic function of the input and ``--seed`` (used for tie-breaking).
"""
from __future__ import annotations

import heapq
import math
import random
import re
import zlib
from array import array
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..errors import UserError
from .jsonl import BadLines, JsonlWriter, parse_line, progress, read_jsonl
from .llm_client import LLMError, map_ordered
from .samples import SampleText, estimate_tokens, sample_text
from .tagging import DIFFICULTIES, HeuristicTagger, Tags, carried_tags, difficulty

ZLIB_LEVEL = 6


# --------------------------------------------------------------------------------------------
# Budget
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    value: float
    unit: str  # "samples" or "tokens"
    fraction: bool  # value is a share of the pool (from "10%")

    def resolve(self, pool_total: int) -> int:
        return int(math.floor(self.value * pool_total + 1e-9)) if self.fraction else int(self.value)

    def describe(self) -> str:
        return f"{self.value * 100:g}% of the pool's {self.unit}" if self.fraction else f"{int(self.value)} {self.unit}"


def parse_budget(text: str, unit: str) -> Budget:
    """'5000' → 5000 units; '10%' → a tenth of the pool (in samples or tokens)."""
    raw = str(text).strip()
    if unit not in ("samples", "tokens"):
        raise UserError(f"--budget-unit {unit!r}: expected samples or tokens")
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", raw)
    if match:
        share = float(match.group(1)) / 100
        if not 0 < share <= 1:
            raise UserError(f"--budget {raw}: a percentage must be in (0, 100]")
        return Budget(share, unit, True)
    if not re.fullmatch(r"\d+", raw) or int(raw) <= 0:
        raise UserError(f"--budget {raw!r}: expected a positive integer or a percentage such as 10%")
    return Budget(int(raw), unit, False)


# --------------------------------------------------------------------------------------------
# Pool metadata (compact: ~30 bytes per sample)
# --------------------------------------------------------------------------------------------
@dataclass
class Pool:
    """Per-sample metadata in typed arrays (well under 100 bytes a sample); never the text."""

    offsets: array = field(default_factory=lambda: array("q"))
    costs: array = field(default_factory=lambda: array("q"))
    quality: array = field(default_factory=lambda: array("b"))
    complexity: array = field(default_factory=lambda: array("b"))
    category: array = field(default_factory=lambda: array("l"))  # primary category id
    zlen: array = field(default_factory=lambda: array("l"))
    produced: array = field(default_factory=lambda: array("l"))  # id of the tagger's category list, -1 if carried
    category_names: list = field(default_factory=list)
    category_ids: dict = field(default_factory=dict)
    category_lists: list = field(default_factory=list)  # distinct tagger category lists, shared by many samples
    category_list_ids: dict = field(default_factory=dict)
    tagged_by_tagger: int = 0

    def __len__(self) -> int:
        return len(self.offsets)

    def add(self, offset: int, cost: int, tags: Tags, zlen: int, produced: bool) -> None:
        primary = self.category_ids.setdefault(tags.primary, len(self.category_names))
        if primary == len(self.category_names):
            self.category_names.append(tags.primary)
        self.offsets.append(offset)
        self.costs.append(cost)
        self.quality.append(tags.quality)
        self.complexity.append(tags.complexity)
        self.category.append(primary)
        self.zlen.append(zlen)
        if produced:
            list_id = self.category_list_ids.setdefault(tags.categories, len(self.category_lists))
            if list_id == len(self.category_lists):
                self.category_lists.append(tags.categories)
            self.produced.append(list_id)
            self.tagged_by_tagger += 1
        else:
            self.produced.append(-1)

    def produced_tags(self, index: int) -> Optional[Tags]:
        """The tags our tagger made for a sample (None when the sample carried its own)."""
        list_id = self.produced[index]
        if list_id < 0:
            return None
        return Tags(self.category_lists[list_id], self.quality[index], self.complexity[index])

    def cluster_of(self, index: int) -> tuple[str, str]:
        return self.category_names[self.category[index]], difficulty(self.complexity[index])


class TextStore:
    """Re-reads sample text by byte offset; the pool never holds the texts themselves."""

    def __init__(self, path: Path, pool: Pool):
        self.pool = pool
        self._handle = open(path, "rb")
        self._cache: dict[int, bytes] = {}

    def text(self, index: int) -> bytes:
        cached = self._cache.get(index)
        if cached is None:
            self._handle.seek(self.pool.offsets[index])
            cached = sample_text(parse_line(self._handle.readline())).full.encode("utf-8")
            if len(self._cache) >= 8192:  # candidates of the current round are what gets re-read
                self._cache.clear()
            self._cache[index] = cached
        return cached

    def close(self) -> None:
        self._handle.close()


# --------------------------------------------------------------------------------------------
# Scan
# --------------------------------------------------------------------------------------------
def token_counter(tokenizer_path: Optional[str]) -> Callable[[str], int]:
    if not tokenizer_path:
        return estimate_tokens
    from tokenizers import Tokenizer

    path = Path(tokenizer_path)
    if not path.is_file():
        raise UserError(f"--tokenizer {path}: file not found (expected a Hugging Face tokenizer.json)")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises plain Exception on bad files
        raise UserError(f"--tokenizer {path}: not a tokenizer.json ({exc})") from None
    return lambda text: max(1, len(tokenizer.encode(text, add_special_tokens=False).ids))


def _validate_sample(data: dict) -> tuple[SampleText, Optional[Tags]]:
    return sample_text(data), carried_tags(data)


def scan_pool(path: Path, tagger, unit: str, count_tokens: Callable[[str], int], bad_lines: BadLines,
              skip_bad: bool, show_progress: bool, workers: int = 1) -> Pool:
    pool = Pool()
    records = read_jsonl(path, bad_lines, skip_bad, _validate_sample, show_progress, desc="scan")

    def measure(record):
        text, tags = record.parsed
        produced = tags is None
        if produced:
            try:
                tags = tagger.tag(text)
            except LLMError as exc:
                raise UserError(f"{path}:{record.line_no}: tagging failed: {exc}") from None
        full = text.full
        cost = 1 if unit == "samples" else count_tokens(full)
        return record.offset, cost, tags, len(zlib.compress(full.encode("utf-8"), ZLIB_LEVEL)), produced

    for offset, cost, tags, zlen, produced in map_ordered(measure, records, workers):
        pool.add(offset, cost, tags, zlen, produced)
    return pool


# --------------------------------------------------------------------------------------------
# Allocation
# --------------------------------------------------------------------------------------------
def waterfill(capacities: list[int], budget: int, weights: list[float], tie_order: list[int],
              floors: Optional[list[int]] = None) -> list[int]:
    """Integer shares q_i = clamp(λ·w_i, floor_i, cap_i) summing to ``budget`` (within the bounds).

    Small strata are kept whole and the rest split the remainder — stratified with protection for
    rare strata instead of proportional sampling that would starve them.  ``floors`` are what a
    stratum already holds from an earlier stage, so balance is computed over the whole selection.
    Rounding leftovers go to the largest fractional parts, ties broken by ``tie_order`` (seeded).
    """
    floors = floors or [0] * len(capacities)
    capacities = [max(cap, low) for cap, low in zip(capacities, floors)]
    if budget >= sum(capacities):
        return list(capacities)
    if budget <= sum(floors):
        return list(floors)

    def total(level: float) -> float:
        return sum(min(cap, max(low, level * w)) for cap, low, w in zip(capacities, floors, weights))

    low_level, high_level = 0.0, max(cap / w for cap, w in zip(capacities, weights))
    for _ in range(100):  # bisection: total() is monotone in the level
        middle = (low_level + high_level) / 2
        low_level, high_level = (middle, high_level) if total(middle) < budget else (low_level, middle)
    exact = [min(cap, max(low, high_level * w)) for cap, low, w in zip(capacities, floors, weights)]
    shares = [max(low, min(cap, int(math.floor(value + 1e-9)))) for value, cap, low in zip(exact, capacities, floors)]
    leftover = budget - sum(shares)
    by_fraction = sorted(range(len(capacities)), key=lambda i: (-(exact[i] - shares[i]), tie_order[i]))
    while leftover > 0:
        progressed = False
        for i in by_fraction:
            if leftover == 0:
                break
            if shares[i] < capacities[i]:
                shares[i] += 1
                leftover -= 1
                progressed = True
        if not progressed:
            break
    while leftover < 0:  # float slack can overshoot by a unit: take it back from the largest share
        i = max((i for i in range(len(shares)) if shares[i] > floors[i]), key=lambda i: (shares[i] - exact[i], i))
        shares[i] -= 1
        leftover += 1
    return shares


# --------------------------------------------------------------------------------------------
# Information-gain greedy inside a cluster
# --------------------------------------------------------------------------------------------
class ClusterSelector:
    """Lazy greedy on zlib gain with batched re-scoring.

    Gains only shrink as the selection grows (more context, more matches), so a stale gain is an
    upper bound: each round re-scores the ``pool_size`` candidates with the best bounds and accepts
    up to ``batch_size`` of them, each re-checked against the selection as it grows within the round.
    """

    def __init__(self, pool: Pool, texts: TextStore, ranks: array, batch_size: int = 32, pool_factor: int = 4):
        self.pool = pool
        self.texts = texts
        self.ranks = ranks
        self.batch_size = max(1, batch_size)
        self.pool_size = self.batch_size * max(1, pool_factor)
        self.scored = 0  # number of zlib gain evaluations, for the report

    def _gain(self, compressor, index: int, base: int) -> int:
        self.scored += 1
        probe = compressor.copy()
        return len(probe.compress(self.texts.text(index))) + len(probe.flush()) - base

    def select(self, candidates: list[int], quota: int, context: list[int]) -> list[int]:
        costs = self.pool.costs
        compressor = zlib.compressobj(ZLIB_LEVEL)
        for index in context:
            compressor.compress(self.texts.text(index))
        heap = [(-self.pool.zlen[i] / costs[i], self.ranks[i], i) for i in candidates]
        heapq.heapify(heap)
        chosen, spent = [], 0
        while heap and spent < quota:
            room = quota - spent
            batch = []
            while heap and len(batch) < self.pool_size:
                _, _, index = heapq.heappop(heap)
                if costs[index] <= room:  # room only shrinks: a sample that does not fit now never will
                    batch.append(index)
            if not batch:
                break
            base = len(compressor.copy().flush())
            fresh = sorted(((self._gain(compressor, i, base) / costs[i], self.ranks[i], i) for i in batch),
                           key=lambda item: (-item[0], item[1]))
            accepted = 0
            for position, (density, rank, index) in enumerate(fresh):
                if accepted >= self.batch_size or costs[index] > quota - spent:
                    if costs[index] <= quota - spent:
                        heapq.heappush(heap, (-density, rank, index))
                    continue
                if accepted:
                    # The selection grew in this round: re-score, and defer if it fell below the next one.
                    density = self._gain(compressor, index, len(compressor.copy().flush())) / costs[index]
                    next_density = fresh[position + 1][0] if position + 1 < len(fresh) else -math.inf
                    if density < next_density:
                        heapq.heappush(heap, (-density, rank, index))
                        continue
                compressor.compress(self.texts.text(index))
                chosen.append(index)
                spent += costs[index]
                accepted += 1
        return chosen


# --------------------------------------------------------------------------------------------
# The whole selection
# --------------------------------------------------------------------------------------------
@dataclass
class CompressSettings:
    budget: Budget
    min_quality: int = 4
    allocation: str = "balanced"  # or "proportional"
    batch_size: int = 32
    seed: int = 0


class Compressor:
    def __init__(self, pool: Pool, texts: TextStore, settings: CompressSettings, show_progress: bool = False):
        self.pool = pool
        self.texts = texts
        self.settings = settings
        self.show_progress = show_progress
        ranks = array("l", range(len(pool)))
        random.Random(settings.seed).shuffle(ranks)
        self.ranks = ranks
        self.selector = ClusterSelector(pool, texts, ranks, settings.batch_size)
        self.selected = bytearray(len(pool))
        self.stage_of: dict[int, str] = {}
        self.spent = 0

    def _take(self, index: int, stage: str) -> None:
        self.selected[index] = 1
        self.stage_of[index] = stage
        self.spent += self.pool.costs[index]

    def run(self) -> int:
        pool, settings = self.pool, self.settings
        budget = settings.budget.resolve(sum(pool.costs))
        if budget <= 0:
            raise UserError(f"--budget {settings.budget.describe()} is 0 for this pool; raise it")
        high = [i for i in range(len(pool)) if pool.quality[i] >= settings.min_quality]
        low = [i for i in range(len(pool)) if pool.quality[i] < settings.min_quality]
        with progress(3, "select", self.show_progress) as bar:
            self._coverage_seats(budget)
            bar.update(1)
            self._allocate([i for i in high if not self.selected[i]], budget - self.spent, "quality")
            bar.update(1)
            self._allocate([i for i in low if not self.selected[i]], budget - self.spent, "below_threshold")
            self._fill(budget)
            bar.update(1)
        return budget

    def _coverage_seats(self, budget: int) -> None:
        pool = self.pool
        best: dict[int, int] = {}
        for i in range(len(pool)):
            category = pool.category[i]
            current = best.get(category)
            if current is None or self._seat_key(i) > self._seat_key(current):
                best[category] = i
        sizes = Counter(pool.category)
        for category in sorted(best, key=lambda c: (-sizes[c], pool.category_names[c])):
            index = best[category]
            if self.spent + pool.costs[index] <= budget:
                self._take(index, "coverage")

    def _seat_key(self, index: int):
        pool = self.pool
        return (pool.quality[index] >= self.settings.min_quality, pool.zlen[index] / pool.costs[index],
                pool.quality[index], -self.ranks[index])

    def _allocate(self, candidates: list[int], budget: int, stage: str) -> None:
        """Water-fill ``budget`` over categories, then difficulties, then run the greedy per cluster.

        What a category or cluster already holds (coverage seats, an earlier quality tier) counts
        toward its share, so the final selection — not each stage alone — is balanced.
        """
        if budget <= 0 or not candidates:
            return
        pool = self.pool
        clusters: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        for i in candidates:
            clusters[pool.category[i]][difficulty(pool.complexity[i])].append(i)
        held: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        for i in sorted(self.stage_of, key=lambda i: pool.offsets[i]):
            if pool.category[i] in clusters:
                held[pool.category[i]][difficulty(pool.complexity[i])].append(i)

        def cost(members) -> int:
            return sum(pool.costs[i] for i in members)

        categories = sorted(clusters, key=lambda c: pool.category_names[c])
        held_costs = [sum(cost(m) for m in held[c].values()) for c in categories]
        capacities = [sum(cost(m) for m in clusters[c].values()) + h for c, h in zip(categories, held_costs)]
        weights = [1.0] * len(categories) if self.settings.allocation == "balanced" else [float(c) for c in capacities]
        tie = [self.ranks[min(i for members in clusters[c].values() for i in members)] for c in categories]
        shares = waterfill(capacities, budget + sum(held_costs), weights, tie, held_costs)
        for category, share in zip(categories, shares):
            levels = [level for level in DIFFICULTIES if clusters[category].get(level) or held[category].get(level)]
            level_held = [cost(held[category].get(level, ())) for level in levels]
            level_caps = [cost(clusters[category].get(level, ())) + h for level, h in zip(levels, level_held)]
            level_shares = waterfill(level_caps, share, [1.0] * len(levels), list(range(len(levels))), level_held)
            for level, level_share, already in zip(levels, level_shares, level_held):
                quota = level_share - already
                members = clusters[category].get(level)
                if quota <= 0 or not members:
                    continue
                for index in self.selector.select(members, quota, held[category].get(level, [])):
                    self._take(index, stage)

    def _fill(self, budget: int) -> None:
        """Spend what rounding and token granularity left: best quality tier, then densest."""
        pool = self.pool
        remaining = budget - self.spent
        if remaining <= 0:
            return
        order = sorted((i for i in range(len(pool)) if not self.selected[i]),
                       key=lambda i: (pool.quality[i] < self.settings.min_quality, -pool.zlen[i] / pool.costs[i], self.ranks[i]))
        for index in order:
            if pool.costs[index] <= remaining:
                self._take(index, "fill")
                remaining -= pool.costs[index]
                if remaining == 0:
                    break


# --------------------------------------------------------------------------------------------
# Report and output
# --------------------------------------------------------------------------------------------
def build_report(pool: Pool, compressor: Compressor, budget: int, settings: CompressSettings) -> dict:
    clusters: dict[tuple[str, str], dict] = {}
    for i in range(len(pool)):
        key = pool.cluster_of(i)
        entry = clusters.setdefault(key, {"category": key[0], "difficulty": key[1], "pool": 0, "kept": 0,
                                          "dropped": 0, "pool_cost": 0, "kept_cost": 0})
        entry["pool"] += 1
        entry["pool_cost"] += pool.costs[i]
        if compressor.selected[i]:
            entry["kept"] += 1
            entry["kept_cost"] += pool.costs[i]
        else:
            entry["dropped"] += 1
    per_category: dict[str, Counter] = defaultdict(Counter)
    per_difficulty: dict[str, Counter] = defaultdict(Counter)
    for entry in clusters.values():
        for target, key in ((per_category, entry["category"]), (per_difficulty, entry["difficulty"])):
            target[key]["pool"] += entry["pool"]
            target[key]["kept"] += entry["kept"]
            target[key]["dropped"] += entry["dropped"]
    kept = [i for i in range(len(pool)) if compressor.selected[i]]
    return {
        "pool": len(pool),
        "kept": len(kept),
        "dropped": len(pool) - len(kept),
        "budget": {"unit": settings.budget.unit, "requested": settings.budget.describe(), "resolved": budget,
                   "spent": compressor.spent, "pool_total": sum(pool.costs)},
        "min_quality": settings.min_quality,
        "allocation": settings.allocation,
        "seed": settings.seed,
        "tags": {"carried": len(pool) - pool.tagged_by_tagger, "tagged": pool.tagged_by_tagger},
        "categories_in_pool": len(per_category),
        "categories_kept": sum(1 for counts in per_category.values() if counts["kept"]),
        "per_stage": dict(Counter(compressor.stage_of.values())),
        "quality_kept": dict(sorted(Counter(pool.quality[i] for i in kept).items())),
        "quality_pool": dict(sorted(Counter(pool.quality).items())),
        "per_category": {name: dict(counts) for name, counts in sorted(per_category.items())},
        "per_difficulty": {name: dict(counts) for name, counts in sorted(per_difficulty.items())},
        "clusters": sorted(clusters.values(), key=lambda e: (e["category"], DIFFICULTIES.index(e["difficulty"]))),
        "zlib_gain_evaluations": compressor.selector.scored,
    }


def write_selection(path: Path, pool: Pool, compressor: Compressor, writer: JsonlWriter, tagger_name: str,
                    show_progress: bool) -> None:
    """Kept lines in input order; lines we tagged get their tags, the others are copied byte for byte."""
    kept = [i for i in range(len(pool)) if compressor.selected[i]]
    with open(path, "rb") as handle, progress(len(kept), "write", show_progress) as bar:
        for index in kept:
            handle.seek(pool.offsets[index])
            raw = handle.readline()
            tags = pool.produced_tags(index)
            if tags is None:
                writer.write_raw_line(raw.decode("utf-8").rstrip("\r\n"))
            else:
                data = parse_line(raw)
                data["tags"] = tags.to_json(tagger_name)
                writer.write(data)
            bar.update(1)


def compress_file(input_path: str, out_path: str, settings: CompressSettings, tagger=None, unit_counter=None,
                  skip_bad: bool = False, overwrite: bool = False, show_progress: bool = False,
                  workers: int = 1) -> dict:
    path = Path(input_path)
    tagger = tagger or HeuristicTagger()
    writer = JsonlWriter(out_path, overwrite)  # refuse an existing output before the long scan
    bad_lines = BadLines()
    pool = scan_pool(path, tagger, settings.budget.unit, unit_counter or estimate_tokens, bad_lines, skip_bad,
                     show_progress, workers)
    if not len(pool):
        raise UserError(f"{path}: no samples to compress")
    texts = TextStore(path, pool)
    try:
        compressor = Compressor(pool, texts, settings, show_progress)
        budget = compressor.run()
    finally:
        texts.close()
    with writer:
        write_selection(path, pool, compressor, writer, tagger.name, show_progress)
    report = build_report(pool, compressor, budget, settings)
    report.update({"input": str(path), "output": str(writer.path), "tagger": tagger.name,
                   "skipped_lines": bad_lines.summary()})
    return report
