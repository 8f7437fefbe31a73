"""``export --format mindformers --recipe``: the MindFormers fine-tuning YAML, and (when
MINDFORMERS_PYTHON names an environment with mindformers 2.1.0) MindFormers' own trainer building
its DeepSeek-V3 model from that YAML and loading the export."""
import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mindyouzhi.cli import main
from test_train_fixtures import shared_models, write_recipe

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _sft_recipe(tmp_path, models, **sections):
    return write_recipe(tmp_path / "sft.yaml", run_mode="sft", output_dir=str(tmp_path / "mf_out"),
                        model={"student": str(models["student"])},
                        train_dataset={"seq_length": 32, "packing": True,
                                       "sources": [{"path": str(models["sft"]), "format": "sft"}]},
                        **sections)


def _export(model, out, *extra):
    return CliRunner().invoke(main, ["export", "--model", str(model), "--out", str(out), "--format", "mindformers",
                                     *extra])


def test_yaml_follows_the_recipe_and_the_export(tmp_path, tmp_path_factory):
    models = shared_models(tmp_path_factory)
    recipe = _sft_recipe(tmp_path, models, parallel_config={"data_parallel": 2, "model_parallel": 2,
                                                            "optimizer_shard": True},
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
    assert model_config["multi_latent_attention"] and not model_config["mla_qkv_concat"] and model_config["qk_layernorm"]
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
        recipe = _sft_recipe(tmp_path, models)
        result = CliRunner().invoke(main, ["export", "--model", str(models["student"]), "--out",
                                           str(tmp_path / "out"), "--recipe", str(recipe)])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not os.environ.get("MINDFORMERS_PYTHON"),
                    reason="MINDFORMERS_PYTHON (python of an environment with mindformers 2.1.0) not set")
def test_mindformers_trainer_builds_its_model_and_loads_the_export(tmp_path, tmp_path_factory):
    sys.path.insert(0, str(BENCH))
    from mindformers_check import check_in_mindformers

    models = shared_models(tmp_path_factory)
    recipe = _sft_recipe(tmp_path, models)
    assert _export(models["student"], tmp_path / "out", "--recipe", str(recipe)).exit_code == 0
    report = check_in_mindformers(os.environ["MINDFORMERS_PYTHON"], tmp_path / "out" / "finetune_mindformers.yaml",
                                  tmp_path / "out", tmp_path)
    assert report["model_class"] == "TrainingDeepseekV3ForCausalLM"
    assert not report["missing_in_export"] and not report["extra_in_export"] and not report["shape_mismatches"]
    assert report["values_loaded_by_mindformers_equal_export"]
    # MindFormers' training graph needs Ascend kernels; on CPU it stops compiling the step (docs/training.md)
    assert report["trainer"] == "ran" or "RmsNorm" in report["trainer"]
