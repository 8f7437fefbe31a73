"""The MindFormers fine-tuning YAML that goes with ``export --format mindformers --recipe SFT.yaml``.

MindFormers (2.1.0, mcore path, ``use_legacy: False``) fine-tunes the exported checkpoint with its
own trainer: ``msrun … run_mindformer.py --config finetune_mindformers.yaml`` (or
``scripts/msrun_launcher.sh``).  The YAML is built from one of our SFT recipes, so the two
trainers run the same schedule, batch layout, parallel layout and data:

* ``model.model_config`` — the exported ``config.json`` plus what MindFormers' DeepSeek-V3 needs
  to build the dense MLA model the export holds: ``multi_latent_attention``, separate q/kv
  projections (``mla_qkv_concat: False``) or, for a model with attention biases
  (``attention_bias``, which MindFormers maps to ``add_qkv_bias``), the concatenated ``linear_qkv``
  that carries them (``mla_qkv_concat: True``, see ``convert_weights/mindformers_names.py``), the
  latent norm (``qk_layernorm: True``), no routed experts (dense MLP in every layer), bf16
  compute with fp32 parameters;
* ``load_checkpoint`` — the export directory (mcore names, ``param_name_map.json``); MindFormers'
  own Hugging Face renaming (``weight_mapping``) has no rule for a DeepSeek-V3 without
  ``q_lora_rank`` (``self_attn.q_proj``), which is why this export writes mcore names itself;
* ``pretrained_model_dir`` — the same directory, for the tokenizer;
* ``train_dataset`` — MindFormers' ``HFDataLoader`` over the recipe's SFT file (Alpaca records),
  ``AlpacaInstructDataHandler`` and, with ``packing``, ``PackingHandler``;
* ``parallel_config`` / ``parallel`` — the recipe's data/model/pipeline layout, semi-auto
  parallel, the parallel optimizer when the recipe shards optimizer state;
* ``optimizer``, ``lr_schedule``, ``runner_config``, ``runner_wrapper``, ``recompute_config``,
  ``context`` — the recipe's values under the same keys (our recipes already use these names).

GKD has no MindFormers counterpart (MindFormers has no logit distillation): it stays with
``mindyouzhi train``; only SFT recipes are accepted here.

``mindformers_stream`` turns the DeepSeek-V3 tensor stream (``deepseek_tensors.py``) into the
MindFormers checkpoint: renamed as ``mindformers_names.py`` says, with the query bias (which the
DeepSeek-V3 layout can only carry through a factorised query) read from the source and carried
directly in ``linear_qkv.bias``.
"""
from __future__ import annotations

import json
from pathlib import Path

from mindyouzhi.convert_weights.mindformers_names import SPLIT, Layout, mindformers_shapes, to_mindformers
from mindyouzhi.errors import UserError
from mindyouzhi.models.rope import rotate_half_to_interleaved_rows

from .deepseek_tensors import _bias_or_zeros, _interleaved_query

YAML_NAME = "finetune_mindformers.yaml"

# DeepSeek-V3 config.json keys that describe MoE routing; the export is dense in every layer.
_MOE_KEYS = ("n_routed_experts", "n_group", "topk_group", "num_experts_per_tok", "moe_intermediate_size",
             "n_shared_experts", "routed_scaling_factor", "moe_layer_freq", "norm_topk_prob", "first_k_dense_replace")


def mindformers_layout(plan) -> Layout:
    """Split MLA for a model without attention biases, the concatenated one (which carries them) otherwise."""
    if not plan.attention_bias:
        return SPLIT
    return Layout(qkv_concat=True, num_heads=plan.num_heads, qk_nope_head_dim=plan.head_dim,
                  v_head_dim=plan.head_dim)


def mindformers_stream(plan, store, shapes: dict, tensors):
    """(shapes, tensors) of the MindFormers export, from the DeepSeek-V3 ones of the same ``plan``."""
    layout = mindformers_layout(plan)
    if layout.qkv_concat:
        shapes, tensors = _with_query_bias(plan, store, shapes, tensors)
    return mindformers_shapes(shapes, layout), to_mindformers(tensors, layout)


