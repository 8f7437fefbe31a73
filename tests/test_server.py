"""The OpenAI-compatible HTTP server: a real socket on 127.0.0.1 (port 0), concurrent clients,
streaming and not, and 4xx JSON errors for bad requests.  Every call has a timeout and the
server is shut down by the fixture, so a failure can never hang the suite."""
import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from mindyouzhi.models.runner import ModelRunner
from mindyouzhi.serve.engine import Engine, EngineOptions
from mindyouzhi.serve.engine_thread import EngineThread
from mindyouzhi.serve.http_server import make_server, served_model
from mindyouzhi.serve.sampling import SamplingParams
from mindyouzhi.serve.text_stream import IncrementalDetokenizer, StopStrings
from serve_models import build_serve_models

TIMEOUT = 60
MODEL_ID = "tiny-mla"
PROMPTS = ["w1 w2 w3", "w5", "w9 w8 w7 w6 w5 w4", "w20 w21", "w3 w3 w3 w3 w3 w3 w3 w3 w3 w3 w3", "w40 w41 w42"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = build_serve_models(tmp_path_factory.getbasetemp() / "serve-models")
    runner = ModelRunner.from_dir(models["mla"])
    # Offline greedy reference, computed before the engine thread owns MindSpore.
    prompt_ids = runner.tokenizer.encode(PROMPTS[2], add_bos=runner.tokenizer.add_bos_token)
    offline = Engine(runner, EngineOptions(num_blocks=16, block_size=4)).generate(
        [prompt_ids], SamplingParams(max_new_tokens=6))[0]
    engine = Engine(runner, EngineOptions(num_blocks=48, block_size=4, max_batch=8))
    worker = EngineThread(engine).start()
    http = make_server(worker, served_model(engine, MODEL_ID), "127.0.0.1", 0)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    http.offline_text = runner.tokenizer.decode(offline.output_ids)
    try:
        yield http
    finally:
        http.shutdown()
        http.server_close()
        worker.stop(timeout=TIMEOUT)
        thread.join(TIMEOUT)
    assert not worker.is_alive()


def request(server, path, body=None, raw=None, method=None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(server.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as response:
            return response.status, response.headers.get("Content-Type"), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type"), error.read().decode()


def completion(server, prompt, stream=False, **extra):
    body = {"model": MODEL_ID, "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": stream, **extra}
    return request(server, "/v1/completions", body)


def sse_events(text):
    assert text.endswith("data: [DONE]\n\n")
    return [json.loads(line[len("data: "):]) for line in text.split("\n\n") if line.startswith("data: {")]


def test_concurrent_streaming_and_plain_requests_agree(server):
    with ThreadPoolExecutor(2 * len(PROMPTS)) as pool:
        plain = list(pool.map(lambda p: completion(server, p), PROMPTS))
        streamed = list(pool.map(lambda p: completion(server, p, stream=True), PROMPTS))
    for (status, kind, body), (stream_status, stream_kind, stream_body) in zip(plain, streamed):
        assert (status, kind, stream_status, stream_kind) == (200, "application/json", 200, "text/event-stream")
        answer = json.loads(body)
        choice = answer["choices"][0]
        chunks = sse_events(stream_body)
        assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
        assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"] in ("stop", "length")
        assert 1 <= answer["usage"]["completion_tokens"] <= 8 and answer["model"] == MODEL_ID
        assert answer["object"] == "text_completion" and all(c["id"] == chunks[0]["id"] for c in chunks)


def test_served_text_equals_offline_greedy_generation(server):
    status, _, body = completion(server, PROMPTS[2], max_tokens=6)
    assert status == 200 and json.loads(body)["choices"][0]["text"] == server.offline_text


def test_chat_completions_use_the_chat_template(server):
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "w1 w2"}], "max_tokens": 5, "temperature": 0}
    status, _, plain = request(server, "/v1/chat/completions", body)
    status_stream, _, streamed = request(server, "/v1/chat/completions", dict(body, stream=True,
                                                                              stream_options={"include_usage": True}))
    message = json.loads(plain)["choices"][0]["message"]
    chunks = sse_events(streamed)
    assert status == status_stream == 200 and message["role"] == "assistant"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == message["content"]
    assert chunks[-1]["usage"]["completion_tokens"] == 5 and chunks[-1]["choices"] == []
    # "w1 w2 " + "w7" (the template's generation prompt) is what the model saw
    assert json.loads(plain)["usage"]["prompt_tokens"] == 3


def test_seeded_sampling_is_reproducible_over_http(server):
    runs = [completion(server, PROMPTS[0], temperature=1.0, seed=3, max_tokens=6)[2] for _ in range(2)]
    texts = [json.loads(body)["choices"][0]["text"] for body in runs]
    assert texts[0] == texts[1]


