"""Fake tokenizer and language models whose log-probabilities are known by construction.

``PieceTokenizer`` matches the longest listed piece at each position and falls back to UTF-8
bytes, so it can encode any text and — like BPE — merges across a context/continuation boundary
("Answer:" + " A" gives the piece " A").  ``BigramLM`` looks its rows up in a table (hand-computable
scores); ``PrefixHashLM`` makes every row a pseudo-random function of the whole prefix (so context
truncation and batching are visible) while staying causal, as a real model is.
"""
from __future__ import annotations

import zlib
from typing import Callable, Optional, Sequence

import numpy as np

BOS, EOS = "<bos>", "<eos>"


class PieceTokenizer:
    def __init__(self, pieces: Sequence[str] = (), with_bos: bool = True):
        self.pieces = [BOS, EOS, *dict.fromkeys(pieces)]
        self.byte_offset = len(self.pieces)
        self.vocab_size = self.byte_offset + 256
        self.bos_token_id: Optional[int] = 0 if with_bos else None
        self.eos_token_id: Optional[int] = 1
        self._by_length = sorted(((piece, index) for index, piece in enumerate(self.pieces) if index > 1), key=lambda entry: -len(entry[0]))

    def id(self, piece: str) -> int:
        return self.pieces.index(piece)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = [self.bos_token_id] if add_bos and self.bos_token_id is not None else []
        position = 0
        while position < len(text):
            for piece, index in self._by_length:
                if text.startswith(piece, position):
                    ids.append(index)
                    position += len(piece)
                    break
            else:
                ids.extend(self.byte_offset + byte for byte in text[position].encode("utf-8"))
                position += 1
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        out, pending = [], bytearray()
        for token in ids:
            if token >= self.byte_offset:
                pending.append(token - self.byte_offset)
                continue
            if pending:
                out.append(pending.decode("utf-8", errors="replace"))
                pending = bytearray()
            out.append(self.pieces[token])
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        text = "".join(f"<|{message['role']}|>{message['content']}\n" for message in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")


class _RecordingLM:
    def __init__(self, tokenizer: PieceTokenizer, max_seq_len: int):
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.calls: list[list[list[int]]] = []

    def row_logprobs(self, ids: Sequence[int]) -> np.ndarray:
        raise NotImplementedError

    def logprobs(self, batch):
        self.calls.append([list(seq) for seq in batch])
        for seq in batch:
            assert 0 < len(seq) <= self.max_seq_len, f"fed {len(seq)} ids with max_seq_len {self.max_seq_len}"
        return [self.row_logprobs(seq).astype(np.float32) for seq in batch]

    def greedy_generate(self, prompt_ids, max_new_tokens, stop_ids=()):
        ids = list(prompt_ids)
        new = []
        for _ in range(max_new_tokens):
            token = int(self.row_logprobs(ids)[-1].argmax())
            new.append(token)
            if token in stop_ids:
                break
            ids.append(token)
        return new


def bigram_table(tokenizer: PieceTokenizer, preferences: dict[str, dict[str, float]]) -> np.ndarray:
    """log p(next | prev): listed probabilities exactly, the rest of each row spread uniformly."""
    vocab = tokenizer.vocab_size
    table = np.full((vocab, vocab), 1.0 / vocab)
    for previous, nexts in preferences.items():
        row = np.full(vocab, (1.0 - sum(nexts.values())) / (vocab - len(nexts)))
        for piece, probability in nexts.items():
            row[tokenizer.id(piece)] = probability
        table[tokenizer.id(previous)] = row
    return np.log(table)


class BigramLM(_RecordingLM):
    def __init__(self, tokenizer: PieceTokenizer, table: np.ndarray, max_seq_len: int = 4096):
        super().__init__(tokenizer, max_seq_len)
        self.table = table

    def row_logprobs(self, ids):
        return self.table[np.asarray(ids)]


class PrefixHashLM(_RecordingLM):
    def __init__(self, tokenizer: PieceTokenizer, max_seq_len: int = 4096, salt: int = 0):
        super().__init__(tokenizer, max_seq_len)
        self.salt = salt

    def row_logprobs(self, ids):
        rows = []
        running = self.salt
        for token in ids:
            running = zlib.crc32(int(token).to_bytes(4, "little"), running)
            logits = np.random.default_rng(running).normal(size=self.tokenizer.vocab_size) * 3
            rows.append(logits - np.logaddexp.reduce(logits))
        return np.array(rows)


class ScriptedLM(_RecordingLM):
    """Generates ``respond(prompt_text)`` followed by EOS; log-probabilities are uniform."""

    def __init__(self, tokenizer: PieceTokenizer, respond: Callable[[str], str], max_seq_len: int = 4096):
        super().__init__(tokenizer, max_seq_len)
        self.respond = respond
        self.prompts: list[str] = []

    def row_logprobs(self, ids):
        return np.full((len(ids), self.tokenizer.vocab_size), -np.log(self.tokenizer.vocab_size))

    def greedy_generate(self, prompt_ids, max_new_tokens, stop_ids=()):
        prompt = self.tokenizer.decode([token for token in prompt_ids if token != self.tokenizer.bos_token_id])
        self.prompts.append(prompt)
        return (self.tokenizer.encode(self.respond(prompt)) + [self.tokenizer.eos_token_id])[:max_new_tokens]
