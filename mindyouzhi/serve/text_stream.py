"""Token ids → text deltas for streaming, and OpenAI-style stop strings.

Decoding token by token is wrong for byte-level BPE (one character can span several tokens) and
for SentencePiece-style tokenizers (a token's leading space depends on its neighbours).
``IncrementalDetokenizer`` decodes a short window and emits only text that is complete (no
trailing U+FFFD of a half-received UTF-8 character); the concatenated deltas equal
``tokenizer.decode(all ids)``.
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: context that fixes the first new token's spelling
        self._read_offset = 0  # ids up to here have been emitted

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back (e.g. an incomplete character at the very end)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        emitted = self._tokenizer.decode(self._ids[self._prefix_offset:self._read_offset])
        current = self._tokenizer.decode(self._ids[self._prefix_offset:])
        if len(current) <= len(emitted) or (current.endswith(REPLACEMENT) and not final):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return current[len(emitted):]


class StopStrings:
    """Cuts the text at the first stop string; holds back a tail that might begin one."""

    def __init__(self, stops: list[str]):
        self.stops = [stop for stop in stops if stop]
        self._pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        if not self.stops:
            return delta, False
        text = self._pending + delta
        hits = [index for index in (text.find(stop) for stop in self.stops) if index >= 0]
        if hits:
            self._pending = ""
            return text[:min(hits)], True
        hold = max((length for stop in self.stops for length in range(1, len(stop))
                    if text.endswith(stop[:length])), default=0)
        self._pending = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold], False

    def flush(self) -> str:
        pending, self._pending = self._pending, ""
        return pending
