"""data augment against a live local OpenAI-compatible stub (127.0.0.1 only, bounded, stops itself)."""
from __future__ import annotations

import hashlib
import json
import re
import time
from http.server import BaseHTTPRequestHandler

import pytest
from click.testing import CliRunner

from mindyouzhi.datagen.cli import data
from mindyouzhi.datagen.dedup import NearDuplicateFilter
from mindyouzhi.datagen.ifeval import verify
from mindyouzhi.datagen.llm_client import EndpointError, LLMClient, extract_json
from http_stub import local_http_server

MAX_REQUESTS = 5000  # the stub refuses more than this; the thread also stops at the end of the test


def _pick(prompt: str, options: list[str], salt: str) -> list[str]:
    digest = hashlib.sha256((prompt + salt).encode()).digest()
    return [options[(digest[i] + i) % len(options)] for i in range(3)]


def stub_reply(prompt: str, state: dict) -> str:
    """Deterministic completions keyed on what the prompt asks for."""
    if '"requests"' in prompt:
        return json.dumps({"requests": ["解释一个专业术语", "根据给定条件计算金额", "比较两种产品的优劣"]}, ensure_ascii=False)
    if '"scenarios"' in prompt:
        return "好的：```json\n" + json.dumps({"scenarios": ["刚参加工作准备第一次理财", "准备买房需要规划首付"]},
                                          ensure_ascii=False) + "\n```"
    if '"personas"' in prompt:
        return json.dumps({"personas": ["一位三十岁的程序员", "一位退休教师", "一位小微企业主"]}, ensure_ascii=False)
    if '"knowledge_points"' in prompt:
        points = ["贷款利率由LPR加点形成", "等额本息每月还款额相同", "大额存单起存金额为20万元", "外汇牌价分为现汇和现钞",
                  "个人所得税按年度综合所得计算"]
        return json.dumps({"knowledge_points": _pick(prompt, points, "kp")}, ensure_ascii=False)
    if '"instruction"' in prompt:
        fields = dict(re.findall(r"- (领域|请求类型|场景|用户画像|需要用到的知识点)：(.+)", prompt))
        # Persona, domain and request only: the stub repeats itself, which the dedup step must catch.
        text = f"我是{fields['用户画像']}。关于{fields['领域']}，请{fields['请求类型']}。"
        return json.dumps({"instruction": text}, ensure_ascii=False)
    if "##Complexity" in prompt:
        return "4"
    if "##Quality" in prompt:
        return "Quality score: 5"
    if '"domain"' in prompt:  # InsTag-style tagging
        return json.dumps({"domain": "fx" if "汇率" in prompt else "loan",
                           "tags": [{"tag": "calculation", "explanation": "asks for a number"}]})
    if '"pass"' in prompt:
        return json.dumps({"pass": "拒绝" not in prompt, "reason": "回答切题"}, ensure_ascii=False)
    question = state["first_user"].split("\n\n")[0]  # answers echo the question, not the requirements
    return f"您的问题是：{question}\n\n分析如下：需要结合利率、期限和个人情况综合判断。\n\n结论：建议先评估风险承受能力再做决定。"


class StubHandler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server naming
        state = self.server.state
        state["requests"] += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        state["first_user"] = next(m["content"] for m in body["messages"] if m["role"] == "user")
        if state["requests"] > MAX_REQUESTS or self.path != "/v1/chat/completions":
            self.send_error(404)
            return
        if "FLAKY" in prompt and state["flaky"] > 0:
            state["flaky"] -= 1
            self.send_error(503)
            return
        if "SLOW" in prompt:
            time.sleep(0.5)
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": stub_reply(prompt, state)}}]},
                             ensure_ascii=False).encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        try:
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client already gave up: that is what the timeout test provokes

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_server():
    with local_http_server(StubHandler, {"requests": 0, "flaky": 2}, wait_for_handlers=True) as server:
        yield server


def url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/v1"


