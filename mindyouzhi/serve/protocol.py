"""The OpenAI-compatible request and response shapes (``/v1/completions``, ``/v1/chat/completions``).

Parsing turns a JSON body into a ``GenerationRequest`` or raises ``ProtocolError`` with the HTTP
status and the OpenAI error ``type``/``param``, so a client sees exactly which field was wrong.
Supported: ``prompt`` (a string or token ids, one per request), ``messages`` (rendered with the
model's chat template), ``max_tokens`` / ``max_completion_tokens``, ``temperature``, ``top_p``,
``seed``, ``stop`` (strings), ``stream`` with ``stream_options.include_usage``, ``n`` = 1.
"""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from mindyouzhi.errors import UserError

from .sampling import SamplingParams

MAX_STOP_STRINGS = 4  # as OpenAI


class ProtocolError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}  # extra response headers, e.g. ``Allow`` with a 405

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ServedModel:
    """What the protocol layer needs to know about the model behind the server."""

    model_id: str
    tokenizer: Any
    context: int  # max positions
    pool_tokens: int  # cache slots in the whole pool: a request's lifetime must fit
    stop_token_ids: tuple[int, ...]
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class GenerationRequest:
    kind: str  # "completion" or "chat"
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    stop: list[str]
    response_id: str
    created: int


# -- field readers --------------------------------------------------------------------------------
def _invalid(message: str, param: str) -> ProtocolError:
    return ProtocolError(400, message, param=param)


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _invalid(f"'{name}' must be a number", name)
    if not low <= value <= high:
        raise _invalid(f"'{name}' must be between {low} and {high}, got {value}", name)
    return float(value)


def _integer(body: dict, name: str, low: int) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(f"'{name}' must be an integer", name)
    if value < low:
        raise _invalid(f"'{name}' must be at least {low}, got {value}", name)
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _invalid(f"'{name}' must be a boolean", name)
    return value


def _stop_strings(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value) or len(value) > MAX_STOP_STRINGS:
        raise _invalid(f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} strings", "stop")
    return [s for s in value if s]


def _check_model(body: dict, served: ServedModel) -> None:
    model = body.get("model")
    if model is None:
        return  # lenient: a single-model server knows what is meant
    if not isinstance(model, str):
        raise _invalid("'model' must be a string", "model")
    if model != served.model_id:
        raise ProtocolError(404, f"The model '{model}' does not exist; this server serves '{served.model_id}'",
                            param="model", code="model_not_found")


def _unsupported(body: dict) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise _invalid("only n = 1 is supported", "n")
    if body.get("echo"):
        raise _invalid("'echo' is not supported", "echo")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise _invalid("log probabilities are not supported", "logprobs")
    if body.get("best_of") not in (None, 1):
        raise _invalid("only best_of = 1 is supported", "best_of")


# -- prompts --------------------------------------------------------------------------------------
def _encode(served: ServedModel, text: str, add_bos: bool, param: str) -> list[int]:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # JSON allows "\ud800"; no tokenizer does
        raise _invalid(f"'{param}' contains an unpaired UTF-16 surrogate, which is not text", param) from None
    return served.tokenizer.encode(text, add_bos=add_bos)


