"""The model interface the evaluation harness is written against, and continuation scoring on it.

Every benchmark talks to a model through ``LanguageModel`` (a ``typing.Protocol`` with exactly the
members of ``mindyouzhi.models.runner.ModelRunner`` that evaluation needs), so the tests drive the
harness with small fakes whose log-probabilities are known by construction.

Continuation scoring follows lm-evaluation-harness: ``context`` and ``context + continuation`` are
encoded separately and the continuation tokens are the suffix where the two encodings differ, so
a BPE merge across the boundary (``"Answer:" + " A"``) is scored as the model would actually see
it.  The model is fed ``whole[:-1]``; the last ``len(continuation)`` rows of its log-softmax give
the continuation's log-probability.  Requests whose fed sequence is a prefix of another request's
share that request's forward pass (the four letters of a multiple-choice question need one
forward, not four): valid because row ``t`` depends only on ``ids[:t+1]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import numpy as np
from tqdm import tqdm

from mindyouzhi.errors import UserError
from mindyouzhi.progress import progress_bar


class Tokenizer(Protocol):
    bos_token_id: Optional[int]
    eos_token_id: Optional[int]
    vocab_size: int

    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str: ...


class LanguageModel(Protocol):
    tokenizer: Tokenizer
    max_seq_len: int

    def logprobs(self, batch: list[list[int]]) -> list[np.ndarray]:
        """Per sequence of n ids, float32 [n, vocab]: row t = log-softmax after ids[:t+1]."""
        ...

    def greedy_generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
        """New token ids only."""
        ...

    # Optional: ``logprobs_rows(batch, spans)`` → per sequence only rows ``start:stop`` of
    # ``logprobs``.  When a model has it the scorer asks for the continuation rows alone (the
    # ModelRunner then never builds a [T, vocab] array); otherwise it slices ``logprobs``.


def load_language_model(model_dir, precision: str = "fp32") -> LanguageModel:
    """Load a model directory (GQA, MLA or hybrid) with its tokenizer; ``precision`` "fp32" or
    "bf16" (``resolve_precision``'s "used"): the matrix products of its forwards and generation.

    Imported lazily: MindSpore is slow to import and only needed once a real model is evaluated.
    The CLI and the suite load models only through this function, which tests replace with fakes.
    """
    from mindyouzhi.models.runner import ModelRunner

    return ModelRunner.from_dir(model_dir, precision=precision)


def resolve_precision(requested: str) -> dict:
    """``--forward-precision auto|bf16|fp32`` → {"used", "requested", "fallback_reason"} (the
    conversion's rule: auto = bf16 where the CPU has native bf16 dot products and the kernel
    builds); a fallback of ``auto`` is noted on stderr."""
    import sys

    from mindyouzhi.transition.calibration import resolve_forward_precision

    used, fallback = resolve_forward_precision(requested)
    if fallback:
        print(f"note: the forward runs in fp32 ({fallback})", file=sys.stderr)
    return {"used": used, "requested": requested, "fallback_reason": fallback}


@dataclass(frozen=True)
class ContinuationScore:
    logprob: float  # sum of log p(token | everything before it) over the continuation tokens
    is_greedy: bool  # every continuation token is the argmax of its row
    num_tokens: int


@dataclass(frozen=True)
class _EncodedRequest:
    inputs: tuple[int, ...]  # what the model is fed: whole[:-1], left-truncated to max_seq_len
    targets: tuple[int, ...]  # continuation tokens, read from the last len(targets) rows
    truncated: bool


@dataclass
class ScoringStats:
    requests: int = 0
    forward_sequences: int = 0
    forward_tokens: int = 0  # tokens actually fed (prefix sharing makes this < sum of request lengths)
    truncated_requests: int = 0  # context cut on the left because it did not fit max_seq_len


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def progress(total: int, desc: Optional[str], unit: str = "it") -> tqdm:
    """The product's stderr progress bar, or a silent one when ``desc`` is None."""
    return progress_bar(total, desc, unit) if desc is not None else tqdm(total=total, disable=True)


def _leading_ids(tokenizer: Tokenizer, encoded: Sequence[int]) -> list[int]:
    """BOS when the tokenizer has one, the model was trained with it in front of every document
    (``add_bos_token``; assumed when a tokenizer does not say) and the text does not already start
    with it (chat templates often spell it out): score text the way the model saw documents start."""
    bos = tokenizer.bos_token_id
    if bos is None or not getattr(tokenizer, "add_bos_token", True) or (encoded and encoded[0] == bos):
        return []
    return [bos]


class ContinuationScorer:
    """Log-likelihood of continuations given contexts, batched, with shared forwards.

    Only the continuation rows are needed.  A model with ``logprobs_rows`` (the ModelRunner) is
    asked for exactly those; a plain ``logprobs`` returns a full [length, vocab] float32 array per
    sequence (0.2 MB per token for a 49k vocabulary), which is then sliced.  ``max_batch_tokens``
    caps sequences × padded length per call: long few-shot prompts go fewer to a batch.

    A jitted backend compiles one graph per input shape, and benchmark prompts all differ in
    length.  Measured with SmolLM2-135M on CPU: a new shape costs 3-12 s of compilation, and every
    compiled graph keeps its own memory (after shapes 3072, 2560, 2048, …, 1024 peak RSS was 8.0 GB
    against 4.0 GB for the 3072 graph alone).  So with ``pad_multiple`` > 1 every fed sequence is
    right-padded to a bucketed length (``bucketed_length``: 2^k or 1.5·2^k, at most 50% longer,
    never past ``max_seq_len``) and a short batch is filled up with dummy rows, which keeps the
    number of distinct shapes to about two per doubling of length.  Right padding never changes
    the rows we read (attention is causal); dummy rows are discarded.
    """

    def __init__(self, lm: LanguageModel, batch_size: int = 1, pad_multiple: int = 1, progress: Optional[str] = None,
                 max_batch_tokens: Optional[int] = None):
        if batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {batch_size}")
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise UserError(f"--max-batch-tokens must be at least 1, got {max_batch_tokens}")
        self.lm = lm
        self.tokenizer = lm.tokenizer
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.pad_multiple = max(1, pad_multiple)
        self.progress = progress
        self.stats = ScoringStats()
        self._last_context: tuple[str, list[int]] = ("", [])

    def _encode_context(self, context: str) -> list[int]:
        # The choices of one question arrive one after another: remembering the last context
        # saves re-encoding a long few-shot prompt per choice without holding every prompt.
        if self._last_context[0] != context or not self._last_context[1]:
            self._last_context = (context, self.tokenizer.encode(context))
        return self._last_context[1]

    def encode(self, context: str, continuation: str) -> _EncodedRequest:
        whole = self.tokenizer.encode(context + continuation)
        split = common_prefix_length(self._encode_context(context), whole)
        if split == len(whole):
            raise ValueError(f"continuation {continuation!r} adds no token after its context")
        lead = _leading_ids(self.tokenizer, whole)
        if not lead and split == 0:
            # Nothing precedes the first continuation token, so no row predicts it: condition on
            # end-of-text as lm-evaluation-harness does for models without BOS.
            if self.tokenizer.eos_token_id is None:
                raise ValueError("empty context and the tokenizer has neither BOS nor EOS to condition on")
            lead = [self.tokenizer.eos_token_id]
        full = lead + whole
        targets = tuple(full[len(lead) + split :])
        inputs = full[:-1]
        max_len = self.lm.max_seq_len
        if len(targets) > max_len:
            raise UserError(
                f"a continuation of {len(targets)} tokens ({continuation[:40]!r}...) exceeds the model's "
                f"max_seq_len {max_len}"
            )
        truncated = len(inputs) > max_len
        return _EncodedRequest(tuple(inputs[-max_len:]), targets, truncated)

    def score(self, requests: Sequence[tuple[str, str]]) -> list[ContinuationScore]:
        """Score ``(context, continuation)`` pairs; results in request order."""
        encoded = [self.encode(context, continuation) for context, continuation in requests]
        self.stats.requests += len(encoded)
        self.stats.truncated_requests += sum(request.truncated for request in encoded)
        forwards, served = self._plan(encoded)
        results: list[Optional[ContinuationScore]] = [None] * len(encoded)
        pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        bar = progress(len(forwards), self.progress, "seq")
        try:
            for chunk, rows_per_batch in self._batches(forwards):
                batch = [self._padded(forwards[f], pad_id) for f in chunk]
                fill = [[pad_id]] * (rows_per_batch - len(batch)) if self.pad_multiple > 1 else []
                spans = [self._span(forwards[f], [encoded[i] for i in served[f]]) for f in chunk]
                spans += [(0, 1)] * len(fill)
                rows = self._logprobs(batch + fill, spans)
                for f, (start, stop), logprobs in zip(chunk, spans, rows):
                    if logprobs.shape[0] != stop - start:
                        raise RuntimeError(f"logprobs returned {logprobs.shape[0]} rows for {stop - start} wanted")
                    for index in served[f]:
                        results[index] = _read_score(logprobs, encoded[index], start)
                self.stats.forward_sequences += len(batch)
                self.stats.forward_tokens += sum(len(forwards[f]) for f in chunk)
                bar.update(len(chunk))
        finally:
            bar.close()
        return results  # type: ignore[return-value]

    @staticmethod
    def _span(forward: tuple[int, ...], requests: Sequence[_EncodedRequest]) -> tuple[int, int]:
        """The rows of ``forward`` that hold the continuations of the requests it serves."""
        return min(len(r.inputs) - len(r.targets) for r in requests), max(len(r.inputs) for r in requests)

    def _logprobs(self, batch: list[list[int]], spans: list[tuple[int, int]]) -> list[np.ndarray]:
        rows_only = getattr(self.lm, "logprobs_rows", None)
        if rows_only is not None:
            rows = rows_only(batch, spans)
        else:
            rows = self.lm.logprobs(batch)
            for seq, full in zip(batch, rows):
                if full.shape[0] != len(seq):
                    raise RuntimeError(f"logprobs returned {full.shape[0]} rows for {len(seq)} ids")
            rows = [full[start:stop] for full, (start, stop) in zip(rows, spans)]
        if len(rows) != len(batch):
            raise RuntimeError(f"logprobs returned {len(rows)} arrays for a batch of {len(batch)}")
        return rows

    def _padded_length(self, length: int) -> int:
        if self.pad_multiple == 1:
            return length
        return min(bucketed_length(length, self.pad_multiple), self.lm.max_seq_len)

    def _padded(self, ids: tuple[int, ...], pad_id: int) -> list[int]:
        return list(ids) + [pad_id] * (self._padded_length(len(ids)) - len(ids))

    def _batches(self, forwards: Sequence[tuple[int, ...]]):
        """(forward indices, rows per call) in order; forwards are sorted longest first, so the first
        of each batch sets its padded length, and the row count depends on that length only."""
        start = 0
        while start < len(forwards):
            rows = self.batch_size
            if self.max_batch_tokens is not None:
                rows = max(1, min(rows, self.max_batch_tokens // self._padded_length(len(forwards[start]))))
            yield list(range(start, min(start + rows, len(forwards)))), rows
            start += rows

    @staticmethod
    def _plan(encoded: Sequence[_EncodedRequest]) -> tuple[list[tuple[int, ...]], list[list[int]]]:
        """Distinct forward inputs (longest first, so batches hold similar lengths) and, for each,
        the requests it serves: a request is served by any forward its input is a prefix of."""
        forwards: list[tuple[int, ...]] = []
        served: list[list[int]] = []
        owner_of_prefix: dict[tuple[int, ...], int] = {}
        for index in sorted(range(len(encoded)), key=lambda i: -len(encoded[i].inputs)):
            inputs = encoded[index].inputs
            owner = owner_of_prefix.get(inputs)
            if owner is None:
                owner = len(forwards)
                forwards.append(inputs)
                served.append([])
                # A sibling with the same context and a shorter continuation feeds a prefix of this
                # input that ends inside the continuation part: register exactly those prefixes.
                for cut in range(len(encoded[index].targets)):
                    owner_of_prefix.setdefault(inputs[: len(inputs) - cut], owner)
            served[owner].append(index)
        return forwards, served


def bucketed_length(length: int, min_multiple: int) -> int:
    """``length`` rounded up to a multiple of max(min_multiple, 2^(⌊log2 length⌋ - 1)), i.e. to
    2^k or 1.5·2^k: two buckets per doubling of length, padding at most 50% (the trade between
    wasted compute and compiled graphs held in memory, see ``ContinuationScorer``)."""
    step = max(min_multiple, 1 << max(length.bit_length() - 2, 0))
    return -(-length // step) * step


def _read_score(logprobs: np.ndarray, request: _EncodedRequest, offset: int = 0) -> ContinuationScore:
    """``logprobs`` holds the forward's rows from ``offset`` on."""
    n_targets = len(request.targets)
    end = len(request.inputs) - offset
    rows = logprobs[end - n_targets : end]
    targets = np.asarray(request.targets)
    picked = rows[np.arange(n_targets), targets].astype(np.float64)
    return ContinuationScore(
        logprob=float(picked.sum()),
        is_greedy=bool(np.all(rows.argmax(axis=-1) == targets)),
        num_tokens=n_targets,
    )


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int


def generate_text(lm: LanguageModel, prompt: str, max_new_tokens: int, stop_strings: Sequence[str] = ()) -> Generation:
    """Greedy continuation of ``prompt`` as text, cut at EOS and at the first stop string.

    The prompt is left-truncated so prompt + new tokens fit ``max_seq_len``.
    """
    ids = _prompt_ids(lm, prompt, max_new_tokens)
    eos = lm.tokenizer.eos_token_id
    return _finish(lm, len(ids), lm.greedy_generate(ids, max_new_tokens, () if eos is None else (eos,)), stop_strings)


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    cut = len(text)
    for stop in stop_strings:
        if stop:
            found = text.find(stop)
            if found != -1:
                cut = min(cut, found)
    return text[:cut]


def _prompt_ids(lm: LanguageModel, prompt: str, max_new_tokens: int) -> list[int]:
    """The prompt's ids with the model's leading BOS, left-truncated so prompt + new tokens fit."""
    if max_new_tokens < 1 or max_new_tokens >= lm.max_seq_len:
        raise UserError(f"--max-new-tokens {max_new_tokens} must be in 1..{lm.max_seq_len - 1} (the model's max_seq_len is {lm.max_seq_len})")
    encoded = lm.tokenizer.encode(prompt)
    return (_leading_ids(lm.tokenizer, encoded) + encoded)[-(lm.max_seq_len - max_new_tokens):]


def _finish(lm: LanguageModel, prompt_len: int, new_ids: Sequence[int], stop_strings: Sequence[str]) -> Generation:
    eos = lm.tokenizer.eos_token_id
    kept = list(new_ids)
    if eos is not None and eos in kept:  # whether the backend returns the stop token is its choice: drop it
        kept = kept[:kept.index(eos)]
    return Generation(cut_at_stop(lm.tokenizer.decode(kept), stop_strings), prompt_len, len(new_ids))


def generate_texts(lm: LanguageModel, prompts: Sequence[str], max_new_tokens: int,
                   stop_strings: Sequence[Sequence[str]], batch_size: int = 8,
                   progress_desc: Optional[str] = None) -> list[Generation]:
    """Greedy continuations of many prompts decoded together, in input order.

    A model with ``generate_batch(prompt_ids, max_new_tokens, stop_ids)`` uses it; a ModelRunner is
    served by the paged engine (``mindyouzhi.serve``): continuous batching of up to ``batch_size``
    sequences, the same greedy tokens as one-at-a-time decoding (the engine is tested against the
    contiguous-cache reference).  Stop strings are applied to the decoded text afterwards.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    ids = [_prompt_ids(lm, prompt, max_new_tokens) for prompt in prompts]
    eos = lm.tokenizer.eos_token_id
    stop_ids = () if eos is None else (eos,)
    bar = progress(sum(1 for _ in prompts), progress_desc, "item")
    outputs: list[list[int]] = []
    try:
        batch_generate = getattr(lm, "generate_batch", None)
        if batch_generate is None:
            from mindyouzhi.serve.engine import Engine, EngineOptions
            from mindyouzhi.serve.sampling import SamplingParams

            # A pool for batch_size of the longest sequences: enough to never preempt, and no more
            # (the engine's default 1 GiB pool would be allocated per call).
            block = EngineOptions.block_size
            per_sequence = -(-(max(len(prompt) for prompt in ids) + max_new_tokens) // block)
            engine = Engine(lm, EngineOptions(max_batch=batch_size, num_blocks=per_sequence * batch_size + 1))
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=stop_ids)

            def batch_generate(chunk, _max_new, _stops):
                return [completion.output_ids for completion in engine.generate(chunk, params)]
        # Chunks of a few batches keep the progress bar moving while the engine still sees a full queue.
        step = batch_size * 4
        for start in range(0, len(ids), step):
            chunk = ids[start:start + step]
            outputs.extend(batch_generate(chunk, max_new_tokens, stop_ids))
            bar.update(len(chunk))
    finally:
        bar.close()
    return [_finish(lm, len(prompt), new, stops) for prompt, new, stops in zip(ids, outputs, stop_strings)]
