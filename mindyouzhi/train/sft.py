"""Instruction data for SFT (and for GKD on the teacher's SFT data): records → token ids + loss mask.

Accepted records (one JSON object per line of a ``.jsonl`` file, or a JSON array in a ``.json``
file — also a ``.jsonl`` file that holds an array):

* Alpaca style: ``instruction``, optional ``input`` (appended to the instruction after a newline),
  ``output`` (the response), optional ``history`` (``[[query, response], ...]`` earlier turns) and
  ``system``;
* ``messages``: ``[{"role": "system"|"user"|"assistant", "content": ...}, ...]``;
* ShareGPT ``conversations``: ``[{"from": "human"|"gpt"|"system", "value": ...}, ...]``.

Rendering uses the model's chat template (``tokenizer.apply_chat_template``).  The conversation is
rendered turn by turn and cut into segments — the prompt part before each assistant turn and the
assistant turn itself (including the template's end-of-turn marker, so the model learns to stop) —
and each segment is tokenized on its own; the loss covers exactly the assistant segments of every
turn.  A model without a chat template gets a plain Alpaca layout
(``### Instruction:\\n…\\n\\n### Response:\\n`` + response + EOS).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from mindyouzhi.errors import UserError

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "bot": "assistant"}


@dataclass
class Example:
    """One training sequence: ids [L], ``loss[i]`` = token i is a training target (predicted from
    the tokens before it), ``prompt_length`` = tokens before the first target (the on-policy prompt)."""

    ids: np.ndarray
    loss: np.ndarray
    prompt_length: int
    source: int = 0
    segments: tuple = ()  # lengths of the examples packed into this one (empty: a single example)

    @property
    def loss_tokens(self) -> int:
        return int(self.loss[1:].sum())


def read_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, record) for every record of a JSON array file or a JSON-lines file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: invalid JSON array ({exc.msg} at line {exc.lineno})") from None
        for index, record in enumerate(records):
            yield f"{path}: record {index}", record
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}: line {number}", json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: line {number}: invalid JSON ({exc.msg})") from None


def _text(value: Any, where: str, key: str, allow_empty: bool = False) -> str:
    if value is None and allow_empty:
        return ""
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise UserError(f"{where}: {key} must be a {'string' if allow_empty else 'non-empty string'}")
    return value


def conversation(record: Any, where: str) -> list[dict]:
    """The record as a list of ``{"role", "content"}`` messages ending with an assistant turn."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where}: messages must be a non-empty list")
        out = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
                raise UserError(f"{where}: messages[{i}] must be an object with role system, user or assistant")
            out.append({"role": message["role"], "content": _text(message.get("content"), where, f"messages[{i}].content",
                                                                   allow_empty=message["role"] == "system")})
    elif "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns:
            raise UserError(f"{where}: conversations must be a non-empty list")
        out = []
        for i, turn in enumerate(turns):
            role = _SHAREGPT_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
            if role is None:
                raise UserError(f"{where}: conversations[{i}].from must be one of {', '.join(_SHAREGPT_ROLES)}")
            out.append({"role": role, "content": _text(turn.get("value"), where, f"conversations[{i}].value")})
    elif "instruction" in record or "output" in record:
        instruction = _text(record.get("instruction"), where, "instruction")
        extra = _text(record.get("input"), where, "input", allow_empty=True)
        output = _text(record.get("output"), where, "output")
        out = []
        if record.get("system"):
            out.append({"role": "system", "content": _text(record["system"], where, "system")})
        history = record.get("history") or []
        if not isinstance(history, list):
            raise UserError(f"{where}: history must be a list of [query, response] pairs")
        for i, pair in enumerate(history):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise UserError(f"{where}: history[{i}] must be a [query, response] pair")
            out.append({"role": "user", "content": _text(pair[0], where, f"history[{i}][0]")})
            out.append({"role": "assistant", "content": _text(pair[1], where, f"history[{i}][1]")})
        out.append({"role": "user", "content": f"{instruction}\n{extra}" if extra.strip() else instruction})
        out.append({"role": "assistant", "content": output})
    else:
        raise UserError(f"{where}: expected 'instruction'/'output' (Alpaca), 'messages' or 'conversations'")
    if out[-1]["role"] != "assistant":
        raise UserError(f"{where}: the conversation must end with an assistant turn (the response to learn)")
    return out


