"""The serving engine: requests in, tokens out, over one paged KV pool.

``Engine.step()`` is one iteration of continuous batching: the scheduler secures cache slots
(preempting if it must) and admits waiting requests; admitted requests are prefilled one by one
(each yields its first token); every other running request decodes one token in a single batched
call.  Each new token is reported as a ``TokenEvent`` — returned from ``step`` and passed to the
request's ``on_event`` callback — and finished requests free their blocks at once.

The engine is single-threaded by design (MindSpore calls happen on one thread);
``engine_thread.EngineThread`` runs it in the background for the HTTP server.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from mindyouzhi.errors import UserError

from .attention import select_attention
from .kv_pool import KVPool
from .paged_model import PagedModel
from .sampling import SamplingParams, choose_token
from .scheduler import Scheduler, Sequence

DEFAULT_KV_MEMORY = 1 << 30


@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    token_id: Optional[int]  # None only for an abort
    finish_reason: Optional[str] = None  # "stop", "length", "abort" once finished


@dataclass
class EngineStats:
    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    preemptions: int = 0
    max_running: int = 0  # the largest number of sequences held in the pool at once
    max_blocks_used: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class EngineOptions:
    kv_memory: int = DEFAULT_KV_MEMORY  # pool bytes (ignored when num_blocks is given)
    num_blocks: Optional[int] = None
    block_size: int = 16
    max_batch: int = 64
    attention: str = "auto"  # auto | custom | gather (decode attention implementation)
    admission: str = "on-demand"  # on-demand | reserve
    prefill_chunk: int = 512
    max_prefill_tokens: int = 4096  # prefill work admitted per step (bounds decode stalls)


@dataclass
class Completion:
    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    finish_reason: str
    preemptions: int = 0
    extra: dict = field(default_factory=dict)


class Engine:
    def __init__(self, runner, options: EngineOptions = EngineOptions()):
        self.runner = runner
        self.options = options
        config = runner.config
        if options.num_blocks is not None:
            self.pool = KVPool(config, options.num_blocks, options.block_size)
        else:
            self.pool = KVPool.from_budget(config, options.kv_memory, options.block_size)
        self.attention = select_attention(options.attention)
        self.model = PagedModel(runner, self.pool, self.attention, options.prefill_chunk)
        self.scheduler = Scheduler(self.pool.allocator, self.pool.block_size, options.max_batch, options.admission,
                                   options.max_prefill_tokens)
        self.stats = EngineStats()
        self._sequences: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self._aborts: list[str] = []

    # -- requests ---------------------------------------------------------------------------------
    def add_request(self, prompt_ids: Iterable[int], params: SamplingParams, request_id: Optional[str] = None,
                    on_event: Optional[Callable[[TokenEvent], None]] = None) -> str:
        """Queue a request; raises ``UserError`` for one that can never run (bad ids, too long)."""
        params.validate()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise UserError("the prompt is empty: at least one token is needed")
        vocab = self.runner.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise UserError(f"prompt token ids must be in [0, {vocab})")
        context = self.model.max_positions
        if len(prompt) >= context:
            raise UserError(f"the prompt has {len(prompt)} tokens; the model's context is {context}")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._sequences:
            raise UserError(f"request id {request_id!r} is already in use")
        seq = Sequence(request_id, prompt, params, on_event)
        seq.max_new_tokens = min(params.max_new_tokens, context - len(prompt))
        self.scheduler.add(seq)
        self._sequences[request_id] = seq
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request at the next step (safe to call for finished or unknown ids)."""
        self._aborts.append(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._aborts)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # -- one iteration ----------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        self._apply_aborts(events)
        plan = self.scheduler.schedule()
        self.stats.steps += 1
        self.stats.preemptions += len(plan.preempted)
        self._note_occupancy()
        for seq in plan.prefill:
            started = time.perf_counter()
            logits = self.model.prefill(seq.tokens, seq.block_ids)
            self.stats.prefill_seconds += time.perf_counter() - started
            self.stats.prefill_tokens += seq.num_tokens
            seq.num_cached = seq.num_tokens
            self._append(seq, choose_token(logits, seq.params, seq.rng), events)
        decode = [seq for seq in plan.decode if seq.finish_reason is None]
        if decode:
            started = time.perf_counter()
            positions = [seq.num_cached for seq in decode]  # the pending (last sampled) token's position
            logits = self.model.decode([seq.output_ids[-1] for seq in decode], positions,
                                       [seq.block_ids for seq in decode])
            self.stats.decode_seconds += time.perf_counter() - started
            self.stats.decode_tokens += len(decode)
            for row, seq in enumerate(decode):
                seq.num_cached += 1
                self._append(seq, choose_token(logits[row], seq.params, seq.rng), events)
        return events

    def _note_occupancy(self) -> None:
        self.stats.max_running = max(self.stats.max_running, len(self.scheduler.running))
        used = self.pool.allocator.usable_blocks - self.pool.allocator.num_free
        self.stats.max_blocks_used = max(self.stats.max_blocks_used, used)

    def _append(self, seq: Sequence, token: int, events: list[TokenEvent]) -> None:
        seq.output_ids.append(token)
        if token in seq.params.stop_token_ids:
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= seq.max_new_tokens:
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            self.scheduler.finish(seq)
            del self._sequences[seq.request_id]
        self._emit(seq, TokenEvent(seq.request_id, token, seq.finish_reason), events)

    def _apply_aborts(self, events: list[TokenEvent]) -> None:
        aborts, self._aborts = self._aborts, []
        for request_id in aborts:
            seq = self._sequences.pop(request_id, None)
            if seq is None:
                continue
            self.scheduler.finish(seq)
            seq.finish_reason = "abort"
            self._emit(seq, TokenEvent(request_id, None, "abort"), events)

    @staticmethod
    def _emit(seq: Sequence, event: TokenEvent, events: list[TokenEvent]) -> None:
        events.append(event)
        if seq.on_event is not None:
            seq.on_event(event)

    def reset(self) -> list[str]:
        """Drop every request (after an internal failure); returns their ids."""
        dropped = list(self._sequences)
        for seq in list(self._sequences.values()):
            self.scheduler.finish(seq)
        self._sequences.clear()
        self._aborts.clear()
        return dropped

    # -- offline use ------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 progress: Optional[Callable[[int], None]] = None) -> list[Completion]:
        """Run ``prompts`` to completion together (continuous batching); results in input order."""
        per_request = params if isinstance(params, list) else [params] * len(prompts)
        ids: list[str] = []
        try:
            for prompt, request_params in zip(prompts, per_request):
                ids.append(self.add_request(prompt, request_params))
        except UserError:
            for request_id in ids:  # all or nothing: no half-submitted batch left in the queue
                self.scheduler.finish(self._sequences.pop(request_id))
            raise
        outputs: dict[str, list[int]] = {request_id: [] for request_id in ids}
        reasons: dict[str, str] = {}
        sequences = {request_id: self._sequences[request_id] for request_id in ids}
        while self.has_work():
            events = self.step()
            for event in events:
                if event.request_id in outputs and event.token_id is not None:
                    outputs[event.request_id].append(event.token_id)
                if event.finish_reason is not None:
                    reasons[event.request_id] = event.finish_reason
            if progress is not None:
                progress(sum(1 for event in events if event.token_id is not None))
        return [Completion(request_id, list(sequences[request_id].prompt_ids), outputs[request_id], reasons[request_id],
                           sequences[request_id].preemptions) for request_id in ids]

    def describe(self) -> dict:
        return {"attention": self.attention.name, "admission": self.options.admission,
                "max_batch": self.options.max_batch, **self.pool.describe()}