def test_augment_end_to_end(stub_server, tmp_path):
    existing = tmp_path / "existing.jsonl"
    rows = [{"instruction": f"房贷提前还款{i}万元划算吗？", "output": "需要比较贷款利率和理财收益。"} for i in range(5)]
    existing.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out, cache = tmp_path / "aug.jsonl", tmp_path / "cache.jsonl"
    args = ["augment", "--out", str(out), "--count", "12", "--llm-url", url(stub_server), "--input", str(existing),
            "--domains", "loan,fx,deposit", "--min-per-domain", "3", "--judge", "--llm-cache", str(cache),
            "--seed", "4", "--json"]
    result = CliRunner().invoke(data, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    items = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert summary["coverage"] == {"loan": 5}
    assert summary["missing_domains"] == ["fx", "deposit"]
    assert summary["covered_domains_with_knowledge"] == ["loan"]
    assert len(items) == summary["items"] > 0
    assert {i["domain"] for i in items} <= {"fx", "deposit"}
    for item in items:
        assert all(r["pass"] for r in verify(item["constraints"], item["output"])), item
        assert item["persona"] and item["scenario"] and item["meta_request"] and item["knowledge_points"]
    # Nothing is lost silently: every attempt is an item or a counted, explained drop.
    assert summary["attempts"] == summary["items"] + sum(summary["dropped"].values()) <= 36
    assert len(summary["drop_details"]) == sum(summary["dropped"].values())
    assert summary["dropped"].get("near_duplicate", 0) > 0  # the stub's small vocabulary repeats itself
    assert any(i["knowledge_points"][-1]["domain"] == "loan" for i in items)  # cross-composition happened
    assert summary["llm"]["http_requests"] > 0

    # The same run again is served entirely from the request cache and gives the same file.
    first = out.read_bytes()
    again = CliRunner().invoke(data, args + ["--overwrite"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["llm"]["http_requests"] == 0
    assert out.read_bytes() == first


def test_augment_requires_an_endpoint(tmp_path):
    result = CliRunner().invoke(data, ["augment", "--out", str(tmp_path / "o.jsonl"), "--count", "3"])
    assert result.exit_code == 2 and "--llm-url" in result.output


def test_client_retries_times_out_and_caches(stub_server, tmp_path):
    client = LLMClient(url(stub_server), retries=3, backoff=0.01, timeout=0.2, cache_path=tmp_path / "c.jsonl")
    reply = client.ask('FLAKY 请输出 {"personas": []}')
    assert "personas" in reply and client.requests == 3  # two 503s, then success
    with pytest.raises(EndpointError, match=r"after 2 attempt\(s\)"):
        LLMClient(url(stub_server), retries=1, backoff=0.01, timeout=0.1).ask("SLOW please")
    cached = LLMClient(url(stub_server), cache_path=tmp_path / "c.jsonl")
    assert cached.ask('FLAKY 请输出 {"personas": []}') == reply and cached.requests == 0
    assert extract_json('前言 ```json\n{"a": [1, 2]}\n``` 后记') == {"a": [1, 2]}
    with pytest.raises(EndpointError, match="Connection refused"):
        LLMClient("http://127.0.0.1:9/v1", retries=0, timeout=0.5).ask("nobody listens")


def test_compress_with_llm_tagger(stub_server, tmp_path):
    pool = tmp_path / "pool.jsonl"
    rows = [{"instruction": f"美元汇率问题{i}" if i % 3 == 0 else f"房贷问题{i}", "output": f"回答{i}" * (i + 1)}
            for i in range(30)]
    pool.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "kept.jsonl"
    result = CliRunner().invoke(data, ["compress", str(pool), "--out", str(out), "--budget", "6", "--tagger-url",
                                       url(stub_server), "--tagger-workers", "3", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["tagger"] == "llm" and summary["tags"]["tagged"] == 30
    assert summary["llm"]["http_requests"] == 90  # InsTag + DEITA complexity + DEITA quality per sample
    kept = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(kept) == 6 and {k["tags"]["categories"][0] for k in kept} == {"fx", "loan"}
    assert all(k["tags"]["quality"] == 5 and k["tags"]["complexity"] == 4 for k in kept)
    assert kept[0]["tags"]["categories"][1] == "calculation"


def test_near_duplicate_filter():
    dedup = NearDuplicateFilter(threshold=0.7, seed=1)
    assert dedup.check_and_add("请比较等额本息和等额本金两种还款方式的利息差别") is None
    assert dedup.check_and_add("请比较等额本息和等额本金两种还款方式的利息差别。") == 0
    assert dedup.check_and_add("请比较等额本息与等额本金两种还款方式的利息差别") == 0
    assert dedup.check_and_add("美元现汇和现钞的牌价有什么不同") is None
