"""Training data: sources → fixed-length examples → a seeded global-batch order → per-rank micro-batches.

* ``text`` sources (e.g. ``wiki.valid.tokens``) are tokenized as one stream without special tokens
  and cut into non-overlapping windows of ``seq_length`` tokens, exactly like ``eval ppl``; every
  token after the first is a target.
* ``sft`` sources go through :mod:`mindyouzhi.train.sft` (chat template, loss on responses only,
  or with ``loss: all`` on every token of the conversation),
  fitted to ``seq_length`` (``sft.truncate``: long prompts lose their middle, not the response); ``packing`` concatenates consecutive examples into full windows.
  With ``packed_attention: isolated`` each token attends only within its own example
  (block-diagonal causal mask, :func:`attention_mask`); RoPE scores depend on relative positions
  only, so no position reset is needed for an example to be computed exactly as if alone.

Order: optimizer step ``s`` consumes global batch ``s`` of the epoch permutation drawn from
``default_rng([seed, epoch])`` (a trailing partial global batch is dropped, like MindFormers'
``drop_remainder``).  The global batch is laid out ``[rank][micro-batch][row]``, so rank ``r``
reads its contiguous shard, and a single process with ``gradient_accumulation_steps × workers``
micro-batches reads the same rows in the same grouping.  The data position saved in a checkpoint
is just the step number.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from mindyouzhi.errors import UserError

from .config import DataSource, sft_files
from .sft import Example, conversation, encode_conversation, read_records, truncate


@dataclass
class TrainData:
    examples: list[Example]
    seq_length: int
    stats: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for example in self.examples:
            digest.update(example.ids.tobytes())
            digest.update(np.packbits(example.loss).tobytes())
        return digest.hexdigest()[:16]


def text_examples(tokenizer, path: Path, seq_length: int, max_samples: Optional[int], source: int) -> list[Example]:
    from mindyouzhi.eval.ppl import token_stream

    tokens = token_stream(tokenizer, path, flag="train_dataset.sources[].path")
    count = len(tokens) // seq_length
    if max_samples is not None:
        count = min(count, max_samples)
    loss = np.ones(seq_length, bool)
    loss[0] = False
    return [Example(tokens[i * seq_length: (i + 1) * seq_length].astype(np.int32), loss.copy(), seq_length // 2, source)
            for i in range(count)]


def sft_examples(tokenizer, files: Sequence[Path], seq_length: int, max_samples: Optional[int],
                 source: int) -> tuple[list[Example], dict]:
    examples, records, truncated, dropped = [], 0, 0, 0
    for path in files:
        for where, record in read_records(path):
            if max_samples is not None and records >= max_samples:
                break
            records += 1
            example = encode_conversation(tokenizer, conversation(record, where), where, source)
            if len(example.ids) > seq_length:
                truncated += 1
            example = truncate(example, seq_length)
            if example is None:
                dropped += 1
                continue
            examples.append(example)
    return examples, {"records": records, "truncated": truncated, "dropped_no_response_left": dropped}


def every_token(example: Example) -> Example:
    """The same conversation with every token after the first as a target (prompt included)."""
    loss = np.ones(len(example.ids), bool)
    loss[0] = False
    return Example(example.ids, loss, example.prompt_length, example.source, example.segments)


def pack(examples: Sequence[Example], seq_length: int) -> list[Example]:
    """Greedy packing in order: start a new window when the next example does not fit."""
    packed: list[Example] = []
    ids: list[np.ndarray] = []
    loss: list[np.ndarray] = []
    used = 0

    def flush():
        if ids:
            packed.append(Example(np.concatenate(ids), np.concatenate(loss), 0, -1, tuple(len(part) for part in ids)))

    for example in examples:
        if used + len(example.ids) > seq_length:
            flush()
            ids, loss, used = [], [], 0
        ids.append(example.ids)
        loss.append(example.loss)
        used += len(example.ids)
    flush()
    return packed


def build_dataset(tokenizer, sources: Sequence[DataSource], seq_length: int, packing: bool, where: str) -> TrainData:
    examples: list[Example] = []
    stats = []
    for index, source in enumerate(sources):
        if source.format == "text":
            part = text_examples(tokenizer, source.path, seq_length, source.max_samples, index)
            info = {"windows": len(part)}
        else:
            files = sft_files(source, where, f"train_dataset.sources[{index}].path")
            part, info = sft_examples(tokenizer, files, seq_length, source.max_samples, index)
            if source.loss == "all":
                part = [every_token(example) for example in part]
        if not part:
            raise UserError(f"{where}: train_dataset.sources[{index}].path {source.path}: no training example of at "
                            f"most seq_length {seq_length} tokens with a target in it")
        info.update(path=str(source.path), format=source.format, examples=len(part),
                    tokens=int(sum(len(e.ids) for e in part)), loss_tokens=int(sum(e.loss_tokens for e in part)))
        stats.append(info)
        examples.extend(part)
    if packing:
        examples = pack(examples, seq_length)
    return TrainData(examples, seq_length, stats)


class BatchPlan:
    """Which examples every optimizer step reads (seeded, resumable from the step number alone)."""

    def __init__(self, num_examples: int, global_batch: int, epochs: int, max_steps: int, seed: int, shuffle: bool,
                 where: str = "recipe"):
        self.num_examples = num_examples
        self.global_batch = global_batch
        self.seed = seed
        self.shuffle = shuffle
        self.steps_per_epoch = num_examples // global_batch
        if self.steps_per_epoch == 0:
            raise UserError(f"{where}: the data has {num_examples} examples, fewer than one global batch of "
                            f"{global_batch} (batch_size × gradient_accumulation_steps × data_parallel)")
        self.total_steps = max_steps if max_steps and max_steps > 0 else epochs * self.steps_per_epoch
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if self.shuffle:
                self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)}
            else:
                self._orders = {epoch: np.arange(self.num_examples)}
        return self._orders[epoch]

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def global_indices(self, step: int) -> np.ndarray:
        epoch, offset = divmod(step, self.steps_per_epoch)
        return self.order(epoch)[offset * self.global_batch: (offset + 1) * self.global_batch]

    def micro_batches(self, step: int, rank: int, world: int, batch_size: int) -> list[np.ndarray]:
        """This rank's micro-batches of step ``step`` (each ``batch_size`` example indices)."""
        shard = self.global_indices(step).reshape(world, -1)[rank]
        return [shard[i: i + batch_size] for i in range(0, len(shard), batch_size)]