def _completion_prompt(body: dict, served: ServedModel) -> list[int]:
    if "prompt" not in body:
        raise _invalid("missing required field 'prompt'", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return _encode(served, prompt, bool(getattr(served.tokenizer, "add_bos_token", False)), "prompt")
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    raise _invalid("'prompt' must be a string or a list of token ids (one prompt per request)", "prompt")


def _message_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text parts are meaningful to a text model
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _invalid(f"messages[{index}].content parts must be {{'type': 'text', 'text': ...}}", "messages")
            texts.append(part["text"])
        return "".join(texts)
    if content is None:
        return ""
    raise _invalid(f"messages[{index}].content must be a string or a list of text parts", "messages")


def _chat_prompt(body: dict, served: ServedModel) -> list[int]:
    messages = body.get("messages")
    if messages is None:
        raise _invalid("missing required field 'messages'", "messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("'messages' must be a non-empty list", "messages")
    rendered = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _invalid(f"messages[{index}] must be an object with a string 'role'", "messages")
        rendered.append({"role": message["role"], "content": _message_text(message.get("content"), index)})
    tokenizer = served.tokenizer
    if not getattr(tokenizer, "has_chat_template", False):
        raise _invalid(f"the model '{served.model_id}' has no chat template; use /v1/completions", "messages")
    try:
        text = tokenizer.apply_chat_template(rendered, add_generation_prompt=True)
    except UserError as exc:
        raise _invalid(str(exc), "messages") from None
    return _encode(served, text, False, "messages")  # the template writes any BOS itself


# -- requests -------------------------------------------------------------------------------------
def parse_request(kind: str, body: Any, served: ServedModel) -> GenerationRequest:
    if not isinstance(body, dict):
        raise _invalid("the request body must be a JSON object", None)
    _check_model(body, served)
    _unsupported(body)
    prompt_ids = _completion_prompt(body, served) if kind == "completion" else _chat_prompt(body, served)
    if not prompt_ids:
        raise _invalid("the prompt is empty", "prompt" if kind == "completion" else "messages")
    # Tokens the request may generate: its whole life must fit the context and the pool (the last
    # sampled token is never cached, hence the + 1).
    room = min(served.context, served.pool_tokens + 1) - len(prompt_ids)
    if room < 1:
        raise _invalid(f"the prompt has {len(prompt_ids)} tokens, which leaves no room in the model's context "
                       f"({served.context}) or the KV pool ({served.pool_tokens} tokens)",
                       "messages" if kind == "chat" else "prompt")
    max_tokens = _integer(body, "max_completion_tokens", 1) if kind == "chat" else None
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    if max_tokens is None:  # OpenAI: 16 for completions; for chat, as much as the context allows
        max_tokens = 16 if kind == "completion" else room
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise _invalid("'stream_options' must be an object", "stream_options")
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1e-9,  # 0 (allowed by OpenAI) keeps the top token
        seed=_integer(body, "seed", 0),
        stop_token_ids=served.stop_token_ids)
    prefix = "cmpl" if kind == "completion" else "chatcmpl"
    return GenerationRequest(kind, prompt_ids, params, _flag(body, "stream"), _flag(stream_options, "include_usage"),
                             _stop_strings(body), f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time()))


# -- responses ------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def full_response(request: GenerationRequest, model_id: str, text: str, finish_reason: str,
                  completion_tokens: int) -> dict:
    if request.kind == "completion":
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        kind = "text_completion"
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
        kind = "chat.completion"
    return {"id": request.response_id, "object": kind, "created": request.created, "model": model_id,
            "choices": [choice], "usage": usage(len(request.prompt_ids), completion_tokens)}


def chunk(request: GenerationRequest, model_id: str, text: Optional[str], finish_reason: Optional[str] = None,
          role: bool = False) -> dict:
    """One streamed chunk: a text delta, the assistant role announcement, or the finish reason."""
    if request.kind == "completion":
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        kind = "text_completion"
    else:
        delta: dict = {}
        if role:
            delta["role"] = "assistant"
        if text:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        kind = "chat.completion.chunk"
    return {"id": request.response_id, "object": kind, "created": request.created, "model": model_id,
            "choices": [choice]}


def usage_chunk(request: GenerationRequest, model_id: str, completion_tokens: int) -> dict:
    kind = "text_completion" if request.kind == "completion" else "chat.completion.chunk"
    return {"id": request.response_id, "object": kind, "created": request.created, "model": model_id,
            "choices": [], "usage": usage(len(request.prompt_ids), completion_tokens)}


def models_list(served: ServedModel) -> dict:
    return {"object": "list", "data": [model_card(served)]}


def model_card(served: ServedModel) -> dict:
    return {"id": served.model_id, "object": "model", "created": served.created, "owned_by": "mindyouzhi",
            "max_model_len": served.context}
