"""``mindyouzhi export``: converted MLA models → stock DeepSeek-V3 (transformers) and MindFormers names.

Parity is checked against transformers' own ``DeepseekV3ForCausalLM`` (eager attention, fp32): the
exported directory must give the logits our MindSpore ``ModelRunner`` gives on the converted model.
"""
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from hf_fixtures import add_word_tokenizer, build_hf_model, tiny_convertible, write_text
from mindyouzhi.cli import main
from mindyouzhi.convert_weights.mindformers_names import (FUSED_LAYER_NAMES, GLOBAL_NAMES, LAYER_NAMES,
                                                          mindformers_names, unpack_linear_fc1)
from mindyouzhi.convert_weights.safetensors_io import SafetensorsStore
from mindyouzhi.errors import UserError
from mindyouzhi.export.cli import export_cmd
from mindyouzhi.export.deepseek import export_deepseek_v3
from mindyouzhi.models.runner import ModelRunner

IDS = np.random.default_rng(5).integers(4, 124, size=(2, 40))
FAST = ["--rope-dim", "8", "--kv-lora-rank", "24", "--freqfold", "2", "--calib-tokens", "1024",
        "--calib-seq-len", "64", "--no-trajectories"]
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def convert(model, out, calib, *args):
    result = CliRunner().invoke(main, ["convert", "--model", str(model), "--out", str(out), "--calib", str(calib),
                                       "--json", *args])
    assert result.exit_code == 0, result.output
    return out


def zero_query_bias(model_dir):
    """Source models whose biases DeepSeek-V3 can express: k/v (and o) biases, query bias zero."""
    from safetensors.numpy import load_file, save_file

    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    for name in [n for n in tensors if n.endswith("q_proj.bias")]:
        tensors[name] = np.zeros_like(tensors[name])
    save_file(tensors, path, metadata={"format": "pt"})
    return model_dir


