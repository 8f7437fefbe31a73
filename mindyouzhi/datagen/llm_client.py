"""A small client for OpenAI-compatible chat endpoints (``/v1/chat/completions``).

Used by the LLM tagger, the paraphraser and ``data augment``; works against any such server,
including ``mindyouzhi serve``.  It adds what data generation needs and the bare HTTP call lacks:

* retries on connection errors, timeouts, HTTP 429 and 5xx: the wait is the server's
  ``Retry-After`` when it sends one (seconds or an HTTP date, capped at ``max_wait``), else
  exponential backoff, with random jitter either way so parallel workers do not retry in lockstep;
  a failure names the server's own error text (the OpenAI ``error.message`` or the body's start);
* a request cache (JSONL, append-only) keyed by the full request, so a re-run after a crash or
  with a different downstream step does not pay for the same completions twice — and a run with
  ``temperature=0`` replays exactly;
* ordered concurrent mapping with a bounded window, so streaming inputs stay streaming.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import email.utils
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from ..errors import UserError

RETRYABLE_HTTP = {408, 409, 425, 429, 500, 502, 503, 504}


class LLMError(Exception):
    """A reply that could not be used (no JSON, a missing field): the item is dropped, the run goes on."""


class EndpointError(UserError):
    """The endpoint itself failed (unreachable, timing out, answering errors) after every retry.

    A ``UserError``: the command stops with one line and exit code 2, its atomic output is not
    written, and the request cache keeps every completion already obtained, so a re-run resumes.
    """


class RequestCache:
    """Append-only JSONL of {key, content}; loaded once, appended under a lock (threads share it)."""

    def __init__(self, path: Optional[str | os.PathLike]):
        self.path = Path(path) if path else None
        self._entries: dict[str, str] = {}
        self._lock = threading.Lock()
        self.hits = 0
        if self.path and self.path.is_file():
            with open(self.path, encoding="utf-8") as handle:
                for line_no, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        entry = json.loads(line)
                        self._entries[entry["key"]] = entry["content"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        # A torn last line from a killed run is expected; anything else is not.
                        if line.endswith("\n"):
                            raise UserError(f"{self.path}:{line_no}: corrupt LLM cache entry; delete the cache file") from None

    def get(self, key: str) -> Optional[str]:
        with self._lock:
            content = self._entries.get(key)
            if content is not None:
                self.hits += 1
            return content

    def put(self, key: str, content: str) -> None:
        with self._lock:
            self._entries[key] = content
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps({"key": key, "content": content}, ensure_ascii=False) + "\n")


class LLMClient:
    def __init__(self, base_url: str, model: str = "default", timeout: float = 60.0, retries: int = 3,
                 backoff: float = 1.0, cache_path: Optional[str | os.PathLike] = None,
                 api_key: Optional[str] = None, flag: str = "--llm-url", max_wait: float = 60.0):
        if not re.match(r"^https?://", base_url or ""):
            raise UserError(f"{flag} {base_url!r}: expected an http(s):// URL of an OpenAI-compatible server")
        base = base_url.rstrip("/")
        if base.endswith("/chat/completions"):
            self.url = base
        else:
            self.url = base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
        self.model = model
        self.timeout = timeout
        self.retries = max(0, retries)
        self.backoff = backoff
        self.max_wait = max_wait
        self._sleep = time.sleep  # replaced in tests to observe the waits
        self.cache = RequestCache(cache_path)
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.flag = flag
        self.requests = 0
        self.failures = 0
        self._stats_lock = threading.Lock()

    def chat(self, messages: list[dict], temperature: float = 0.0, max_tokens: int = 1024,
             seed: Optional[int] = None) -> str:
        payload: dict[str, Any] = {"model": self.model, "messages": messages,
                                   "temperature": temperature, "max_tokens": max_tokens}
        if seed is not None:
            payload["seed"] = seed
        key = hashlib.sha256(json.dumps([self.url, payload], sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        content = self._post_with_retries(payload)
        self.cache.put(key, content)
        return content

    def ask(self, prompt: str, system: Optional[str] = None, **kwargs) -> str:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self.chat(messages, **kwargs)

    def ask_json(self, prompt: str, system: Optional[str] = None, attempts: int = 2, **kwargs) -> Any:
        """Ask for a JSON reply; a reply without parsable JSON is re-asked with a different seed."""
        last = ""
        base_seed = kwargs.pop("seed", 0) or 0
        for attempt in range(max(1, attempts)):
            last = self.ask(prompt, system=system, seed=base_seed + attempt, **kwargs)
            try:
                return extract_json(last)
            except ValueError:
                continue
        raise LLMError(f"no JSON in the reply from {self.url}: {last[:120]!r}")

    def _post_with_retries(self, payload: dict) -> str:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last_error = ""
        for attempt in range(self.retries + 1):
            retry_after = None
            with self._stats_lock:
                self.requests += 1
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return _completion_text(json.loads(response.read().decode("utf-8")))
            except urllib.error.HTTPError as exc:
                last_error = f"HTTP {exc.code}: {_error_text(exc)}"
                retry_after = _retry_after_seconds(exc.headers.get("Retry-After") if exc.headers else None)
                if exc.code not in RETRYABLE_HTTP:
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                last_error = str(getattr(exc, "reason", exc))
            except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
                last_error = f"malformed response, not an OpenAI chat completion ({exc})"
            if attempt < self.retries:
                self._sleep(self._wait(attempt, retry_after))
        with self._stats_lock:
            self.failures += 1
        raise EndpointError(f"{self.flag} {self.url}: request failed after {attempt + 1} attempt(s): {last_error}")

    def _wait(self, attempt: int, retry_after: Optional[float]) -> float:
        """Seconds before retry ``attempt + 1``: the server's Retry-After, else exponential backoff;
        plus up to 25% random jitter, never past ``max_wait``."""
        base = retry_after if retry_after is not None else self.backoff * 2**attempt
        return min(self.max_wait, base * (1 + 0.25 * random.random()))

    def stats(self) -> dict:
        return {"url": self.url, "model": self.model, "http_requests": self.requests,
                "cache_hits": self.cache.hits, "failed_requests": self.failures}


def _error_text(error: urllib.error.HTTPError, limit: int = 200) -> str:
    """The server's explanation: OpenAI-style ``{"error": {"message": ...}}``, else the body's start."""
    try:
        body = error.read().decode("utf-8", errors="replace")
    except OSError:
        body = ""
    try:
        detail = json.loads(body)
        if isinstance(detail, dict):
            inner = detail.get("error", detail)
            message = inner.get("message") if isinstance(inner, dict) else inner
            if message:
                body = str(message)
    except json.JSONDecodeError:
        pass
    text = " ".join(body.split()) or str(error.reason or "")
    return text[:limit] + ("…" if len(text) > limit else "")


def _retry_after_seconds(value: Optional[str]) -> Optional[float]:
    """``Retry-After`` as seconds: a number of seconds or an HTTP date; None when absent/unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _completion_text(reply: dict) -> str:
    content = reply["choices"][0]["message"]["content"]
    if not isinstance(content, str):
        raise TypeError("message content is not a string")
    return content


_FENCE_RE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def extract_json(text: str) -> Any:
    """The first JSON object or array in an LLM reply (tolerates ```json fences and chatter)."""
    candidates = [m.group(1) for m in _FENCE_RE.finditer(text)] + [text]
    decoder = json.JSONDecoder()
    for candidate in candidates:
        for index, char in enumerate(candidate):
            if char in "{[":
                try:
                    value, _ = decoder.raw_decode(candidate[index:])
                    return value
                except json.JSONDecodeError:
                    continue
    raise ValueError("no JSON value found")


def map_ordered(function: Callable[[Any], Any], items: Iterable[Any], workers: int,
                window: Optional[int] = None) -> Iterator[Any]:
    """``map`` with ``workers`` threads, results in input order, at most ``window`` items in flight.

    The bounded window keeps memory flat on inputs larger than RAM while requests overlap.
    """
    if workers <= 1:
        yield from map(function, items)
        return
    window = window or workers * 4
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
