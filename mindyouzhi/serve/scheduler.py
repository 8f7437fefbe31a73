"""Continuous batching over the paged pool: who runs this step, who waits, who is preempted.

Every step the scheduler first secures one more cache slot for each running sequence (the token
it is about to decode), oldest first.  When the pool has no free block it preempts the *youngest*
running sequence: its blocks go back to the free list and it returns to the waiting queue, to be
recomputed (prefilled over prompt + tokens generated so far) when blocks free up.  Old sequences
thus always make progress, a preempted one loses only compute, and nothing another sequence
owns is ever touched.  Then waiting sequences are admitted in arrival order while blocks allow.

Two admission policies:

* ``on-demand`` (default): admit when the prompt fits (plus a small watermark); blocks for new
  tokens are taken as they are needed — highest concurrency, preemption under pressure;
* ``reserve``: admit only when the request's whole lifetime (prompt + max_new_tokens) fits next to
  what running sequences have reserved — never preempts; ``capacity --measure`` uses it so the
  concurrency it reports is held to the last token.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from mindyouzhi.errors import UserError

from .kv_pool import BlockAllocator
from .sampling import SamplingParams

ADMISSION_POLICIES = ("on-demand", "reserve")
_arrivals = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One request's state.  ``tokens`` = prompt + generated; the pool holds ``num_cached`` of them."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    on_event: Optional[Callable] = None
    arrival: int = field(default_factory=lambda: next(_arrivals))
    output_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_cached: int = 0
    finish_reason: Optional[str] = None
    preemptions: int = 0
    rng: np.random.Generator = None
    max_new_tokens: int = 0  # params.max_new_tokens, clipped to the model's context

    def __post_init__(self):
        self.rng = self.params.make_rng()
        self.max_new_tokens = self.params.max_new_tokens

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def lifetime_tokens(self) -> int:
        """Cache slots the sequence can ever occupy (its last sampled token is never cached)."""
        return len(self.prompt_ids) + self.max_new_tokens - 1


@dataclass
class ScheduledStep:
    prefill: list[Sequence]
    decode: list[Sequence]
    preempted: list[Sequence]


class Scheduler:
    def __init__(self, allocator: BlockAllocator, block_size: int, max_running: int = 64,
                 admission: str = "on-demand", max_prefill_tokens: int = 4096):
        if admission not in ADMISSION_POLICIES:
            raise UserError(f"--admission {admission}: expected one of {', '.join(ADMISSION_POLICIES)}")
        if max_running < 1:
            raise UserError(f"--max-batch {max_running}: must be at least 1")
        self.allocator = allocator
        self.block_size = block_size
        self.max_running = max_running
        self.admission = admission
        self.max_prefill_tokens = max_prefill_tokens
        # Keep ~1% of the pool free at admission so running sequences can grow a while before
        # anyone must be preempted.
        self.watermark = max(1, allocator.usable_blocks // 100) if admission == "on-demand" else 0
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last is the youngest

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def check_fits(self, seq: Sequence) -> None:
        """A request that could never be held, even alone, is refused up front."""
        needed = self.blocks_for(seq.lifetime_tokens)
        if needed > self.allocator.usable_blocks:
            raise UserError(f"request needs {needed} KV blocks ({seq.lifetime_tokens} tokens) but the pool has "
                            f"{self.allocator.usable_blocks}: raise --kv-memory or shorten the prompt/max tokens")

    def add(self, seq: Sequence) -> None:
        self.check_fits(seq)
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _outstanding_reservations(self) -> int:
        if self.admission != "reserve":
            return 0
        return sum(self.blocks_for(seq.lifetime_tokens) - len(seq.block_ids) for seq in self.running)

    def schedule(self) -> ScheduledStep:
        preempted = self._secure_decode_slots()
        decode = list(self.running)
        prefill = [] if preempted else self._admit()
        return ScheduledStep(prefill, decode, preempted)

    def _secure_decode_slots(self) -> list[Sequence]:
        preempted: list[Sequence] = []
        for seq in list(self.running):
            if seq not in self.running:  # preempted earlier in this loop
                continue
            while self.blocks_for(seq.num_cached + 1) > len(seq.block_ids):
                if self.allocator.num_free == 0:
                    victim = self.running[-1]
                    self.preempt(victim)
                    preempted.append(victim)
                    if victim is seq:
                        break
                    continue
                seq.block_ids += self.allocator.allocate(1)
        return preempted

    def _admit(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        prefill_tokens = 0
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            if admitted and prefill_tokens + seq.num_tokens > self.max_prefill_tokens:
                break
            now = self.blocks_for(seq.num_tokens)
            if self.admission == "reserve":
                fits = self.blocks_for(seq.lifetime_tokens) <= self.allocator.num_free - self._outstanding_reservations()
            else:
                # Room for the prompt and the first decoded token, plus the watermark when others
                # run (an idle pool admits anything that passed check_fits).
                first_step = self.blocks_for(min(seq.num_tokens + 1, seq.lifetime_tokens))
                fits = first_step + (self.watermark if self.running else 0) <= self.allocator.num_free
            if not fits:
                if not self.running and not admitted:
                    raise RuntimeError(f"scheduler: {seq.request_id} does not fit an idle pool (check_fits let it in)")
                break  # strict arrival order: a large request is not starved by small ones behind it
            self.waiting.popleft()
            seq.block_ids = self.allocator.allocate(now)
            seq.num_cached = 0
            self.running.append(seq)
            admitted.append(seq)
            prefill_tokens += seq.num_tokens
        return admitted

    def preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.preemptions += 1
        # Back in arrival order, so it is re-admitted before anything that came after it.
        position = next((i for i, other in enumerate(self.waiting) if other.arrival > seq.arrival), len(self.waiting))
        self.waiting.insert(position, seq)

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self._release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _release(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.block_ids)
        seq.block_ids = []
        seq.num_cached = 0
