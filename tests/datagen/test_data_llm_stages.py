"""The LLM data stages against a real OpenAI-compatible server: ``mindyouzhi serve`` on 127.0.0.1
with a tiny converted model, started as a subprocess (port 0) and stopped by its pid.

The tiny model answers with words such as ``w14 w33``: never JSON, never the numbers asked for.
So these tests check the wire path end to end — requests reach the server, replies come back, and
every stage does the right thing with an unusable reply (falls back, rejects and counts, or stops
with one line and writes nothing).  The stages' success paths on well-formed replies are covered
with scripted clients below and with the stub server in test_data_augment.py.  The client's
retry policy (server error text, Retry-After, jitter) is tested against a local http.server.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler

import pytest
from click.testing import CliRunner

from mindyouzhi.datagen.amount_tasks import check_llm_instruction, llm_templates, load_seeds
from mindyouzhi.datagen.cli import data
from mindyouzhi.datagen.jsonl import BadLines
from mindyouzhi.datagen.llm_client import EndpointError, LLMClient, _retry_after_seconds
from mindyouzhi.datagen.refusal import RefusalSettings, check_settings, make_item, numbers_in
from http_stub import local_http_server
from serve_models import build_serve_models

SERVE_START_TIMEOUT = 120
UNREACHABLE = "http://127.0.0.1:1/v1"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """URL of ``mindyouzhi serve`` running the tiny MLA model."""
    models = build_serve_models(tmp_path_factory.getbasetemp() / "serve-models")
    command = [sys.executable, "-c", "from mindyouzhi.cli import main; main()", "serve", "--model", str(models["mla"]),
               "--port", "0", "--kv-memory", "64MiB", "--served-model-name", "tiny"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, "MINDYOUZHI_NO_PROGRESS": "1"})
    found = {}

    def read_banner():
        line = process.stdout.readline()
        found["line"] = line

    reader = threading.Thread(target=read_banner, daemon=True)
    reader.start()
    reader.join(SERVE_START_TIMEOUT)
    try:
        line = found.get("line", "")
        assert " at http://127.0.0.1:" in line, f"mindyouzhi serve did not start: {line!r}"
        yield line.split(" at ")[1].split()[0]  # http://127.0.0.1:PORT/v1
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def run(args):
    return CliRunner().invoke(data, [*args, "--no-progress"])


def test_served_model_replies_through_the_client(served):
    client = LLMClient(served, model="tiny", retries=0)
    reply = client.ask("w1 w2 w3", max_tokens=8)
    assert reply.strip() and client.requests == 1


def test_augment_with_unusable_replies_stops_and_writes_nothing(served, tmp_path):
    out, cache = tmp_path / "aug.jsonl", tmp_path / "cache.jsonl"
    result = run(["augment", "--out", str(out), "--count", "2", "--llm-url", served, "--llm-model", "tiny",
                  "--domains", "loan", "--fanout", "2", "--llm-cache", str(cache)])
    assert result.exit_code == 2
    message = result.output.strip()
    assert "\n" not in message and "no instruction could be generated" in message and "no JSON in the reply" in message
    assert not out.exists() and not list(tmp_path.glob("aug.jsonl.tmp-*"))
    # What was obtained is kept: the replies are in the request cache for a re-run.
    assert len(cache.read_text(encoding="utf-8").splitlines()) > 0


@pytest.mark.parametrize("args", [
    ["augment", "--count", "2", "--llm-url", UNREACHABLE],
    ["refusal", "--count", "2", "--paraphrase-url", UNREACHABLE],
    ["amounts", "generate", "--count", "2", "--llm-url", UNREACHABLE],
])
def test_unreachable_endpoint_is_one_line_exit_2_nothing_written(tmp_path, args):
    out = tmp_path / "o.jsonl"
    result = run([*args, "--out", str(out), "--llm-retries", "0", "--llm-timeout", "5"])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "127.0.0.1:1" in result.output and "Connection refused" in result.output
    assert not out.exists() and not list(tmp_path.iterdir())


def test_compress_llm_tagger_against_served_model(served, tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps({"instruction": "w1 w2", "output": "w3 w4"}) + "\n", encoding="utf-8")
    out = tmp_path / "kept.jsonl"
    result = run(["compress", str(pool), "--out", str(out), "--budget", "1", "--budget-unit", "samples",
                  "--tagger-url", served, "--tagger-model", "tiny"])
    assert result.exit_code == 2
    assert "tagging failed" in result.output and served in result.output and not out.exists()


def test_refusal_language_stage_against_served_model(served, tmp_path):
    out = tmp_path / "refusal.jsonl"
    result = run(["refusal", "--out", str(out), "--count", "2", "--paraphrase-url", served,
                  "--paraphrase-model", "tiny", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    items = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    # The tiny model's text never states the facts' numbers, so every item keeps its template question.
    assert summary["llm"]["http_requests"] == 2 and summary["paraphrased"] == 0
    assert len(items) == 2 and all(not item["paraphrased"] for item in items)


def test_amount_templates_against_served_model(served, tmp_path):
    out = tmp_path / "amounts.jsonl"
    result = run(["amounts", "generate", "--out", str(out), "--count", "5", "--llm-url", served, "--llm-model", "tiny",
                  "--llm-templates", "4", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["llm"]["http_requests"] == 4
    assert sum(summary["llm_rejected"].values()) + sum(summary["llm_templates"].values()) == 4
    assert summary["items"] == 5


class ScriptedClient:
    """Replies in order; records prompts (for the success paths the tiny model cannot produce)."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.prompts = []

    def ask(self, prompt, **kwargs):
        self.prompts.append(prompt)
        return self.replies.pop(0)