def test_stop_strings_cut_the_text(server):
    texts = {prompt: json.loads(completion(server, prompt)[2])["choices"][0]["text"] for prompt in PROMPTS}
    prompt, text = next((p, t) for p, t in texts.items() if len(t.split()) >= 3)  # greedy output, long enough
    stop = text.split()[2]
    _, _, stopped = completion(server, prompt, stop=[stop])
    choice = json.loads(stopped)["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == text[: text.index(stop)]


@pytest.mark.parametrize("path, body, raw, status, param", [
    ("/v1/completions", None, b"{not json", 400, None),
    ("/v1/completions", {"model": MODEL_ID}, None, 400, "prompt"),
    ("/v1/chat/completions", {"model": MODEL_ID}, None, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "w1"}]}, None, 400, "messages"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "w1"}, None, 404, "model"),
    ("/v1/completions", {"prompt": "w1", "max_tokens": "ten"}, None, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "w1", "temperature": -1}, None, 400, "temperature"),
    ("/v1/completions", {"prompt": "w1", "n": 2}, None, 400, "n"),
    ("/v1/completions", {"prompt": ["w1", "w2"]}, None, 400, "prompt"),
    ("/v1/completions", {"prompt": [5, 999]}, None, 400, None),
    ("/v1/completions", {"prompt": "w1 " * 100, "max_tokens": 100}, None, 400, None),
    ("/v1/completions", [1, 2], None, 400, None),
    ("/v1/nothing", {"prompt": "w1"}, None, 404, None),
])
def test_bad_requests_get_4xx_json_errors(server, path, body, raw, status, param):
    got, kind, text = request(server, path, body, raw)
    error = json.loads(text)["error"]
    assert (got, kind) == (status, "application/json")
    assert error["message"] and error["type"] == "invalid_request_error" and error["param"] == param


def test_health_models_and_methods(server):
    status, _, health = request(server, "/health")
    assert status == 200 and json.loads(health)["status"] == "ok"
    status, _, models = request(server, "/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(models)["data"]] == [MODEL_ID]
    assert request(server, f"/v1/models/{MODEL_ID}")[0] == 200
    assert request(server, "/v1/models/other")[0] == 404
    assert request(server, "/v1/completions")[0] == 405


def test_server_binds_loopback_by_default(server):
    assert server.server_address[0] == "127.0.0.1"


# -- text streaming helpers -----------------------------------------------------------------------
class _ByteTokenizer:
    """Each id is one UTF-8 byte: characters span several tokens, as in byte-level BPE."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_incremental_detokenizer_never_emits_half_characters():
    text = "façade — 模型"
    decoder = IncrementalDetokenizer(_ByteTokenizer())
    deltas = [decoder.push(byte) for byte in text.encode("utf-8")] + [decoder.flush()]
    assert "".join(deltas) == text and all("\ufffd" not in delta for delta in deltas)


def test_stop_strings_hold_back_a_possible_prefix():
    stops = StopStrings(["END"])
    assert stops.feed("abc E") == ("abc ", False)
    assert stops.feed("N") == ("", False)
    assert stops.feed("X") == ("ENX", False)
    assert stops.feed("yy EN") == ("yy ", False)
    assert stops.feed("Dzz") == ("", True)


# -- robustness: idle connections, oversized bodies, abandoned requests ---------------------------
def _raw_connection(server):
    import socket

    host, port = server.server_address[:2]
    return socket.create_connection((host, port), timeout=TIMEOUT)


def test_an_idle_connection_is_closed_after_the_read_timeout(server, monkeypatch):
    import time

    monkeypatch.setattr(server, "read_timeout", 0.5)
    with _raw_connection(server) as sock:
        started = time.perf_counter()
        assert sock.recv(1) == b""  # the server closed it without a byte from us
        assert 0.4 < time.perf_counter() - started < 10


def test_a_body_above_the_limit_gets_413_json_before_it_is_read(server, monkeypatch):
    monkeypatch.setattr(server, "max_body_bytes", 1000)
    status, kind, text = request(server, "/v1/completions", raw=b"{" + b" " * 2000 + b"}")
    assert (status, kind) == (413, "application/json")
    assert "larger than the limit of 1000 bytes" in json.loads(text)["error"]["message"]


def test_a_disconnected_plain_request_is_cancelled_and_frees_its_blocks(server, monkeypatch):
    import dataclasses
    import time

    # No stop tokens: only max_tokens or the cancellation can end this request.
    monkeypatch.setattr(server, "served", dataclasses.replace(server.served, stop_token_ids=()))
    engine = server.engine.engine
    allocator = engine.pool.allocator
    decoded = engine.stats.decode_tokens
    max_tokens = 150
    body = json.dumps({"model": MODEL_ID, "prompt": "w1 w2", "max_tokens": max_tokens, "temperature": 0}).encode()
    with _raw_connection(server) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + TIMEOUT
        while engine.num_running == 0 and time.monotonic() < deadline:  # wait until it generates
            time.sleep(0.01)
        assert engine.num_running == 1
    deadline = time.monotonic() + TIMEOUT
    while (engine.num_running or allocator.num_free != allocator.usable_blocks) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.num_running == 0 and engine.num_waiting == 0
    assert allocator.num_free == allocator.usable_blocks  # pool usage back to zero
    assert engine.stats.decode_tokens - decoded < max_tokens - 1  # stopped early, not run to the end
