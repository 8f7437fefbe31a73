"""HTTP abuse against a real ``mindyouzhi serve`` process, and ``generate`` flags a user can get
wrong: every case is answered at once with a 4xx JSON error (405s with an ``Allow`` header), or
exit 2 and one line, never a hang, a dropped connection or a traceback; the server still answers
a normal request afterwards.

Each case goes over a raw socket (``http.client`` would refuse to send most of them) to a server
started on a free loopback port with a short ``--read-timeout``, so a hang shows as a failure
within seconds instead of the default minute.
"""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serve_models import build_serve_models

READ_TIMEOUT = 2.0  # the server's --read-timeout
ANSWER_WITHIN = 1.5  # seconds for an answer that must not wait for any timeout
HEADERS = b"Host: x\r\nContent-Type: application/json\r\n"


def _env() -> dict:
    env = dict(os.environ, MINDYOUZHI_NO_PROGRESS="1")
    env.setdefault("GLOG_v", "3")
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mindyouzhi.cli", *args]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_serve_models(tmp_path_factory.getbasetemp() / "serve-models")


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    """(host, port, stderr file) of a running ``mindyouzhi serve``; stopped (SIGTERM) afterwards."""
    log = tmp_path_factory.mktemp("serve-log") / "stderr.txt"
    with open(log, "wb") as stderr:
        process = subprocess.Popen(_cli("serve", "--model", str(models["mla"]), "--port", "0", "--kv-memory", "2MiB",
                                        "--read-timeout", str(READ_TIMEOUT)),
                                   stdout=subprocess.PIPE, stderr=stderr, env=_env())
    try:
        line = process.stdout.readline().decode()  # "serving NAME at http://127.0.0.1:PORT/v1 — …"
        assert line.startswith("serving "), (line, log.read_text())
        host, port = line.split("http://", 1)[1].split("/", 1)[0].rsplit(":", 1)
        yield host, int(port), log
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


class Response:
    def __init__(self, raw: bytes, seconds: float):
        self.seconds = seconds
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].startswith("HTTP/1."), raw[:200]
        self.status = int(lines[0].split()[1])
        self.headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}

    def error(self) -> dict:
        assert self.headers["content-type"] == "application/json"
        assert int(self.headers["content-length"]) == len(self.body)
        return json.loads(self.body)["error"]


