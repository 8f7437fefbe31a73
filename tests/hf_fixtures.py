"""Tiny random HF models (built with ``transformers``) saved as HF directories, for reference tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5)


def build_hf_model(kind: str, out: Path, seed: int = 0, **overrides) -> Path:
    """Save a random tiny ``kind`` model (llama/qwen2/mistral/qwen3) to ``out`` and return it."""
    import torch
    import transformers

    torch.manual_seed(seed)
    params = dict(TINY, **overrides)
    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                  "mistral": transformers.MistralConfig, "qwen3": transformers.Qwen3Config}[kind]
    model_cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                 "mistral": transformers.MistralForCausalLM, "qwen3": transformers.Qwen3ForCausalLM}[kind]
    model = model_cls(config_cls(**params)).eval()
    with torch.no_grad():  # default init is tiny; widen it so attention patterns are not uniform
        for name, param in model.named_parameters():
            if param.ndim == 2:
                param.normal_(0.0, 0.15)
            elif "norm" in name:
                param.uniform_(0.8, 1.2)
            else:
                param.normal_(0.0, 0.1)
    model.save_pretrained(out, safe_serialization=True)
    return out


def hf_logits(model_dir: Path, ids: np.ndarray) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


WORDS = [f"w{i}" for i in range(120)]


def add_word_tokenizer(model_dir: Path, vocab_size: int = 128) -> Path:
    """A word-level ``tokenizer.json`` over ``WORDS`` (ids 0–3 special), enough to drive the CLI."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for word in WORDS[: vocab_size - 4]:
        vocab[word] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.save(str(Path(model_dir) / "tokenizer.json"))
    (Path(model_dir) / "tokenizer_config.json").write_text(
        '{"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}')
    return model_dir


def write_text(path: Path, tokens: int, seed: int) -> Path:
    """Text with some structure (a noisy Markov chain over WORDS) so PCA statistics are not isotropic."""
    rng = np.random.default_rng(seed)
    transition = rng.dirichlet(np.full(len(WORDS), 0.1), size=len(WORDS))
    state, out = 0, []
    for _ in range(tokens):
        state = int(rng.choice(len(WORDS), p=transition[state]))
        out.append(WORDS[state])
    path.write_text(" ".join(out) + "\n")
    return path


def tiny_convertible(tmp: Path, kind: str = "llama", layers: int = 2, **overrides) -> Path:
    model_dir = build_hf_model(kind, tmp / f"{kind}-model", num_hidden_layers=layers, **overrides)
    return add_word_tokenizer(model_dir)