def _plain_segments(messages: Sequence[dict]) -> list[tuple[str, bool]]:
    segments: list[tuple[str, bool]] = []
    prompt = ""
    for message in messages:
        if message["role"] == "system":
            prompt += message["content"] + "\n\n"
        elif message["role"] == "user":
            prompt += f"### Instruction:\n{message['content']}\n\n### Response:\n"
        else:
            segments.append((prompt, False))
            segments.append((message["content"], True))
            prompt = "\n\n"
    return [(text, loss) for text, loss in segments if text]


def _template_segments(tokenizer, messages: Sequence[dict], where: str) -> list[tuple[str, bool]]:
    """Prompt / response text segments from the chat template, rendered turn by turn."""
    segments: list[tuple[str, bool]] = []
    done = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:index], add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: index + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            return []  # the template rewrites earlier turns: fall back to the last turn only
        segments.append((prompt[len(done):], False))
        segments.append((full[len(prompt):], True))
        done = full
    return [(text, loss) for text, loss in segments if text]


def encode_conversation(tokenizer, messages: Sequence[dict], where: str, source: int = 0) -> Example:
    """Token ids and loss mask of one conversation (untruncated)."""
    if tokenizer.has_chat_template:
        segments = _template_segments(tokenizer, messages, where)
        if not segments:  # non prefix-stable template: train on the final response only
            prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
            full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
            if not full.startswith(prompt):
                raise UserError(f"{where}: the chat template does not render the prompt as a prefix of the "
                                f"conversation, so the response tokens cannot be located")
            segments = [(prompt, False), (full[len(prompt):], True)]
    else:
        segments = _plain_segments(messages)
    ids: list[int] = []
    mask: list[bool] = []
    for text, is_loss in segments:
        piece = tokenizer.encode(text)
        if is_loss and not tokenizer.has_chat_template and tokenizer.eos_token_id is not None:
            piece = piece + [tokenizer.eos_token_id]  # the plain layout ends every response with EOS
        ids.extend(piece)
        mask.extend([is_loss] * len(piece))
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None and ids[:1] != [tokenizer.bos_token_id]:
        ids.insert(0, tokenizer.bos_token_id)
        mask.insert(0, False)
    ids_array = np.asarray(ids, np.int32)
    loss = np.asarray(mask, bool)
    first = int(np.argmax(loss)) if loss.any() else len(ids)
    return Example(ids_array, loss, first, source)


def truncate(example: Example, seq_length: int) -> Optional[Example]:
    """Fit ``example`` into ``seq_length`` tokens; None if no target would be left.

    A prompt shorter than half the window is kept whole and the response is cut at the end.  A
    longer prompt (long filings, few-shot context) would otherwise leave no response at all, so the
    response keeps ``max(half the window, what the prompt leaves)`` tokens (all of it when shorter)
    and the prompt gives up its *middle*: its first quarter (system turn, start of the user turn)
    and its end (the question and the assistant header the response follows) stay.  Prompt tokens
    carry no loss, so the cut only shortens the context.
    """
    length, prompt = len(example.ids), example.prompt_length
    if length > seq_length:
        keep_response = min(length - prompt, max(seq_length // 2, seq_length - prompt))
        keep_prompt = seq_length - keep_response
        if keep_prompt >= prompt:
            index = np.arange(seq_length)
        else:
            head = keep_prompt // 4
            index = np.concatenate([np.arange(head), np.arange(prompt - (keep_prompt - head), prompt),
                                    np.arange(prompt, prompt + keep_response)])
            prompt = keep_prompt
        example = Example(example.ids[index], example.loss[index], prompt, example.source)
    return example if example.loss_tokens > 0 else None
