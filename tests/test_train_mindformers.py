"""``export --format mindformers --recipe``: the MindFormers fine-tuning YAML; the biased-model layout
(concatenated MLA) checked numerically through transformers' DeepSeek-V3 with MindFormers' bias
semantics; and (when MINDFORMERS_PYTHON names an environment with mindformers 2.1.0, built by
``scripts/mindformers_env.sh``) MindFormers' own trainer building its DeepSeek-V3 model from that
YAML and loading the export."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from hf_fixtures import add_word_tokenizer, build_hf_model, tiny_convertible, write_text
from mindyouzhi.cli import main
from mindyouzhi.convert_weights.mindformers_names import Layout, mindformers_names, unpack_linear_fc1
from mindyouzhi.convert_weights.safetensors_io import SafetensorsStore
from mindyouzhi.errors import UserError
from test_train_fixtures import shared_models, write_recipe, write_sft

BENCH = Path(__file__).resolve().parents[1] / "bench"
IDS = np.random.default_rng(7).integers(4, 124, size=(2, 40))
BIASED = ("qwen2", "llama_qkvo_bias")  # q/k/v biases (Qwen2.5); q/k/v/o biases (openPangu's default)


def _sft_recipe(tmp_path, student, sft, **sections):
    return write_recipe(tmp_path / "sft.yaml", run_mode="sft", output_dir=str(tmp_path / "mf_out"),
                        model={"student": str(student)},
                        train_dataset={"seq_length": 32, "packing": True,
                                       "sources": [{"path": str(sft), "format": "sft"}]},
                        **sections)


def _export(model, out, *extra):
    return CliRunner().invoke(main, ["export", "--model", str(model), "--out", str(out), "--format", "mindformers",
                                     *extra])


@pytest.fixture(scope="module")
def biased(tmp_path_factory):
    """Converted tiny models with attention biases, and an SFT file."""
    root = tmp_path_factory.mktemp("mf-biased")
    calib = write_text(root / "calib.txt", 3000, seed=0)
    sources = {"qwen2": tiny_convertible(root / "q", "qwen2"),
               "llama_qkvo_bias": add_word_tokenizer(build_hf_model("llama", root / "l", attention_bias=True))}
    converted = {}
    for kind, source in sources.items():
        converted[kind] = root / f"{kind}-mla"
        result = CliRunner().invoke(main, ["convert", "--model", str(source), "--out", str(converted[kind]),
                                           "--calib", str(calib), "--rope-dim", "8", "--kv-lora-rank", "24",
                                           "--freqfold", "2", "--calib-tokens", "1024", "--calib-seq-len", "64",
                                           "--no-trajectories", "--json"])
        assert result.exit_code == 0, result.output
    return converted, write_sft(root / "sft.jsonl", 48)


def test_yaml_follows_the_recipe_and_the_export(tmp_path, tmp_path_factory):
    models = shared_models(tmp_path_factory)
    recipe = _sft_recipe(tmp_path, models["student"], models["sft"],
                         parallel_config={"data_parallel": 2, "model_parallel": 2, "optimizer_shard": True},
                         runner_config={"batch_size": 1, "gradient_accumulation_steps": 8, "epochs": 2})
    result = _export(models["student"], tmp_path / "out", "--recipe", str(recipe), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    config = yaml.safe_load(Path(summary["mindformers_yaml"]).read_text())
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    model_config = config["model"]["model_config"]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_rope_head_dim",
                "qk_nope_head_dim", "v_head_dim", "vocab_size", "rms_norm_eps"):
        assert model_config[key] == exported[key], key
    assert model_config["q_lora_rank"] is None and model_config["n_routed_experts"] is None
    assert model_config["multi_latent_attention"] and model_config["qk_layernorm"]
    # no biases: the split MLA (q projection split over tensor-parallel ranks), no attention_bias
    assert model_config["mla_qkv_concat"] is False and model_config["attention_bias"] is False
    assert set(SafetensorsStore(tmp_path / "out").keys()) == mindformers_names(2)
    assert config["load_checkpoint"] == str((tmp_path / "out").resolve()) and config["use_legacy"] is False
    assert config["parallel_config"]["data_parallel"] == 2 and config["parallel_config"]["model_parallel"] == 2
    assert config["parallel"]["enable_parallel_optimizer"] is True and config["use_parallel"] is True
    assert config["runner_config"]["gradient_accumulation_steps"] == 8 and config["runner_config"]["epochs"] == 2
    loader = config["train_dataset"]["data_loader"]
    assert loader["data_files"] == str(models["sft"].resolve())
    assert [h["type"] for h in loader["handler"]] == ["AlpacaInstructDataHandler", "PackingHandler"]
    assert config["lr_schedule"]["type"] == "CosineWithWarmUpLR" and config["trainer"]["model_name"] == "deepseekV3"


@pytest.mark.parametrize("case, message", [
    ("gkd", "no MindFormers counterpart"),
    ("deepseek-v3", "only with --format mindformers"),
])
def test_what_mindformers_cannot_take_is_refused_before_writing(tmp_path, tmp_path_factory, case, message):
    models = shared_models(tmp_path_factory)
    if case == "gkd":
        recipe = write_recipe(tmp_path / "gkd.yaml", model={"student": str(models["student"]),
                                                            "teacher": str(models["teacher"])},
                              train_dataset={"sources": [str(models["text"])]})
        result = _export(models["student"], tmp_path / "out", "--recipe", str(recipe))
    else:
        recipe = _sft_recipe(tmp_path, models["student"], models["sft"])
        result = CliRunner().invoke(main, ["export", "--model", str(models["student"]), "--out",
                                           str(tmp_path / "out"), "--recipe", str(recipe)])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out").exists()


def mindformers_in_transformers(export_dir: Path):
    """transformers' DeepseekV3ForCausalLM holding the MindFormers tensors of ``export_dir`` with
    MindFormers' semantics (``MLASelfAttentionConcatenated``, read in its 2.1.0 source):
    ``linear_qkv`` = [q_proj; kv_a_proj_with_mqa] rows with their biases, ``linear_kvb`` =
    kv_b_proj *with* a bias, ``linear_proj`` = o_proj whose bias MindFormers never applies (zero
    here).  transformers has no q_proj / kv_b_proj bias without q_lora_rank: they are added."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(export_dir)
    assert config.q_lora_rank is None and config.attention_bias
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    mf = SafetensorsStore(export_dir)
    q_rows = config.num_attention_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim)
    state = {"model.embed_tokens.weight": mf.get("embedding.word_embeddings.weight"),
             "model.norm.weight": mf.get("decoder.final_layernorm.weight"),
             "lm_head.weight": mf.get("output_layer.weight")}
    for i, layer in enumerate(model.model.layers):
        mf_prefix, hf_prefix = f"decoder.layers.{i}.", f"model.layers.{i}."
        layer.self_attn.q_proj.bias = torch.nn.Parameter(torch.zeros(q_rows))
        layer.self_attn.kv_b_proj.bias = torch.nn.Parameter(torch.zeros(layer.self_attn.kv_b_proj.out_features))
        qkv, qkv_bias = mf.get(mf_prefix + "self_attention.linear_qkv.weight"), mf.get(
            mf_prefix + "self_attention.linear_qkv.bias")
        gate, up = unpack_linear_fc1(mf.get(mf_prefix + "mlp.linear_fc1.weight"))
        state.update({
            hf_prefix + "self_attn.q_proj.weight": qkv[:q_rows], hf_prefix + "self_attn.q_proj.bias": qkv_bias[:q_rows],
            hf_prefix + "self_attn.kv_a_proj_with_mqa.weight": qkv[q_rows:],
            hf_prefix + "self_attn.kv_a_proj_with_mqa.bias": qkv_bias[q_rows:],
            hf_prefix + "self_attn.kv_a_layernorm.weight": mf.get(mf_prefix + "self_attention.k_layernorm.weight"),
            hf_prefix + "self_attn.kv_b_proj.weight": mf.get(mf_prefix + "self_attention.linear_kvb.weight"),
            hf_prefix + "self_attn.kv_b_proj.bias": mf.get(mf_prefix + "self_attention.linear_kvb.bias"),
            hf_prefix + "self_attn.o_proj.weight": mf.get(mf_prefix + "self_attention.linear_proj.weight"),
            hf_prefix + "self_attn.o_proj.bias": np.zeros(config.hidden_size, np.float32),
            hf_prefix + "input_layernorm.weight": mf.get(mf_prefix + "input_layernorm.weight"),
            hf_prefix + "post_attention_layernorm.weight": mf.get(mf_prefix + "pre_mlp_layernorm.weight"),
            hf_prefix + "mlp.gate_proj.weight": gate, hf_prefix + "mlp.up_proj.weight": up,
            hf_prefix + "mlp.down_proj.weight": mf.get(mf_prefix + "mlp.linear_fc2.weight")})
    model.load_state_dict({k: torch.tensor(np.ascontiguousarray(v)) for k, v in state.items()}, strict=True)
    return model