def _with_query_bias(plan, store, shapes: dict, tensors):
    """Insert ``q_proj.bias`` (RoPE rows interleaved like ``q_proj.weight``; zero where the source
    has none) after each ``q_proj.weight``: ``linear_qkv.bias`` starts with it."""
    with_bias = {}
    for name, shape in shapes.items():
        with_bias[name] = shape
        if name.endswith("self_attn.q_proj.weight"):
            with_bias[name[:-len("weight")] + "bias"] = (shape[0],)
    order = rotate_half_to_interleaved_rows(plan.rope_dim)

    def stream():
        for name, array in tensors:
            yield name, array
            if name.endswith("self_attn.q_proj.weight"):
                bias_name = name[:-len("weight")] + "bias"
                yield bias_name, _interleaved_query(plan, _bias_or_zeros(store, bias_name, array.shape[0]), order)

    return with_bias, stream()


def check_recipe_for_mindformers(recipe) -> None:
    """Refuse what MindFormers' fine-tuning cannot take, before anything is exported."""
    where = f"--recipe {recipe.path}"
    if recipe.run_mode != "sft":
        raise UserError(f"{where}: run_mode {recipe.run_mode} has no MindFormers counterpart (MindFormers has no "
                        f"logit distillation); give an SFT recipe, and run GKD with `mindyouzhi train`")
    if len(recipe.sources) != 1 or recipe.sources[0].format != "sft" or recipe.sources[0].path.is_dir():
        raise UserError(f"{where}: train_dataset.sources must be one SFT .json/.jsonl file (MindFormers' "
                        f"HFDataLoader reads one Alpaca file), got {len(recipe.sources)} source(s)")
    if recipe.model["trainable"] != "all":
        raise UserError(f"{where}: model.trainable {recipe.model['trainable']} has no MindFormers counterpart; "
                        f"use trainable: all")


