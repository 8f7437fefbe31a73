"""The ``config.json`` of an exported model: a dense DeepSeek-V3 with ``q_lora_rank: null``.

Field by field, why:

* ``first_k_dense_replace = num_hidden_layers``: DeepSeek-V3 replaces the MLP of every layer from
  this index on by an MoE; setting it to the layer count keeps all MLPs dense (our SwiGLU).  The
  MoE fields must still be valid for the config classes to load, so they get the smallest legal
  values (one expert, one group); no engine builds an MoE from them.
* ``q_lora_rank``: null, unless the source has query biases — then ``hidden_size + k`` with the
  pinned-norm factorisation of ``plan.py`` (the only stock path that carries a query bias).
* ``num_key_value_heads = num_attention_heads``: after ``kv_b_proj`` every head has its own key
  and value (engines that expand the latent read this).
* ``qk_nope_head_dim = v_head_dim = head_dim`` and ``qk_rope_head_dim = rope_dim``: our queries
  were rescaled at conversion so that DeepSeek's softmax scale ``1/sqrt(head_dim + rope_dim)`` is
  the right one.
* ``rope_interleave: true`` with the rows permuted accordingly (DeepSeek's checkpoint layout; vLLM
  and MindIE assume it whatever the flag says).
* ``rope_scaling`` exactly as in the source and ``rope_theta`` = base^(s·rope_dim/head_dim): a table of
  width ``rope_dim`` with that base gives the frequencies θ_{s·p} of our RoPE slice — the source's
  base at TransMLA's stride s = head_dim/rope_dim (``plan.engine_rope_theta``; ``plan_export``
  checked the scaling reproduces too).  Never rewritten to ``deepseek_yarn``, which would change them.
* ``num_nextn_predict_layers: 0``: no multi-token-prediction module is shipped.
* ``tie_word_embeddings: false`` with an explicit ``lm_head.weight`` (see ``deepseek_tensors``).
* ``rms_norm_eps: 1e-6`` whatever the source's: the weights were rescaled so that this epsilon
  reproduces the source norms (see ``plan.py``), and it is the value transformers hard-codes for
  ``kv_a_layernorm``.
"""
from __future__ import annotations

from typing import Any

from .plan import DEEPSEEK_NORM_EPS, ExportPlan, engine_rope_theta

# Keys of the source config that carry over unchanged when present.
_CARRIED = ("bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "max_position_embeddings",
            "rms_norm_eps", "vocab_size", "hidden_size", "intermediate_size", "hidden_act")


def deepseek_v3_config(plan: ExportPlan) -> dict[str, Any]:
    config = plan.config
    raw = config.raw
    data: dict[str, Any] = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}
    data.update({key: raw[key] for key in _CARRIED if key in raw})
    data.update({
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": DEEPSEEK_NORM_EPS,
        "num_hidden_layers": plan.num_layers,
        "num_attention_heads": plan.num_heads,
        "num_key_value_heads": plan.num_heads,
        "q_lora_rank": plan.q_lora_rank,
        "kv_lora_rank": plan.kv_lora_rank,
        "qk_nope_head_dim": plan.head_dim,
        "qk_rope_head_dim": plan.rope_dim,
        "v_head_dim": plan.head_dim,
        "rope_interleave": True,
        "rope_theta": engine_rope_theta(config),
        "rope_scaling": _source_rope_scaling(plan),
        "attention_bias": plan.attention_bias,
        "attention_dropout": 0.0,
        "first_k_dense_replace": plan.num_layers,
        "moe_layer_freq": 1,
        "n_routed_experts": 1,
        "n_shared_experts": 1,
        "num_experts_per_tok": 1,
        "n_group": 1,
        "topk_group": 1,
        "moe_intermediate_size": config.intermediate_size,
        "routed_scaling_factor": 1.0,
        "norm_topk_prob": True,
        "num_nextn_predict_layers": 0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": "float32",
    })
    # Provenance for people, ignored by engines.
    data["mindyouzhi"] = {
        "exported_from": str(plan.model_dir),
        "source_model_type": config.model_type,
        "fold_plan": list(config.mla.fold_plan),
        "source_head_dim": config.head_dim,
        "source_rms_norm_eps": config.rms_norm_eps,
        "residual_scale": plan.norm_scale,
    }
    if plan.query is not None:
        data["mindyouzhi"]["query_bias_factorisation"] = {
            "q_lora_rank": plan.query.rank, "constant_channels": plan.query.constant_channels,
            "note": "q_proj with bias rewritten as q_a_proj (+bias) → pinned q_a_layernorm → q_b_proj; exact"}
    return data


def _source_rope_scaling(plan: ExportPlan):
    """The source's scaling dict as its own config spelled it (``rope_scaling`` or
    ``rope_parameters``), without the keys transformers adds itself."""
    raw = plan.config.raw
    scaling = raw.get("rope_scaling") or raw.get("rope_parameters") or None
    if not scaling or scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return None
    return {k: v for k, v in scaling.items() if k != "rope_theta"}