@pytest.mark.parametrize("kind", BIASED)
def test_biased_model_exports_as_concatenated_mla_exactly(biased, kind, tmp_path):
    import torch

    from mindyouzhi.models.runner import ModelRunner

    converted, sft = biased
    recipe = _sft_recipe(tmp_path, converted[kind], sft)
    result = _export(converted[kind], tmp_path / "out", "--recipe", str(recipe))
    assert result.exit_code == 0, result.output
    store = SafetensorsStore(tmp_path / "out")
    layout = Layout(qkv_concat=True, num_heads=4, qk_nope_head_dim=16, v_head_dim=16)
    assert set(store.keys()) == mindformers_names(2, layout)
    model_config = yaml.safe_load((tmp_path / "out" / "finetune_mindformers.yaml").read_text())["model"]["model_config"]
    assert model_config["mla_qkv_concat"] is True and model_config["attention_bias"] is True
    source = SafetensorsStore(converted[kind])
    assert np.any(source.get("model.layers.0.self_attn.q_proj.bias"))  # the query bias is really there
    assert np.any(store.get("decoder.layers.0.self_attention.linear_qkv.bias")[:4 * 24])
    # an o_proj bias travels as the value part of linear_kvb.bias (MindFormers drops linear_proj's bias)
    o_bias = "model.layers.0.self_attn.o_proj.bias"
    has_o_bias = o_bias in source and bool(np.any(source.get(o_bias)))
    assert has_o_bias is (kind == "llama_qkvo_bias")
    kvb_bias = store.get("decoder.layers.0.self_attention.linear_kvb.bias").reshape(4, 32)
    assert not np.any(kvb_bias[:, :16]) and bool(np.any(kvb_bias[:, 16:])) is has_o_bias

    with torch.no_grad():
        theirs = mindformers_in_transformers(tmp_path / "out")(torch.tensor(IDS)).logits.numpy()
    ours = ModelRunner.from_dir(converted[kind], with_tokenizer=False).logits(IDS)
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_an_output_bias_outside_the_range_of_o_proj_is_refused(biased, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    from mindyouzhi.export.deepseek import export_deepseek_v3

    converted, _ = biased
    model = tmp_path / "m"
    shutil.copytree(converted["llama_qkvo_bias"], model)
    tensors = load_file(model / "model.safetensors")
    weight = tensors["model.layers.1.self_attn.o_proj.weight"]
    weight[:, 1:] = weight[:, :1]  # rank 1: a generic o bias is not W_o times any value bias
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"^model\.layers\.1\.self_attn\.o_proj\.bias: ") as error:
        export_deepseek_v3(model, tmp_path / "out", fmt="mindformers")
    assert "--format deepseek-v3" in str(error.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def _mindformers_report(tmp_path, student, sft):
    sys.path.insert(0, str(BENCH))
    from mindformers_check import check_in_mindformers

    recipe = _sft_recipe(tmp_path, student, sft)
    assert _export(student, tmp_path / "out", "--recipe", str(recipe)).exit_code == 0
    return check_in_mindformers(os.environ["MINDFORMERS_PYTHON"], tmp_path / "out" / "finetune_mindformers.yaml",
                                tmp_path / "out", tmp_path)


def _assert_built_loaded_and_stopped_at_fused_rmsnorm(report, attention_class):
    assert report["mindformers_version"] == "2.1.0" and report["mindspore_version"] == "2.10.0"
    assert report["model_class"] == "TrainingDeepseekV3ForCausalLM" and report["attention_class"] == attention_class
    assert not report["missing_in_export"] and not report["extra_in_export"] and not report["shape_mismatches"]
    assert report["values_loaded_by_mindformers_equal_export"]
    # What MindFormers does on CPU: dataset, model and checkpoint load succeed, then compiling the first
    # training step stops at its hard-wired fused RmsNorm (Ascend-only kernel; docs/training.md)
    assert report["trainer"]["type"] == "RuntimeError" and report["trainer"]["unsupported_op_on_cpu"] == "RmsNorm"
    assert report["trainer_stopped_in"][-1].startswith("mindformers/trainer/base_trainer.py:")
    assert report["trainer_stopped_in"][-1].endswith(" training_process")


needs_mindformers = pytest.mark.skipif(not os.environ.get("MINDFORMERS_PYTHON"),
                                       reason="MINDFORMERS_PYTHON (python of scripts/mindformers_env.sh) not set")


@needs_mindformers
def test_mindformers_trainer_builds_its_model_and_loads_the_export(tmp_path, tmp_path_factory):
    models = shared_models(tmp_path_factory)
    report = _mindformers_report(tmp_path, models["student"], models["sft"])
    _assert_built_loaded_and_stopped_at_fused_rmsnorm(report, "MLASelfAttention")
    assert report["biases"] == []


@needs_mindformers
def test_mindformers_loads_a_biased_qwen2_export(biased, tmp_path):
    converted, sft = biased
    report = _mindformers_report(tmp_path, converted["qwen2"], sft)
    _assert_built_loaded_and_stopped_at_fused_rmsnorm(report, "MLASelfAttentionConcatenated")
    assert report["biases"] == [f"decoder.layers.{i}.self_attention.{n}.bias" for i in range(2)
                                for n in ("linear_kvb", "linear_qkv")]