@dataclass
class Batch:
    ids: np.ndarray      # [B, T] int32 model input
    targets: np.ndarray  # [B, T] int32 next token (0 where there is none)
    mask: np.ndarray     # [B, T] bool: position t is a loss position (predicts a target token)
    segments: np.ndarray  # [B, T] int32: which packed example a position belongs to (padding: its own)


def collate(examples: Sequence[Example], seq_length: int, pad_id: int) -> Batch:
    """Right-padded to ``seq_length`` (fixed shapes: the jitted step compiles once)."""
    rows = len(examples)
    ids = np.full((rows, seq_length), pad_id, np.int32)
    targets = np.zeros((rows, seq_length), np.int32)
    mask = np.zeros((rows, seq_length), bool)
    segments = np.zeros((rows, seq_length), np.int32)
    for row, example in enumerate(examples):
        length = len(example.ids)
        ids[row, :length] = example.ids
        targets[row, : length - 1] = example.ids[1:]
        mask[row, : length - 1] = example.loss[1:]
        parts = example.segments or (length,)
        segments[row, :length] = np.repeat(np.arange(len(parts), dtype=np.int32), parts)
        segments[row, length:] = len(parts)
    return Batch(ids, targets, mask, segments)


def attention_mask(segments: np.ndarray, grouped: bool = False) -> np.ndarray:
    """Additive block-diagonal causal mask from segment ids [B, T]: [B, 1, T, T] (the MLA score
    layout [B, H, T, T]), or [B, 1, 1, T, T] with ``grouped`` (GQA scores [B, KV, groups, T, T])."""
    length = segments.shape[1]
    causal = np.tril(np.ones((length, length), bool))
    allowed = causal[None] & (segments[:, :, None] == segments[:, None, :])
    mask = np.where(allowed, np.float32(0.0), np.float32(-1e9))[:, None]
    return mask[:, None] if grouped else mask