def mindformers_yaml(recipe, export_dir: Path, exported_config: dict) -> dict:
    """The MindFormers YAML (as a dict) for fine-tuning ``export_dir`` as ``recipe`` says."""
    check_recipe_for_mindformers(recipe)
    export_dir = Path(export_dir).resolve()
    rc, pc, seq_length = recipe.runner_config, recipe.parallel_config, recipe.train_dataset["seq_length"]
    workers = recipe.workers
    model_config = {k: v for k, v in exported_config.items() if k not in ("mindyouzhi", "architectures") + _MOE_KEYS}
    # attention biases need the concatenated MLA (the split one builds every projection without bias)
    model_config.update(multi_latent_attention=True, mla_qkv_concat=bool(exported_config.get("attention_bias")),
                        qk_layernorm=True,
                        use_interleaved_weight_layout_mlp=True,  # linear_fc1 rows: gate_0, up_0, gate_1, …
                        n_routed_experts=None, n_group=None, topk_group=None, seq_length=seq_length,
                        compute_dtype=recipe.model["compute_dtype"], params_dtype="float32",
                        softmax_compute_dtype="float32", rotary_dtype="float32")
    handlers = [{"type": "AlpacaInstructDataHandler", "seq_length": seq_length, "padding": not recipe.train_dataset["packing"],
                 "tokenizer": {"padding_side": "right"}}]
    if recipe.train_dataset["packing"]:
        handlers.append({"type": "PackingHandler", "seq_length": seq_length, "pack_strategy": "pack"})
    source = recipe.sources[0]
    dataset = {
        "data_loader": {"type": "HFDataLoader", "load_func": "load_dataset", "path": "json",
                        "data_files": str(source.path.resolve()), "split": "train",
                        "create_attention_mask": True, "create_compressed_eod_mask": False,
                        "use_broadcast_data": True, "shuffle": recipe.train_dataset["shuffle"], "handler": handlers},
        "num_parallel_workers": 1, "python_multiprocessing": False, "drop_remainder": True, "seed": recipe.seed,
    }
    if source.max_samples:
        handlers.insert(0, {"type": "take", "n": source.max_samples})
    lr = recipe.lr_schedule
    context = {"mode": 0, "device_target": recipe.context["device_target"] if recipe.context["device_target"] != "auto"
               else "Ascend", "max_call_depth": 10000, "jit_config": {"jit_level": "O0"}}
    if recipe.context["max_device_memory"]:
        context["max_device_memory"] = recipe.context["max_device_memory"]
    return {
        "seed": recipe.seed,
        "output_dir": str(recipe.output_dir),
        "run_mode": "finetune",
        "use_legacy": False,
        "use_parallel": workers > 1,
        "pretrained_model_dir": str(export_dir),
        "load_checkpoint": str(export_dir),
        "load_ckpt_format": "safetensors",
        "auto_trans_ckpt": workers > 1,
        "resume_training": False,
        "trainer": {"type": "CausalLanguageModelingTrainer", "model_name": "deepseekV3"},
        "runner_config": {"epochs": rc["epochs"], "batch_size": rc["batch_size"], "sink_mode": True, "sink_size": 1,
                          "gradient_accumulation_steps": rc["gradient_accumulation_steps"]},
        "optimizer": {"type": "AdamW", "betas": list(recipe.optimizer["betas"]), "eps": recipe.optimizer["eps"],
                      "weight_decay": recipe.optimizer["weight_decay"]},
        "lr_schedule": {"type": "CosineWithWarmUpLR", "learning_rate": lr["learning_rate"], "lr_end": lr["lr_end"],
                        "warmup_ratio": lr["warmup_ratio"], "total_steps": lr["total_steps"],
                        **({"warmup_steps": lr["warmup_steps"]} if lr["warmup_steps"] is not None else {})},
        "train_dataset": dataset,
        "train_dataset_task": {"type": "CausalLanguageModelDataset", "dataset_config": dataset},
        "context": context,
        "parallel_config": {"data_parallel": pc["data_parallel"], "model_parallel": pc["model_parallel"],
                            "pipeline_stage": pc["pipeline_stage"], "micro_batch_num": pc["micro_batch_num"],
                            "use_seq_parallel": False, "expert_parallel": 1},
        "parallel": {"parallel_mode": 1, "gradients_mean": False, "enable_alltoall": False,
                     "full_batch": False, "search_mode": "sharding_propagation",
                     "enable_parallel_optimizer": pc["optimizer_shard"],
                     "strategy_ckpt_config": {"save_file": "./ckpt_strategy.ckpt", "only_trainable_params": False}},
        "recompute_config": {"recompute": recipe.recompute, "select_recompute": False, "mp_comm_recompute": False},
        "model": {"model_config": model_config},
        "callbacks": [{"type": "MFLossMonitor"},
                      {"type": "CheckpointMonitor", "prefix": "youzhi", "checkpoint_format": "safetensors",
                       "save_checkpoint_steps": rc["save_steps"] or 1000, "keep_checkpoint_max": rc["keep_checkpoints"],
                       "integrated_save": False, "async_save": False}],
        "runner_wrapper": {"type": "MFTrainOneStepCell", "scale_sense": 1.0,
                           "use_clip_grad": recipe.runner_wrapper["use_clip_grad"],
                           "max_grad_norm": recipe.runner_wrapper["max_grad_norm"]},
    }


def write_mindformers_yaml(recipe, export_dir: Path) -> Path:
    """Write ``finetune_mindformers.yaml`` into a finished export (one atomic file)."""
    import yaml

    export_dir = Path(export_dir)
    config = json.loads((export_dir / "config.json").read_text(encoding="utf-8"))
    path = export_dir / YAML_NAME
    tmp = path.with_name(f".{path.name}.tmp")
    header = (f"# MindFormers 2.1.0 fine-tuning of this export, from {recipe.path} (written by mindyouzhi export).\n"
              f"#   msrun --worker_num={recipe.workers} --local_worker_num=<NPUs on this node> --master_addr=<node 0> "
              f"--node_rank=<this node> run_mindformer.py --config {path.resolve()}\n")
    tmp.write_text(header + yaml.safe_dump(mindformers_yaml(recipe, export_dir, config), sort_keys=False,
                                           allow_unicode=True), encoding="utf-8")
    tmp.replace(path)
    return path
