"""What a training sample looks like to the data commands: an instruction, a response, a reasoning.

Pools come in several common JSONL shapes; this module maps each onto the same three strings so
the commands never guess field names on their own.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

INSTRUCTION_FIELDS = ("instruction", "question", "prompt", "query")
CONTEXT_FIELDS = ("input", "context")
RESPONSE_FIELDS = ("output", "answer", "response", "completion")
REASONING_FIELDS = ("reasoning", "rationale", "explanation", "cot")
SHAPES = "messages, instruction/output, question/answer, prompt/completion or text"

_CJK_RE = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_LATIN_WORD_RE = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


@dataclass(frozen=True)
class SampleText:
    instruction: str
    response: str
    reasoning: str = ""

    @property
    def full(self) -> str:
        return "\n".join(part for part in (self.instruction, self.reasoning, self.response) if part)


def _string_field(data: dict, names) -> str:
    for name in names:
        value = data.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ValueError(f"field {name!r} must be a string, got {type(value).__name__}")
        return value
    return ""


def sample_text(data: dict) -> SampleText:
    """Raise ValueError (reported with file:line by the reader) when no known shape matches."""
    messages = data.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("field 'messages' must be a list of {role, content} objects")
        user, assistant = [], []
        for message in messages:
            content = message.get("content")
            if not isinstance(content, str):
                raise ValueError("every message needs a string 'content'")
            role = message.get("role")
            if role in ("user", "system"):
                user.append(content)
            elif role == "assistant":
                assistant.append(content)
            else:
                raise ValueError(f"unknown message role {role!r} (expected system, user or assistant)")
        if not user:
            raise ValueError("'messages' has no user turn")
        return SampleText("\n".join(user), "\n".join(assistant))
    instruction = _string_field(data, INSTRUCTION_FIELDS)
    context = _string_field(data, CONTEXT_FIELDS)
    if context:
        instruction = f"{instruction}\n{context}" if instruction else context
    response = _string_field(data, RESPONSE_FIELDS)
    reasoning = _string_field(data, REASONING_FIELDS)
    if not instruction:
        text = _string_field(data, ("text",))
        if not text:
            raise ValueError(f"no sample text found (expected {SHAPES})")
        return SampleText(text, "")
    return SampleText(instruction, response, reasoning)


def estimate_tokens(text: str) -> int:
    """Tokenizer-free estimate: one token per CJK character, ~1.3 per Latin word, 1 per other symbol.

    Close enough to BPE counts of Chinese/English LLM tokenizers for budgeting; pass a
    ``tokenizer.json`` to ``data compress --tokenizer`` for exact counts.
    """
    cjk = len(_CJK_RE.findall(text))
    words = _LATIN_WORD_RE.findall(text)
    latin_chars = sum(len(word) for word in words)
    other = sum(1 for ch in text if not ch.isspace()) - cjk - latin_chars
    return max(1, cjk + round(1.3 * len(words)) + max(0, other) // 2)


def cjk_ratio(text: str) -> float:
    """Share of CJK characters among letters — the language test used by several commands."""
    cjk = len(_CJK_RE.findall(text))
    latin = sum(len(word) for word in _LATIN_WORD_RE.findall(text))
    return cjk / (cjk + latin) if cjk + latin else 0.0


def is_chinese(text: str) -> bool:
    return cjk_ratio(text) >= 0.3