def transformers_logits(model_dir, ids):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def assert_nothing_written(out):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*")), "a temporary output directory was left behind"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Converted tiny models: plain llama; qwen2 with k/v biases; llama with q/k/v/o biases and llama3
    RoPE scaling (query biases zeroed, the only biases DeepSeek-V3 cannot express); and originals."""
    root = tmp_path_factory.mktemp("export")
    calib = write_text(root / "calib.txt", 3000, seed=0)
    sources = {
        "llama": tiny_convertible(root / "a", "llama"),
        "qwen2": tiny_convertible(root / "b", "qwen2"),
        "qwen2_kv_bias": zero_query_bias(tiny_convertible(root / "c", "qwen2")),
        "llama_bias_llama3": zero_query_bias(add_word_tokenizer(
            build_hf_model("llama", root / "d", attention_bias=True, rope_parameters=LLAMA3_ROPE))),
    }
    converted = {kind: convert(src, root / f"{kind}-mla", calib, *FAST, "--latent-norm")
                 for kind, src in sources.items()}
    # Converted without --latent-norm (the exact default): the export pins the engine's norm linear.
    for kind in ("llama", "qwen2"):
        converted[f"{kind}_no_norm"] = convert(sources[kind], root / f"{kind}-mla-no-norm", calib, *FAST)
    return sources, converted, calib


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen2_kv_bias", "llama_bias_llama3", "llama_no_norm",
                                  "qwen2_no_norm"])
def test_transformers_deepseek_v3_reproduces_converted_model(models, kind, tmp_path):
    _, converted, _ = models
    out = tmp_path / "ds"
    # Small shards on purpose: the sharded path (index + several files) is what large models take.
    summary = export_deepseek_v3(converted[kind], out, max_shard_bytes=64 * 1024)
    ours = ModelRunner.from_dir(converted[kind], with_tokenizer=False).logits(IDS)
    np.testing.assert_allclose(transformers_logits(out, IDS), ours, atol=1e-4, rtol=0)

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert config["first_k_dense_replace"] == 2 and config["rope_interleave"]
    # Query biases (full Qwen2) go through q_a_proj → pinned q_a_layernorm → q_b_proj, nothing else does.
    hidden = json.loads((converted[kind] / "config.json").read_text())["hidden_size"]
    query_bias = kind.startswith("qwen2") and kind != "qwen2_kv_bias"
    assert config["q_lora_rank"] == (hidden + 64 - hidden % 64 if query_bias else None)
    store = SafetensorsStore(out)
    assert ("model.layers.0.self_attn.q_b_proj.weight" in store) is query_bias
    assert ("model.layers.0.self_attn.q_proj.weight" in store) is not query_bias
    latent_norm = store.get("model.layers.0.self_attn.kv_a_layernorm.weight")
    if kind.endswith("no_norm"):  # linear norm: a huge constant weight undoing a tiny latent scale
        assert latent_norm.min() == latent_norm.max() > 1e3
    assert (config["kv_lora_rank"], config["qk_rope_head_dim"], config["qk_nope_head_dim"]) == (24, 8, 16)
    assert config["attention_bias"] is (kind not in ("llama", "llama_no_norm"))
    assert (config["rope_scaling"] or {}).get("rope_type") == ("llama3" if kind == "llama_bias_llama3" else None)
    assert summary["kv_cache_values_per_token_per_layer"] == 24 + 8
    assert len(summary["weight_files"]) > 1 and (out / "model.safetensors.index.json").is_file()
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(summary["copied_files"])
    metadata = [json.loads((out / f).read_bytes()[8:8 + int.from_bytes((out / f).read_bytes()[:8], "little")])
                ["__metadata__"] for f in summary["weight_files"]]
    assert all(m == {"format": "pt"} for m in metadata)


@pytest.mark.parametrize("kind", ["llama_no_norm", "qwen2_kv_bias"])
def test_export_balances_the_factor_scales_a_conversion_leaves(models, kind, tmp_path):
    """A converted model whose q_proj carries 100× the scale and kv_b_proj's key block 1/100 (the
    same function) exports with comparable scales, and transformers still reproduces it."""
    import shutil

    from safetensors.numpy import load_file, save_file

    _, converted, _ = models
    skewed = tmp_path / "skewed"
    shutil.copytree(converted[kind], skewed)
    config = json.loads((skewed / "config.json").read_text())
    heads, rank = config["num_attention_heads"], 24
    nope, rope = config["head_dim"], config["mla"]["rope_dim"]
    tensors = load_file(skewed / "model.safetensors")
    for layer in range(config["num_hidden_layers"]):
        attn = f"model.layers.{layer}.self_attn."
        q = tensors[attn + "q_proj.weight"].reshape(heads, nope + rope, -1)
        q[:, :nope] *= 100.0
        kv_b = tensors[attn + "kv_b_proj.weight"].reshape(heads, -1, rank)
        kv_b[:, :nope] /= 100.0
        if attn + "q_proj.bias" in tensors:
            tensors[attn + "q_proj.bias"].reshape(heads, -1)[:, :nope] *= 100.0
    save_file(tensors, skewed / "model.safetensors", metadata={"format": "pt"})
    ours = ModelRunner.from_dir(skewed, with_tokenizer=False).logits(IDS)
    np.testing.assert_allclose(ours, ModelRunner.from_dir(converted[kind], with_tokenizer=False).logits(IDS),
                               atol=1e-4, rtol=0)
    export_deepseek_v3(skewed, tmp_path / "ds")
    np.testing.assert_allclose(transformers_logits(tmp_path / "ds", IDS), ours, atol=1e-4, rtol=0)

    def key_ratio(store, layer):
        attn = f"model.layers.{layer}.self_attn."
        q = store.get(attn + "q_proj.weight").reshape(heads, nope + rope, -1)[:, :nope]
        kv_b = store.get(attn + "kv_b_proj.weight").reshape(heads, -1, rank)[:, :nope]
        return float(np.sqrt(np.mean(q ** 2) / np.mean(kv_b ** 2)))

    source, exported = SafetensorsStore(skewed), SafetensorsStore(tmp_path / "ds")
    assert key_ratio(source, 1) > 1000 and key_ratio(exported, 1) < 30


@pytest.mark.shared
def test_stories260k_exports_exactly(shared_dir, tmp_path):
    models_dir = shared_dir / "models" / "stories260K"
    result = CliRunner().invoke(main, ["import", "--llama2c", str(models_dir / "stories260K.bin"), "--tokenizer",
                                       str(models_dir / "tok512.bin"), "--out", str(tmp_path / "src")])
    assert result.exit_code == 0, result.output
    convert(tmp_path / "src", tmp_path / "mla", shared_dir / "data" / "wikitext-2" / "wiki.valid.tokens",
            "--rope-dim", "4", "--kv-lora-rank", "32", "--freqfold", "2", "--calib-tokens", "2048",
            "--calib-seq-len", "64", "--no-trajectories", "--latent-norm")
    summary = export_deepseek_v3(tmp_path / "mla", tmp_path / "ds")
    ids = np.random.default_rng(0).integers(3, 512, size=(2, 64))
    ours = ModelRunner.from_dir(tmp_path / "mla", with_tokenizer=False).logits(ids)
    # Tied source, source eps 1e-5: checks the explicit lm_head and the epsilon re-expression.
    np.testing.assert_allclose(transformers_logits(tmp_path / "ds", ids), ours, atol=1e-4, rtol=0)
    assert summary["kv_cache_values_per_token"] == 5 * (32 + 4)
    assert "tokenizer_llama2c.json" in summary["copied_files"]


def test_mindformers_names_cover_every_tensor(models, tmp_path):
    _, converted, _ = models
    export_deepseek_v3(converted["llama"], tmp_path / "hf")
    export_deepseek_v3(converted["llama"], tmp_path / "mf", fmt="mindformers", max_shard_bytes=64 * 1024)
    hf, mf = SafetensorsStore(tmp_path / "hf"), SafetensorsStore(tmp_path / "mf")
    name_map = json.loads((tmp_path / "mf" / "param_name_map.json").read_text())
    assert set(mf.keys()) == set(name_map) == mindformers_names(2)
    assert not (tmp_path / "mf" / "model.safetensors.index.json").exists()
    for name in ("embedding.word_embeddings.weight", "output_layer.weight", "decoder.final_layernorm.weight",
                 "decoder.layers.1.self_attention.linear_q_proj.weight",
                 "decoder.layers.0.self_attention.linear_kv_down_proj.weight",
                 "decoder.layers.0.self_attention.kv_layernorm.weight",
                 "decoder.layers.1.self_attention.linear_kv_up_proj.weight",
                 "decoder.layers.0.self_attention.linear_proj.weight", "decoder.layers.1.pre_mlp_layernorm.weight"):
        assert name in name_map
    assert mf.shape("decoder.layers.0.mlp.linear_fc1.weight") == (2 * 96, 64)
    # Every HF tensor lands in exactly one MindFormers tensor, unchanged (fc1: gate/up row-interleaved).
    covered = set()
    for hf_name, mf_name in GLOBAL_NAMES.items():
        np.testing.assert_array_equal(mf.get(mf_name), hf.get(hf_name))
        covered.add(hf_name)
    for layer in range(2):
        for hf_t, mf_t in LAYER_NAMES.items():
            np.testing.assert_array_equal(mf.get(mf_t.format(i=layer)), hf.get(hf_t.format(i=layer)))
            covered.add(hf_t.format(i=layer))
        for mf_t, (gate_t, up_t) in FUSED_LAYER_NAMES.items():
            gate, up = unpack_linear_fc1(mf.get(mf_t.format(i=layer)))
            np.testing.assert_array_equal(gate, hf.get(gate_t.format(i=layer)))
            np.testing.assert_array_equal(up, hf.get(up_t.format(i=layer)))
            covered.update({gate_t.format(i=layer), up_t.format(i=layer)})
    assert covered == set(hf.keys())
    # MindSpore itself reads the files under these names (MindFormers loads through it).
    import mindspore as ms

    first = sorted(set(name_map.values()))[0]
    loaded = ms.load_checkpoint(str(tmp_path / "mf" / first), format="safetensors")
    assert set(loaded) == {n for n, f in name_map.items() if f == first}


def test_cli_json_and_summary(models, tmp_path):
    _, converted, _ = models
    args = ["--model", str(converted["llama"]), "--out", str(tmp_path / "ds")]
    result = CliRunner().invoke(export_cmd, args + ["--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["format"] == "deepseek-v3" and payload["kv_cache_values_per_token"] == 2 * 32
    assert payload["source_kv_cache_values_per_token"] == 2 * 2 * 2 * 16
    result = CliRunner().invoke(export_cmd, args + ["--overwrite"])
    assert result.exit_code == 0, result.output
    assert "24 + 8 = 32 values per layer" in result.stdout and "parity-tested" in result.stdout
    assert "rms_norm_eps 1e-05 re-expressed" in result.stdout


@pytest.mark.parametrize("case, words", [
    ("hybrid", ["layers [1]", "GQA", "--layers"]),
    ("rope_all", ["--rope-all"]),
    ("not_converted", ["not a converted model"]),
    ("ranks_differ", ["kv_lora_rank differs", "--kv-lora-rank"]),
])
def test_refusals_write_nothing(models, case, words, tmp_path):
    sources, converted, calib = models
    fmt = "deepseek-v3"
    if case == "hybrid":
        model = convert(sources["llama"], tmp_path / "m", calib, *FAST, "--latent-norm", "--layers", "0")
    elif case == "rope_all":
        model = convert(sources["llama"], tmp_path / "m", calib, "--rope-all", "--freqfold", "1", "--kv-lora-rank",
                        "full", "--stage", "1", "--calib-tokens", "1024", "--calib-seq-len", "64", "--no-trajectories")
    elif case == "not_converted":
        model = sources["llama"]
    elif case == "ranks_differ":
        model = tmp_path / "m"
        shutil.copytree(converted["llama"], model)
        config = json.loads((model / "config.json").read_text())
        config["mla"]["kv_lora_rank"] = [24, 16]
        (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    with pytest.raises(UserError) as error:
        export_deepseek_v3(model, out, fmt=fmt)
    for word in words:
        assert word in str(error.value)
    assert_nothing_written(out)


def test_out_must_differ_from_model(models):
    _, converted, _ = models
    with pytest.raises(UserError, match="is --model itself"):
        export_deepseek_v3(converted["llama"], converted["llama"], overwrite=True)
    assert (converted["llama"] / "model.safetensors").is_file()


def test_existing_out_is_refused_and_kept(models, tmp_path):
    _, converted, _ = models
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(export_cmd, ["--model", str(converted["llama"]), "--out", str(out)])
    assert isinstance(result.exception, UserError) and "--overwrite" in str(result.exception)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not list(tmp_path.glob(".out*"))


def test_paged_decode_of_latent_norm_and_plain_models_in_one_process(models):
    """A server process may load a --latent-norm model (a kv_a_layernorm weight per layer) and then
    one converted without it (no such weight): the compiled layer steps are kept per argument
    pattern, so each model decodes equal to its own expanded forward, in either order and again."""
    _, converted, _ = models
    for kind in ("llama", "llama_no_norm", "llama"):
        runner = ModelRunner.from_dir(converted[kind])
        for attention in ("gather", "custom"):
            _assert_paged_decode_equals_forward(runner, IDS[0, :20].tolist(), attention, f"{kind} {attention}")


def _assert_paged_decode_equals_forward(runner, tokens: list, attention: str, what: str = "") -> None:
    """Prefill 13 tokens, decode the rest one by one on the paged engine: the logits equal the
    expanded (non-paged) forward of the whole sequence."""
    from mindyouzhi.serve.attention import select_attention
    from mindyouzhi.serve.kv_pool import KVPool
    from mindyouzhi.serve.paged_model import PagedModel

    pool = KVPool(runner.config, 16, block_size=4)
    model = PagedModel(runner, pool, select_attention(attention), prefill_chunk=8)
    blocks = pool.allocator.allocate(8)
    paged = [model.prefill(tokens[:13], blocks)]
    paged += [model.decode([tokens[p]], [p], [blocks])[0] for p in range(13, len(tokens))]
    np.testing.assert_allclose(np.stack(paged), runner.logits(np.asarray([tokens]))[0, 12:], atol=1e-4, rtol=0,
                               err_msg=what)


def test_serving_a_converted_biased_model(models):
    """Qwen2's q/k/v biases after the default (exact-form) conversion — q_proj.bias and
    kv_a_proj_with_mqa.bias: the paged engine's absorbed decode equals the expanded forward, batched
    greedy generation equals the single-sequence reference, capacity measures it and generate runs."""
    kind = "qwen2_no_norm"
    from mindyouzhi.models.generation import generate
    from mindyouzhi.serve import capacity
    from mindyouzhi.serve.cli import generate_cmd
    from mindyouzhi.serve.engine import Engine, EngineOptions
    from mindyouzhi.serve.sampling import SamplingParams

    _, converted, _ = models
    store = SafetensorsStore(converted[kind])
    for name in ("q_proj.bias", "kv_a_proj_with_mqa.bias"):  # the biases are there and matter
        assert np.abs(store.get(f"model.layers.0.self_attn.{name}")).max() > 1e-2
    runner = ModelRunner.from_dir(converted[kind])
    for attention in ("custom", "gather"):
        _assert_paged_decode_equals_forward(runner, IDS[0, :30].tolist(), attention, attention)
    prompts = [IDS[0, :5].tolist(), IDS[1, :11].tolist()]
    completions = Engine(runner, EngineOptions(num_blocks=32, block_size=4)).generate(
        prompts, [SamplingParams(max_new_tokens=6)] * 2)
    assert [c.output_ids for c in completions] == [generate(runner, prompt, 6) for prompt in prompts]
    measured = capacity.measure(runner, 32 * 1024, prompt_len=6, gen_len=4, block_size=4)
    assert measured["held"] == measured["predicted"] >= 2 and measured["preemptions"] == 0
    result = CliRunner().invoke(generate_cmd, ["--model", str(converted[kind]), "--prompt", "w1 w2 w3",
                                               "--max-new-tokens", "4", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["completion_tokens"] >= 1
