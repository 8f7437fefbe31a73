"""The 7B-scale bench (bench/scale_7b.py) at a tiny scale: its checkpoint writer gives a Qwen2
directory that our loader and transformers both read with the declared shapes, the paper's setting
is legal on the real Qwen2.5-7B shape, and the export of a conversion in that setting's proportions
(rope = head_dim / 2, rank = 4 · head_dim: 64 + 512 = 576 at head_dim 128) reports the head width.
"""
import importlib.util
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from hf_fixtures import WORDS, write_text
from mindyouzhi.cli import main
from mindyouzhi.convert_weights.architectures import check_tensors, checkpoint_shapes
from mindyouzhi.convert_weights.safetensors_io import SafetensorsStore
from mindyouzhi.models.config import ModelConfig
from mindyouzhi.transition.layers import full_rank
from mindyouzhi.transition.pipeline import ConversionPlan, validate_plan


def _bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "scale_7b.py"
    spec = importlib.util.spec_from_file_location("bench_scale_7b", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _bench()
TINY = dict(hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, head_dim=16, vocab_size=160)


def tiny_checkpoint(tmp_path: Path, max_shard_bytes: int = 1 << 30) -> Path:
    out = tmp_path / "qwen2-tiny"
    out.mkdir()
    config = bench.qwen2_config(**TINY)
    bench.write_word_tokenizer(out, " ".join(WORDS * 3), TINY["vocab_size"])
    bench.write_random_checkpoint(out, config, seed=1, max_shard_bytes=max_shard_bytes, chunk_values=1000)
    return out


def test_random_checkpoint_has_the_declared_shapes_in_bf16(tmp_path):
    out = tiny_checkpoint(tmp_path, max_shard_bytes=40_000)  # several shards and an index
    config = ModelConfig.from_dir(out)
    assert config.qkv_bias and not config.tie_word_embeddings and config.head_dim == 16
    store = SafetensorsStore(out)
    shapes = {name: tuple(store.shape(name)) for name in store.keys()}
    check_tensors(shapes, config, str(out))
    assert shapes == checkpoint_shapes(config)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and set(index["weight_map"]) == set(shapes)
    dtypes = {}
    for shard in set(index["weight_map"].values()):
        with open(out / shard, "rb") as handle:
            header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
        dtypes.update({name: entry["dtype"] for name, entry in header.items() if name != "__metadata__"})
    assert dtypes == {name: "BF16" for name in shapes}
    for name, shape in shapes.items():
        values = store.get(name)
        if name.endswith("norm.weight"):
            assert np.all(values == 1.0), name
        elif name.endswith("_proj.weight") or name == "lm_head.weight":
            ratio = values.std() * math.sqrt(shape[-1])  # one exponent: within √2 of 1/sqrt(fan_in)
            assert 2 ** -0.5 <= ratio <= 2 ** 0.5, (name, ratio)


def test_random_checkpoint_loads_in_transformers_with_finite_logits(tmp_path):
    import torch
    import transformers

    out = tiny_checkpoint(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model).__name__ == "Qwen2ForCausalLM"
    reference = SafetensorsStore(out).get("model.layers.1.self_attn.k_proj.bias")
    np.testing.assert_array_equal(model.model.layers[1].self_attn.k_proj.bias.detach().numpy(), reference)
    with torch.no_grad():
        logits = model(torch.tensor([[2, 5, 9, 40, 7]])).logits.numpy()
    assert np.isfinite(logits).all() and logits.std() > 0


def test_paper_setting_is_legal_on_the_qwen25_7b_shape():
    config = ModelConfig.from_dict(bench.qwen2_config(**bench.QWEN25_7B))
    assert (config.num_hidden_layers, config.num_key_value_heads, config.head_dim) == (28, 4, 128)
    assert bench.PAPER_RANK + bench.PAPER_ROPE_DIM == bench.VLLM_MLA_HEAD == 576
    assert full_rank(config, bench.PAPER_ROPE_DIM) == 2 * 4 * 128 - 64
    validate_plan(config, ConversionPlan(bench.PAPER_ROPE_DIM, [4] * 28, bench.PAPER_RANK), "7B shape")


def test_export_reports_the_latent_plus_rope_head_width(tmp_path):
    model = tiny_checkpoint(tmp_path)
    calib = write_text(tmp_path / "calib.txt", 2000, seed=3)
    rope, rank = TINY["head_dim"] // 2, 4 * TINY["head_dim"]  # the paper's 64 / 512 at head_dim 128
    runner = CliRunner()
    converted, exported = tmp_path / "mla", tmp_path / "deepseek"
    result = runner.invoke(main, ["convert", "--model", str(model), "--out", str(converted), "--calib", str(calib),
                                  "--calib-tokens", "512", "--calib-seq-len", "64", "--rope-dim", str(rope),
                                  "--kv-lora-rank", str(rank), "--freqfold", "2", "--json"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["export", "--model", str(converted), "--out", str(exported), "--json"])
    assert result.exit_code == 0, result.output
    config = json.loads((exported / "config.json").read_text())
    assert (config["qk_rope_head_dim"], config["kv_lora_rank"]) == (rope, rank)
    assert config["qk_rope_head_dim"] + config["kv_lora_rank"] == 576 * TINY["head_dim"] // 128


def test_projection_separates_fixed_profile_and_stream_costs():
    # t(k) = 30 + 6·min(k, 4) + 2·k seconds per layer (k = thousands of tokens; the profile stops at
    # 16 windows × 256 tokens = 4k): runs at 0.25k and 2k, the stream's 2 s/1k measured directly.
    runs = [{"calib_tokens": t, "seconds_per_layer": 30 + 8 * t / 1024} for t in (256, 2048)]
    projected = bench.project(runs, 2.0, 256)
    assert projected["profile_tokens_cap"] == 4096
    assert projected["fixed_seconds_per_layer"] == pytest.approx(30)
    assert projected["profile_seconds_per_1k_tokens"] == pytest.approx(6)
    assert projected["seconds_per_layer"] == pytest.approx(30 + 6 * 4 + 2 * 32)
    assert projected["wall_seconds_28_layers"] == pytest.approx(28 * (30 + 24 + 64))
    one = bench.project(runs[:1], 2.0, 256)  # one budget: everything beyond the stream is fixed
    assert one["seconds_per_layer"] == pytest.approx(30 + 2 + 2 * 32 - 0.5)