def _read_response(sock: socket.socket, started: float, head: bool = False) -> Response:
    """One response: until its Content-Length is complete (just the head for HEAD), or the server closes."""
    raw = b""
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        raw += chunk
        head_part, sep, body = raw.partition(b"\r\n\r\n")
        if sep:
            length = [line.split(b":", 1)[1] for line in head_part.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")]
            if head or (length and len(body) >= int(length[0])):
                break
    assert raw, "the server closed the connection without a response"
    return Response(raw, time.monotonic() - started)


def _exchange(server, data: bytes, half_close: bool = False, head: bool = False) -> Response:
    host, port, _ = server
    started = time.monotonic()
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return _read_response(sock, started, head)


def _post(body: bytes, *extra_headers: bytes, length: bool = True) -> bytes:
    framing = b"Content-Length: %d\r\n" % len(body) if length else b""
    return b"POST /v1/completions HTTP/1.1\r\n" + HEADERS + framing + b"".join(h + b"\r\n" for h in extra_headers) \
        + b"\r\n" + body


COMPLETION = json.dumps({"prompt": "w1 w2 w3", "max_tokens": 3, "temperature": 0}).encode()

# name: (request bytes, expected status, words the error message must contain)
ABUSE = {
    "negative content-length": (_post(b"", b"Content-Length: -1", length=False), 400, "Content-Length"),
    "non-numeric content-length": (_post(b"", b"Content-Length: ten", length=False), 400, "Content-Length"),
    "unicode-digit content-length": (_post(b"", "Content-Length: \u00b2".encode("latin-1"), length=False), 400,
                                     "Content-Length"),
    "conflicting content-lengths": (_post(b"{}", b"Content-Length: 3"), 400, "Content-Length"),
    "content-length above the cap": (_post(b"", b"Content-Length: 99999999999", length=False), 413, "limit"),
    "content-length of 30 digits": (_post(b"", b"Content-Length: " + b"9" * 30, length=False), 413, "limit"),
    "no content-length": (_post(b"", length=False), 411, "Content-Length"),
    "chunked body": (_post(b"d\r\n" + COMPLETION[:13] + b"\r\n0\r\n\r\n", b"Transfer-Encoding: chunked", length=False),
                     411, "Transfer-Encoding"),
    "100,000 [": (_post(b"[" * 100_000), 400, "nested too deeply"),
    "100,000 {\"a\":": (_post(b'{"a":' * 100_000), 400, "nested too deeply"),
    "invalid UTF-8": (_post(b'{"prompt": "\xff\xfe"}'), 400, "utf-8"),
    "an integer of 5000 digits": (_post(b'{"prompt": [' + b"7" * 5000 + b"]}"), 400, "not valid JSON"),
    "an unpaired surrogate": (_post(b'{"prompt": "w1 \\ud800"}'), 400, "surrogate"),
    "NaN temperature": (_post(b'{"prompt": "w1", "temperature": NaN}'), 400, "temperature"),
    "header line over 64 KiB": (b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431, "too long"),
    "200 headers": (b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n",
                    431, "headers"),
    "request line over 64 KiB": (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414, "too long"),
    "garbage request line": (b"NOT A REQUEST LINE AT ALL\r\n\r\n", 400, "request"),
    "bad HTTP version": (b"GET /health HTTP/x.y\r\n\r\n", 400, "version"),
}


@pytest.mark.parametrize("name", list(ABUSE))
def test_malformed_requests_get_an_immediate_4xx_json_error(server, name):
    data, status, words = ABUSE[name]
    response = _exchange(server, data)
    error = response.error()
    assert response.status == status, error
    assert words.lower() in error["message"].lower() and error["type"] == "invalid_request_error"
    assert response.seconds < ANSWER_WITHIN, f"{name}: answered after {response.seconds:.1f} s"


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "HEAD"])
@pytest.mark.parametrize("path, allow", [("/v1/completions", "POST"), ("/v1/chat/completions", "POST"),
                                         ("/health", "GET"), ("/v1/models", "GET")])
def test_other_methods_get_405_json_with_an_allow_header(server, method, path, allow):
    body = b"" if method in ("HEAD", "TRACE") else COMPLETION
    response = _exchange(server, f"{method} {path} HTTP/1.1\r\n".encode() + HEADERS
                         + b"Content-Length: %d\r\n\r\n" % len(body) + body, head=method == "HEAD")
    assert (response.status, response.headers.get("allow")) == (405, allow)
    assert response.headers["content-type"] == "application/json"
    if method == "HEAD":
        assert response.body == b""
    else:
        error = response.error()
        assert method in error["message"] and allow in error["message"]
    assert response.seconds < ANSWER_WITHIN


