"""The OpenAI-compatible HTTP server (standard library only).

One thread per connection (``ThreadingHTTPServer``) parses and validates the request, hands it to
the shared ``EngineThread`` and writes the answer: a JSON object, or with ``"stream": true``
server-sent events (``data: {...}`` chunks, then ``data: [DONE]``) over chunked transfer encoding.
A client that disconnects cancels its request, which frees its KV blocks at the next engine step:
mid-stream the failed write shows it, and while a non-streaming request generates, the handler
polls its socket (a readable socket with nothing to read is a closed one — so a client that
half-closes its side after sending counts as gone).  A connection idle for ``read_timeout``
seconds before its request line is closed; a body must arrive whole within ``read_timeout``
seconds (else 408).  The body framing is checked before a byte of it is read: a missing, malformed,
negative or conflicting ``Content-Length`` is 411/400, one above ``max_body_bytes`` is 413, and a
``Transfer-Encoding`` (chunked) body is 411 — each answered at once, on a connection then closed.
Errors are JSON ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status for anything
the client can fix, 5xx otherwise — also http.server's own refusals (oversized header lines,
malformed request lines) and any method but GET/POST (405 with an ``Allow`` header).

Endpoints: ``GET /health``, ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``,
``POST /v1/chat/completions``.  There is no authentication: bind to loopback (the default) unless
the network in front of it is trusted.
"""
from __future__ import annotations

import json
import re
import select
import socket
import sys
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from mindyouzhi.errors import UserError

from . import protocol
from .engine_thread import EngineFailure, EngineThread
from .protocol import GenerationRequest, ProtocolError, ServedModel
from .text_stream import IncrementalDetokenizer, StopStrings

MAX_BODY_BYTES = 16 << 20
DEFAULT_READ_TIMEOUT = 60.0
# A socket timeout while writing means the client stopped reading: treated as gone.
_DISCONNECTS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)
_GENERATION_PATHS = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}
_DIGITS = re.compile(r"[0-9]+")


def allowed_methods(path: str) -> str | None:
    """The ``Allow`` value of a route (None: no such route)."""
    if path in _GENERATION_PATHS:
        return "POST"
    if path in ("/health", "/v1/models") or path.startswith("/v1/models/"):
        return "GET"
    return None


class OpenAIServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung client never keeps the process alive
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], engine: EngineThread, served: ServedModel, log_requests: bool = False,
                 read_timeout: float = DEFAULT_READ_TIMEOUT, max_body_bytes: int = MAX_BODY_BYTES):
        self.engine = engine
        self.served = served
        self.log_requests = log_requests
        self.read_timeout = read_timeout
        self.max_body_bytes = max_body_bytes
        super().__init__(address, OpenAIHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class OpenAIHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # What a malformed request line is answered as: HTTP/0.9 (http.server's default) would send the
    # JSON error without a status line.
    default_request_version = "HTTP/1.0"
    server: OpenAIServer

    def setup(self) -> None:
        # StreamRequestHandler applies ``timeout`` to the socket; http.server closes the
        # connection when a read times out, so an idle client cannot hold its thread forever.
        self.timeout = self.server.read_timeout
        super().setup()

    def _client_connected(self) -> bool:
        """False once the client closed its end (readable with nothing to read) or reset it."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return not readable or bool(self.connection.recv(1, socket.MSG_PEEK))
        except (OSError, ValueError):
            return False

    # -- routing ----------------------------------------------------------------------------------
    def do_GET(self):  # noqa: N802 (http.server's naming)
        self._dispatch(self._get)

    def do_POST(self):  # noqa: N802
        self._dispatch(self._post)

    def _other_method(self):
        self._dispatch(self._refuse_method)

    do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _other_method  # noqa: N815

    def _dispatch(self, route) -> None:
        self._streaming = False
        try:
            route(self.path.split("?", 1)[0].rstrip("/") or "/")
        except ProtocolError as exc:
            self._send_json(exc.status, exc.body(), exc.headers)
        except _DISCONNECTS:
            self.close_connection = True
        except Exception:  # noqa: BLE001 - a bug answers 500 instead of dropping the connection
            traceback.print_exc(file=sys.stderr)
            self.close_connection = True
            if not self._streaming:  # mid-stream the status line is long gone: only close
                try:
                    self._send_json(500, ProtocolError(500, "internal server error", kind="server_error").body())
                except OSError:
                    pass

    def _refuse_method(self, path: str) -> None:
        self._discard_body()
        raise self._no_route(path)

    def _no_route(self, path: str) -> ProtocolError:
        allowed = allowed_methods(path)
        if allowed is None:
            return ProtocolError(404, f"no route for {self.command} {path}")
        return ProtocolError(405, f"{path} accepts {allowed} only, not {self.command}", headers={"Allow": allowed})

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (request line or header line too long, too many headers, a
        malformed request line, an unknown method) as JSON errors like every other answer."""
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        text = message or self.responses.get(code, ("error",))[0]
        kind = "invalid_request_error" if code < 500 else "server_error"
        try:
            self._send_json(code, ProtocolError(code, text, kind=kind).body())
        except OSError:
            pass

    def _get(self, path: str) -> None:
        self._discard_body()
        served = self.server.served
        if path == "/health":
            engine = self.server.engine.engine
            healthy = self.server.engine.is_alive()
            self._send_json(200 if healthy else 503, {
                "status": "ok" if healthy else "engine stopped", "model": served.model_id,
                "running": engine.num_running, "waiting": engine.num_waiting, "kv_pool": engine.describe()})
        elif path == "/v1/models":
            self._send_json(200, protocol.models_list(served))
        elif path.startswith("/v1/models/"):
            if path[len("/v1/models/"):] != served.model_id:
                raise ProtocolError(404, f"The model '{path[len('/v1/models/'):]}' does not exist", code="model_not_found")
            self._send_json(200, protocol.model_card(served))
        else:
            raise self._no_route(path)

    def _post(self, path: str) -> None:
        if path not in _GENERATION_PATHS:
            self._refuse_method(path)
        request = protocol.parse_request(_GENERATION_PATHS[path], self._read_json(), self.server.served)
        try:
            stream = self.server.engine.submit(request.prompt_ids, request.params)
        except UserError as exc:
            raise ProtocolError(400, str(exc)) from None
        except EngineFailure as exc:
            raise ProtocolError(503, str(exc), kind="server_error") from None
        if request.stream:
            self._stream(request, stream)
        else:
            self._complete(request, stream)

    # -- bodies -----------------------------------------------------------------------------------
    def _content_length(self) -> int | None:
        """The announced body size (None: no body announced).  Anything that leaves the end of the
        body unknown — a Transfer-Encoding, a malformed, negative or conflicting Content-Length —
        or a size above the limit is refused here, before a byte is read, and closes the connection."""
        if self.headers.get("Transfer-Encoding") is not None:
            self.close_connection = True
            raise ProtocolError(411, "Transfer-Encoding (chunked) bodies are not supported: send a Content-Length "
                                     "header")
        values = {value.strip() for value in self.headers.get_all("Content-Length") or ()}
        if not values:
            return None
        if len(values) > 1:
            self.close_connection = True
            raise ProtocolError(400, f"conflicting Content-Length headers {sorted(values)}: send one")
        text = values.pop()
        if not _DIGITS.fullmatch(text):
            self.close_connection = True
            raise ProtocolError(400, f"invalid Content-Length {text!r}: expected one non-negative integer")
        digits = text.lstrip("0") or "0"
        if len(digits) > 18 or int(digits) > self.server.max_body_bytes:
            self.close_connection = True
            raise ProtocolError(413, f"request body of {digits} bytes is larger than the limit of "
                                     f"{self.server.max_body_bytes} bytes")
        return int(digits)

    def _read_body(self, size: int) -> bytes:
        """Exactly ``size`` bytes, arriving within ``read_timeout`` seconds all told (408 if not,
        400 if the client closes first): a trickling client cannot hold the thread for longer."""
        timeout = self.server.read_timeout
        deadline = time.monotonic() + timeout
        chunks, received = [], 0
        try:
            while received < size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                self.connection.settimeout(remaining)
                data = self.rfile.read1(min(size - received, 1 << 16))
                if not data:
                    self.close_connection = True
                    raise ProtocolError(400, f"the body ended after {received} of the {size} bytes its "
                                             f"Content-Length announced")
                chunks.append(data)
                received += len(data)
        except TimeoutError:
            self.close_connection = True
            raise ProtocolError(408, f"the body did not arrive within {timeout:g} s: {received} of {size} bytes "
                                     f"received") from None
        finally:
            if not self.close_connection:
                self.connection.settimeout(timeout)
        return b"".join(chunks)

    def _read_json(self):
        size = self._content_length()
        if size is None:
            self.close_connection = True
            raise ProtocolError(411, "a Content-Length header is required")
        raw = self._read_body(size)
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:  # ValueError: JSONDecodeError, integers over 4300 digits
            raise ProtocolError(400, f"the body is not valid JSON: {exc}") from None
        except RecursionError:
            raise ProtocolError(400, "the body is not valid JSON: arrays or objects nested too deeply") from None

    def _discard_body(self) -> None:
        """Read and drop the body of a request refused without it (keeps the connection usable);
        a body that cannot be framed or read closes the connection instead."""
        try:
            size = self._content_length()
            if size:
                self._read_body(size)
        except ProtocolError:
            self.close_connection = True

    # -- answers ----------------------------------------------------------------------------------
    def _complete(self, request: GenerationRequest, stream) -> None:
        detokenizer = IncrementalDetokenizer(self.server.served.tokenizer)
        stops = StopStrings(request.stop)
        pieces, produced, finish_reason = [], 0, "length"
        stream.watch = self._client_connected
        try:
            for event in stream:
                produced += 1
                text, stopped = stops.feed(detokenizer.push(event.token_id))
                pieces.append(text)
                if stopped:
                    stream.cancel()
                    finish_reason = "stop"
                    break
                if event.finish_reason is not None:
                    finish_reason = event.finish_reason
                    tail, _ = stops.feed(detokenizer.flush())
                    pieces.append(tail + stops.flush())
        except EngineFailure as exc:
            raise ProtocolError(500, f"generation failed: {exc}", kind="server_error") from None
        if stream.abandoned:  # nobody to answer; the engine frees the blocks at its next step
            self.close_connection = True
            return
        self._send_json(200, protocol.full_response(request, self.server.served.model_id, "".join(pieces),
                                                    finish_reason, produced))

    def _stream(self, request: GenerationRequest, stream) -> None:
        model_id = self.server.served.model_id
        detokenizer = IncrementalDetokenizer(self.server.served.tokenizer)
        stops = StopStrings(request.stop)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._streaming = True
        produced = 0
        try:
            if request.kind == "chat":
                self._send_event(protocol.chunk(request, model_id, None, role=True))
            finish_reason = None
            for event in stream:
                produced += 1
                text, stopped = stops.feed(detokenizer.push(event.token_id))
                if stopped:
                    stream.cancel()
                    finish_reason = "stop"
                elif event.finish_reason is not None:
                    finish_reason = event.finish_reason
                    tail, _ = stops.feed(detokenizer.flush())
                    text += tail + stops.flush()
                if text:
                    self._send_event(protocol.chunk(request, model_id, text))
                if finish_reason is not None:
                    break
            self._send_event(protocol.chunk(request, model_id, None, finish_reason=finish_reason))
            if request.include_usage:
                self._send_event(protocol.usage_chunk(request, model_id, produced))
        except EngineFailure as exc:
            self._send_event(ProtocolError(500, f"generation failed: {exc}", kind="server_error").body())
        except _DISCONNECTS:
            stream.cancel()
            self.close_connection = True
            return
        self._send_chunk(b"data: [DONE]\n\n")
        self._send_chunk(b"")

    def _send_event(self, payload: dict) -> None:
        self._send_chunk(b"data: " + json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n\n")

    def _send_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode("ascii") + data + b"\r\n")
        self.wfile.flush()

    def _send_json(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        if self.server.log_requests:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")


def make_server(engine: EngineThread, served: ServedModel, host: str = "127.0.0.1", port: int = 0,
                log_requests: bool = False, read_timeout: float = DEFAULT_READ_TIMEOUT,
                max_body_bytes: int = MAX_BODY_BYTES) -> OpenAIServer:
    """Bind (port 0 = any free port; see ``server.url``); call ``serve_forever`` to run."""
    return OpenAIServer((host, port), engine, served, log_requests, read_timeout, max_body_bytes)


def served_model(engine, model_id: str) -> ServedModel:
    """Describe the engine's model for the protocol layer (stop ids: the tokenizer's and config's EOS)."""
    runner = engine.runner
    stop_ids = {token for token in (getattr(runner.tokenizer, "eos_token_id", None), runner.config.eos_token_id)
                if token is not None}
    return ServedModel(model_id, runner.tokenizer, engine.model.max_positions, engine.pool.usable_tokens,
                       tuple(sorted(stop_ids)))

