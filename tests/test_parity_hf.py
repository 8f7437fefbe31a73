"""Our MindSpore GQA model against HF transformers (independent reference) on the same weights."""
import numpy as np
import pytest

from hf_fixtures import build_hf_model, hf_logits
from mindyouzhi.models.runner import ModelRunner

CASES = {
    "llama": ("llama", {}),
    "llama_bias": ("llama", {"attention_bias": True}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "llama_mlp_bias": ("llama", {"mlp_bias": True, "attention_bias": True}),
    "qwen2_bias": ("qwen2", {}),
    "mistral": ("mistral", {}),
    "qwen3_qknorm": ("qwen3", {}),
    "llama3_scaling": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
    "linear_scaling": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "dynamic_scaling": ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
    "yarn_scaling": ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    kind, overrides = CASES[case]
    model_dir = build_hf_model(kind, tmp_path / case, **overrides)
    ids = np.random.default_rng(1).integers(0, 128, size=(2, 40))
    ours = ModelRunner.from_dir(model_dir, with_tokenizer=False).logits(ids)
    reference = hf_logits(model_dir, ids)
    assert np.abs(reference).max() > 0.5  # the models are not degenerate
    np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)