def test_wrong_method_on_a_route_and_unknown_routes(server):
    get = _exchange(server, b"GET /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n")
    post = _exchange(server, b"POST /health HTTP/1.1\r\n" + HEADERS + b"Content-Length: 2\r\n\r\n{}")
    assert (get.status, get.headers["allow"], post.status, post.headers["allow"]) == (405, "POST", 405, "GET")
    for method in ("PUT", "GET", "POST"):
        missing = _exchange(server, f"{method} /v1/nothing HTTP/1.1\r\n".encode() + HEADERS
                            + b"Content-Length: 2\r\n\r\n{}")
        assert missing.status == 404 and "/v1/nothing" in missing.error()["message"]
    unknown = _exchange(server, b"BREW /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert unknown.status == 501 and "BREW" in unknown.error()["message"]


def test_a_refused_request_keeps_the_connection_usable(server):
    """A 405 (body read and dropped) then a real request on the same keep-alive connection."""
    host, port, _ = server
    put = b"PUT /v1/completions HTTP/1.1\r\n" + HEADERS + b"Content-Length: %d\r\n\r\n" % len(COMPLETION) + COMPLETION
    with socket.create_connection((host, port), timeout=60) as sock:
        sock.sendall(put)
        refused = _read_response(sock, time.monotonic())
        sock.sendall(_post(COMPLETION))
        answered = _read_response(sock, time.monotonic())
    assert (refused.status, answered.status) == (405, 200), answered.body
    assert "connection" not in refused.headers


def test_a_truncated_body_gets_408_within_the_read_timeout(server):
    response = _exchange(server, _post(COMPLETION)[:-5])
    assert response.status == 408
    assert f"{len(COMPLETION) - 5} of {len(COMPLETION)} bytes" in response.error()["message"]
    assert READ_TIMEOUT - 0.1 < response.seconds < READ_TIMEOUT + 3
    # a trickle does not reset the clock: the deadline is for the whole body
    host, port, _ = server
    started = time.monotonic()
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(_post(COMPLETION)[:-len(COMPLETION)])
        answer = b""
        for byte in COMPLETION[:-1]:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.1)
            sock.setblocking(False)
            try:
                answer += sock.recv(1 << 16)
            except (BlockingIOError, ConnectionResetError):
                pass
            sock.setblocking(True)
            if answer:
                break
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    assert time.monotonic() - started < READ_TIMEOUT + 3


def test_a_body_cut_short_by_the_client_gets_400(server):
    response = _exchange(server, _post(COMPLETION)[:-5], half_close=True)
    assert response.status == 400 and "ended after" in response.error()["message"]
    assert response.seconds < ANSWER_WITHIN


def test_the_server_still_answers_and_logged_no_traceback(server):
    response = _exchange(server, _post(COMPLETION))
    assert response.status == 200, response.body
    answer = json.loads(response.body)
    assert 1 <= answer["usage"]["completion_tokens"] <= 3 and answer["choices"][0]["finish_reason"] in ("stop", "length")
    health = _exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert health.status == 200 and json.loads(health.body)["status"] == "ok"
    assert "Traceback" not in server[2].read_text(errors="replace")


# -- generate -------------------------------------------------------------------------------------
def _generate(models, *args):
    done = subprocess.run(_cli("generate", "--model", str(models["mla"]), *args), capture_output=True, text=True,
                          env=_env(), timeout=240)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def _context(models) -> int:
    return json.loads((Path(models["mla"]) / "config.json").read_text())["max_position_embeddings"]


def test_generate_caps_max_new_tokens_at_the_context(models):
    context, prompt_tokens = _context(models), 250  # the test tokenizer: one token per word, no BOS
    done = _generate(models, "--prompt", " ".join(["w5"] * prompt_tokens), "--max-new-tokens", "1000000000", "--json")
    assert done.returncode == 0, done.stderr
    room = context - prompt_tokens
    notes = [line for line in done.stderr.splitlines() if line.startswith("note:")]
    assert notes == [f"note: --max-new-tokens 1000000000 capped at {room}: the model's context is {context} tokens "
                     f"and the prompt has {prompt_tokens}"]
    result = json.loads(done.stdout)
    assert result["prompt_tokens"] == prompt_tokens and 1 <= result["completion_tokens"] <= room


@pytest.mark.parametrize("args, words", [
    (["--prompt", " ".join(["w5"] * 300)], "--prompt: its 300 tokens fill the model's context"),
    (["--prompt", "w1", "--max-new-tokens", "0"], "--max-new-tokens 0"),
    (["--prompt", "w1", "--max-new-tokens", "-5"], "--max-new-tokens -5"),
    (["--prompt", "w1", "--temperature", "nan"], "--temperature nan"),
    (["--prompt", "w1", "--temperature", "-1"], "--temperature -1"),
    (["--prompt", "w1", "--top-p", "0"], "--top-p 0"),
    (["--prompt", "w1", "--top-p", "inf"], "--top-p inf"),
    (["--prompt", "w1", "--seed", "-1"], "--seed -1"),
])
def test_generate_refuses_impossible_flags_with_one_line(models, args, words):
    done = _generate(models, *args)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"error: {words}"), done.stderr