def test_treecut_language_stage_keeps_text_stating_exactly_the_facts():
    settings = RefusalSettings(count=1, seed=3, unanswerable_ratio=0.0, languages=("en",))
    depths = check_settings(settings)
    template = make_item(0, settings, depths)
    facts_numbers = numbers_in(template["question"])
    good = "A customer asks: " + ", ".join(facts_numbers) + " — what is it?"
    client = ScriptedClient([good])
    item = make_item(0, settings, depths, client)
    assert item["paraphrased"] and item["question"] == good and item["template_question"] == template["question"]
    assert "Facts:" in client.prompts[0] and all(number in client.prompts[0].replace(",", "") for number in facts_numbers)
    leaked = ScriptedClient([good + " 99999"])  # a number that is not a fact: rejected
    assert not make_item(0, settings, depths, leaked)["paraphrased"]


def test_amount_llm_templates_are_checked_and_used():
    templates = load_seeds(None, BadLines(), False)
    assert check_llm_instruction("请把报销单上的金额{amount}写成中文大写。", set()) is None
    assert "exactly once" in check_llm_instruction("请把金额写成大写。", set())
    assert "another amount" in check_llm_instruction("第2张报销单金额{amount}，请写成大写。", set())
    assert "another amount" in check_llm_instruction("把{amount}和壹佰元整相加。", set())
    stats = {"llm_templates": Counter(), "llm_rejected": Counter()}
    client = ScriptedClient(["请把工程合同中的金额{amount}写成中文大写金额。", "no placeholder here"])
    made = llm_templates(client, templates, 2, 0, stats)
    assert len(made) == 1 and made[0].seed_id.startswith("llm-self-instruct")
    assert stats["llm_rejected"] == Counter({"evol-instruct: placeholder {amount} not exactly once": 1})
    assert "{amount}" in client.prompts[0] and "{amount}" in client.prompts[1]


class RateLimited(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server naming
        state = self.server.state
        self.rfile.read(int(self.headers["Content-Length"]))
        state["calls"] += 1
        if state["calls"] <= len(state["script"]):
            status, headers, body = state["script"][state["calls"] - 1]
            payload = body.encode()
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
        else:
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": "ok"}}]}).encode()
            self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted_http():
    with local_http_server(RateLimited, {"calls": 0, "script": []}) as server:
        yield server


def _client(server, **kwargs):
    client = LLMClient(f"http://127.0.0.1:{server.server_address[1]}/v1", **kwargs)
    client.waits = []
    client._sleep = client.waits.append
    return client


def test_retry_after_is_honoured_with_jitter(scripted_http):
    scripted_http.state["script"] = [(429, {"Retry-After": "2"}, '{"error": {"message": "slow down"}}')] * 2
    client = _client(scripted_http, retries=3, backoff=0.01)
    assert client.ask("hi") == "ok" and client.requests == 3
    assert len(client.waits) == 2 and all(2.0 <= wait <= 2.5 for wait in client.waits)
    assert len(set(client.waits)) == 2  # jittered, not lockstep
    # Without Retry-After: exponential backoff (0.5, 1.0) plus at most 25% jitter; capped by max_wait.
    scripted_http.state.update(calls=0, script=[(503, {}, "busy")] * 2)
    client = _client(scripted_http, retries=2, backoff=0.5, max_wait=0.8)
    assert client.ask("hi again") == "ok"
    assert 0.5 <= client.waits[0] <= 0.625 and client.waits[1] == 0.8


def test_server_error_text_is_reported(scripted_http):
    scripted_http.state["script"] = [(400, {}, '{"error": {"message": "max_tokens 99999 exceeds the context of 256"}}')]
    with pytest.raises(EndpointError, match="HTTP 400: max_tokens 99999 exceeds the context of 256") as error:
        _client(scripted_http, retries=3).ask("too long")
    assert "after 1 attempt" in str(error.value)  # a 400 is not retried
    scripted_http.state.update(calls=0, script=[(502, {}, "<html>bad   gateway</html>")] * 3)
    with pytest.raises(EndpointError, match="HTTP 502: <html>bad gateway</html>"):
        _client(scripted_http, retries=2).ask("proxy down")


def test_retry_after_parsing():
    assert _retry_after_seconds("7") == 7.0 and _retry_after_seconds(None) is None
    assert _retry_after_seconds("soon") is None
    assert 25 <= _retry_after_seconds(formatdate(__import__("time").time() + 30, usegmt=True)) <= 30
