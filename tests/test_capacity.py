"""Capacity arithmetic (the paper's Table 4), its measurement in the engine, and the generate /
capacity commands."""
import json

import pytest
from click.testing import CliRunner

from mindyouzhi.errors import UserError
from mindyouzhi.models.runner import ModelRunner
from mindyouzhi.serve import capacity
from mindyouzhi.serve.cli import capacity_cmd, generate_cmd
from mindyouzhi.serve.kv_pool import KVPool
from serve_models import RANK, ROPE, build_serve_models

GiB = 1 << 30


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_serve_models(tmp_path_factory.getbasetemp() / "serve-models")


@pytest.mark.parametrize("text, value", [("1073741824", GiB), ("64GiB", 64 * GiB), ("512MiB", 512 << 20),
                                         ("2GB", 2_000_000_000), ("1e9", 1_000_000_000), ("1.5k", 1536)])
def test_parse_bytes(text, value):
    assert capacity.parse_bytes(text, "--memory") == value


@pytest.mark.parametrize("text", ["lots", "-1GiB", "0", "12 parsecs"])
def test_parse_bytes_rejects_nonsense(text):
    with pytest.raises(UserError, match="--memory"):
        capacity.parse_bytes(text, "--memory")


def test_table4_arithmetic_for_llama3_8b_on_64gib():
    config = capacity.load_config("Llama-3-8B")
    result = capacity.compare(config, capacity.as_mla(config, 512, 64), 64 * GiB, 2048, "bf16",
                              capacity.workspace_bytes(None, 64 * GiB))
    before, after = result["original"], result["converted"]
    assert before["kv_values_per_token_per_layer"] == [2 * 8 * 128] * 32
    assert after["kv_values_per_token_per_layer"] == [512 + 64] * 32
    assert (before["kv_bytes_per_token"], after["kv_bytes_per_token"]) == (2048 * 2 * 32, 576 * 2 * 32)
    assert result["kv_bytes_ratio"] == pytest.approx(2048 / 576)
    assert before["weights_bytes"] == 8_030_261_248 * 2  # Llama-3-8B's published parameter count
    budget = 64 * GiB - before["weights_bytes"] - int(0.1 * 64 * GiB)
    assert before["max_sequences"] == budget // (2048 * 2048 * 2 * 32)
    assert after["max_sequences"] / before["max_sequences"] > 3.4


@pytest.mark.parametrize("name, layers, gqa_values", [("qwen2.5-7b", 28, 1024), ("openpangu-embedded-7b", 34, 2048),
                                                       ("qwen2.5-14b", 48, 2048)])
def test_paper_configs_have_their_public_shapes(name, layers, gqa_values):
    config = capacity.load_config(name)
    assert config.num_hidden_layers == layers and config.kv_values_per_token(0) == gqa_values


def test_converted_model_is_compared_with_its_all_gqa_original(models):
    for name, mla_layers in (("mla", 2), ("hybrid", 1)):
        config = ModelRunner.from_dir(models[name], with_tokenizer=False).config
        result = capacity.compare(capacity.as_gqa(config), config, 1 << 20, 64, "fp32", 0 + 1)
        gqa_values = 2 * config.num_key_value_heads * config.head_dim
        assert result["original"]["kv_values_per_token_per_layer"] == [gqa_values] * 2
        assert result["converted"]["kv_bytes_per_token"] == KVPool(config, 2, 4).bytes_per_token == 4 * (
            mla_layers * (RANK + ROPE) + (2 - mla_layers) * gqa_values)


def test_measured_concurrency_fills_the_pool_and_tracks_the_byte_ratio(models):
    budget, measured = 96 * 1024, {}
    for name in ("gqa", "mla"):
        runner = ModelRunner.from_dir(models[name], with_tokenizer=False)
        measured[name] = capacity.measure(runner, budget, prompt_len=10, gen_len=7, block_size=4)
        assert measured[name]["held"] == measured[name]["predicted"] >= 2
        assert measured[name]["peak_blocks"] >= measured[name]["held"] * 4  # each held its whole 16-token life
        assert measured[name]["preemptions"] == 0 and measured[name]["still_waiting_when_the_wave_ended"] == 1
    ideal = measured["gqa"]["kv_bytes_per_token"] / measured["mla"]["kv_bytes_per_token"]
    assert measured["mla"]["held"] / measured["gqa"]["held"] >= 0.95 * ideal


def test_capacity_command_json_and_table(models):
    result = CliRunner().invoke(capacity_cmd, ["--model-config", "openpangu-embedded-7b", "--memory", "64GiB", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["dtype"] == "bf16" and payload["converted"]["kv_values_per_token"] == 576 * 34
    table = CliRunner().invoke(capacity_cmd, ["--model-config", "all", "--memory", "64GiB"])
    assert table.exit_code == 0 and all(name in table.output for name in capacity.PAPER_MODELS)
    measured = CliRunner().invoke(capacity_cmd, ["--model", str(models["mla"]), "--memory", "400KiB", "--context", "16",
                                                 "--workspace", "0%", "--block-size", "4", "--measure", "--json"])
    assert measured.exit_code == 0, measured.output
    payload = json.loads(measured.stdout)
    assert payload["measured"]["converted"]["held"] == payload["measured"]["converted"]["predicted"] > 0


@pytest.mark.parametrize("args, message", [
    (["--memory", "1GiB"], "exactly one of"),
    (["--model-config", "llama-3-8b", "--memory", "1GiB", "--measure"], "needs --model"),
    (["--model-config", "gpt-5", "--memory", "1GiB"], "neither a known model"),
    (["--model-config", "llama-3-8b", "--memory", "1GiB", "--rope-dim", "48"], "--rope-dim"),
])
def test_capacity_command_user_errors(args, message):
    result = CliRunner().invoke(capacity_cmd, args)
    assert isinstance(result.exception, UserError) and message in str(result.exception)


def test_generate_command_streams_greedy_text_and_reports_json(models):
    result = CliRunner().invoke(generate_cmd, ["--model", str(models["mla"]), "--prompt", "w1 w2 w3",
                                               "--max-new-tokens", "5", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert 1 <= payload["completion_tokens"] <= 5 and payload["kv_bytes_per_token"] == 2 * (RANK + ROPE) * 4
    human = CliRunner().invoke(generate_cmd, ["--model", str(models["mla"]), "--prompt", "w1 w2 w3",
                                              "--max-new-tokens", "5"])
    assert human.exit_code == 0 and human.stdout.strip() == payload["text"].strip()
    chat = CliRunner().invoke(generate_cmd, ["--model", str(models["gqa"]), "--prompt", "w1", "--chat"])
    assert isinstance(chat.exception, UserError) and "chat template" in str(chat.exception)
