"""The OpenAI-compatible HTTP server (standard library only).

One thread per connection (``ThreadingHTTPServer``) parses and validates the request, hands it to
the shared ``EngineThread`` and writes the answer: a JSON object, or with ``"stream": true``
server-sent events (``data: {...}`` chunks, then ``data: [DONE]``) over chunked transfer encoding.
A client that disconnects cancels its request, which frees its KV blocks at the next engine step:
mid-stream the failed write shows it, and while a non-streaming request generates, the handler
polls its socket (a readable socket with nothing to read is a closed one — so a client that
half-closes its side after sending counts as gone).  A connection idle for ``read_timeout``
seconds (no request line, or a body that stops arriving) is closed, and a body above
``max_body_bytes`` is refused with 413 before it is read.  Errors are JSON ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status
for anything the client can fix, 5xx otherwise.

Endpoints: ``GET /health``, ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``,
``POST /v1/chat/completions``.  There is no authentication: bind to loopback (the default) unless
the network in front of it is trusted.
"""
from __future__ import annotations

import json
import select
import socket
import sys
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

    def _dispatch(self, route) -> None:
        try:
            route(self.path.split("?", 1)[0].rstrip("/") or "/")
        except ProtocolError as exc:
            self._send_json(exc.status, exc.body())
        except _DISCONNECTS:
            self.close_connection = True

    def _get(self, path: str) -> None:
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
        elif path in ("/v1/completions", "/v1/chat/completions"):
            raise ProtocolError(405, f"{path} accepts POST only")
        else:
            raise ProtocolError(404, f"no route for GET {path}")

    def _post(self, path: str) -> None:
        kinds = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}
        if path not in kinds:
            self._discard_body()
            raise ProtocolError(404, f"no route for POST {path}")
        request = protocol.parse_request(kinds[path], self._read_json(), self.server.served)
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
    def _read_json(self):
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or length is None:
            self.close_connection = True
            raise ProtocolError(411, "a Content-Length header is required")
        try:
            size = int(length)
        except ValueError:
            self.close_connection = True
            raise ProtocolError(400, "invalid Content-Length") from None
        if size > self.server.max_body_bytes:
            self.close_connection = True
            raise ProtocolError(413, f"request body of {size} bytes is larger than the limit of "
                                     f"{self.server.max_body_bytes} bytes")
        raw = self.rfile.read(size)
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProtocolError(400, f"the body is not valid JSON: {exc}") from None

    def _discard_body(self) -> None:
        length = self.headers.get("Content-Length")
        if length and length.isdigit() and int(length) <= self.server.max_body_bytes:
            self.rfile.read(int(length))
        else:
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

    def _send_json(self, status: int, payload: dict) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
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

