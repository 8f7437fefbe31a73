"""mindyouzhi.tokenizer: the llama2.c port, the tokenizer.json backend, chat templates, errors."""
from __future__ import annotations

import json
import struct

import pytest

from mindyouzhi.errors import UserError
from mindyouzhi.tokenizer import (
    LLAMA2C_TOKENIZER_FILE,
    HFTokenizer,
    Llama2cTokenizer,
    load_tokenizer,
)

SENTENCES = [
    "Once upon a time, there was a little girl named Lily.",
    "She loved to play outside in the park. One day, she saw a big, red ball!",
    "  leading spaces, trailing spaces  ",
    "Tabs\tand\nnewlines\n\nand digits 12345 and symbols #$%^&*()",
    "Unicode: naïve café, 你好世界, emoji 🚀👩‍👩‍👧",
    "x",
]


def reference_llama2c_encode(vocab: list[str], scores: list[float], text: str, bos: bool) -> list[int]:
    """A line-by-line transcription of run.c's encode(): quadratic, obviously correct."""
    lookup = {}
    for token_id, piece in enumerate(vocab):
        lookup.setdefault(piece, token_id)
    tokens = [1] if bos else []
    if text:
        tokens.append(lookup[" "])
    for char in text:
        if char in lookup:
            tokens.append(lookup[char])
        else:
            tokens.extend(byte + 3 for byte in char.encode("utf-8"))
    while True:
        best_score, best_id, best_index = -1e10, -1, -1
        for index in range(len(tokens) - 1):
            merged = lookup.get(vocab[tokens[index]] + vocab[tokens[index + 1]])
            if merged is not None and scores[merged] > best_score:
                best_score, best_id, best_index = scores[merged], merged, index
        if best_index == -1:
            return tokens
        tokens[best_index : best_index + 2] = [best_id]


def read_tok_bin(path) -> tuple[list[str], list[float]]:
    data = path.read_bytes()
    offset, vocab, scores = 4, [], []
    while offset < len(data):
        score, length = struct.unpack_from("<fi", data, offset)
        vocab.append(data[offset + 8 : offset + 8 + length].decode("utf-8"))
        scores.append(score)
        offset += 8 + length
    return vocab, scores


@pytest.fixture(scope="module")
def tok512(shared_dir):
    return shared_dir / "models/stories260K/tok512.bin"


@pytest.fixture(scope="module")
def stories_tokenizer(tok512, tmp_path_factory):
    from mindyouzhi.convert_weights.llama2c import read_llama2c_tokenizer

    model_dir = tmp_path_factory.mktemp("stories_tok")
    (model_dir / LLAMA2C_TOKENIZER_FILE).write_text(json.dumps(read_llama2c_tokenizer(tok512, 512)), encoding="utf-8")
    return load_tokenizer(model_dir)


@pytest.mark.shared
@pytest.mark.parametrize("add_bos", [False, True])
def test_llama2c_encode_matches_reference(stories_tokenizer, tok512, shared_dir, add_bos):
    vocab, scores = read_tok_bin(tok512)
    wiki = (shared_dir / "data/wikitext-2/wiki.test.raw").read_text(encoding="utf-8")[10_000:13_000]
    for sentence in SENTENCES + [wiki]:
        assert stories_tokenizer.encode(sentence, add_bos=add_bos) == reference_llama2c_encode(vocab, scores, sentence, add_bos)


@pytest.mark.shared
def test_llama2c_round_trip_and_attributes(stories_tokenizer):
    assert isinstance(stories_tokenizer, Llama2cTokenizer)
    assert (stories_tokenizer.bos_token_id, stories_tokenizer.eos_token_id, stories_tokenizer.vocab_size) == (1, 2, 512)
    for sentence in SENTENCES + [""]:
        assert stories_tokenizer.decode(stories_tokenizer.encode(sentence)) == sentence
        assert stories_tokenizer.decode(stories_tokenizer.encode(sentence, add_bos=True)) == sentence
    assert stories_tokenizer.encode("") == []
    assert stories_tokenizer.encode("", add_bos=True) == [1]
    # Emoji are not in the 512-token vocabulary: they fall back to their UTF-8 bytes (id 3 + byte).
    assert stories_tokenizer.encode("🚀")[-4:] == [3 + byte for byte in "🚀".encode("utf-8")]
    # BOS/EOS are dropped by default and spelled as llama2.c stores them when asked for.
    ids = [1] + stories_tokenizer.encode("Hi") + [2]
    assert stories_tokenizer.decode(ids) == "Hi"
    assert stories_tokenizer.decode(ids, skip_special_tokens=False) == "\n<s>\nHi\n</s>\n"


@pytest.mark.shared
def test_llama2c_encode_is_fast_on_long_text(stories_tokenizer, shared_dir):
    import time

    text = (shared_dir / "data/wikitext-2/wiki.test.raw").read_text(encoding="utf-8")[:200_000]
    start = time.perf_counter()
    ids = stories_tokenizer.encode(text)
    assert time.perf_counter() - start < 10
    assert stories_tokenizer.decode(ids) == text


def _write_llama2c_json(directory, **changes):
    vocab = ["<unk>", "\n<s>\n", "\n</s>\n"] + [f"<0x{b:02X}>" for b in range(256)] + [" ", "a", "b", " a", "ab", " ab"]
    data = {
        "format": "mindyouzhi-llama2c-tokenizer", "version": 1, "vocab": vocab,
        "scores": [0.0] * 259 + [-5.0, -6.0, -7.0, -1.0, -2.0, -3.0], "max_token_length": 3,
        "bos_token_id": 1, "eos_token_id": 2, "unk_token_id": 0, "byte_fallback_offset": 3,
    }
    data.update(changes)
    (directory / LLAMA2C_TOKENIZER_FILE).write_text(json.dumps(data), encoding="utf-8")
    return directory


def test_llama2c_merges_by_score_on_synthetic_vocab(tmp_path):
    tokenizer = load_tokenizer(_write_llama2c_json(tmp_path))
    vocab = json.loads((tmp_path / LLAMA2C_TOKENIZER_FILE).read_text())["vocab"]
    # " a" (-1) beats "ab" (-2), then " ab" (-3) joins the rest.
    assert tokenizer.encode("ab") == [vocab.index(" ab")]
    assert tokenizer.encode("ba") == [vocab.index(" "), vocab.index("b"), vocab.index("a")]
    assert tokenizer.decode(tokenizer.encode("abab c")) == "abab c"


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"format": "something-else"}, "not a llama2.c tokenizer"),
        ({"version": 7}, "unsupported version 7"),
        ({"scores": [0.0]}, "'scores' must be a list of 265 numbers"),
        ({"bos_token_id": 9999}, "'bos_token_id' must be a token id"),
        ({"byte_fallback_offset": 4}, "expected byte token '<0x00>'"),
    ],
)
def test_llama2c_invalid_json_names_the_file(tmp_path, changes, words):
    _write_llama2c_json(tmp_path, **changes)
    with pytest.raises(UserError, match=words) as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path / LLAMA2C_TOKENIZER_FILE) in str(info.value)


def test_missing_tokenizer_names_the_directory(tmp_path):
    with pytest.raises(UserError, match="no tokenizer found; expected tokenizer.json") as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(UserError, match="model directory not found"):
        load_tokenizer(tmp_path / "nope")


def test_invalid_tokenizer_json_names_the_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="invalid tokenizer.json") as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(info.value)


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _hf_model_dir(directory, tokenizer_config: dict | None):
    """A word-level tokenizer.json with two special tokens, built with the tokenizers library."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "hello": 3, "world": 4, "user": 5}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    tokenizer.save(str(directory / "tokenizer.json"))
    if tokenizer_config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    return directory


def test_hf_backend_bos_only_on_request_and_chat_template(tmp_path):
    config = {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "chat_template": CHATML}
    tokenizer = load_tokenizer(_hf_model_dir(tmp_path, config))
    assert isinstance(tokenizer, HFTokenizer)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.vocab_size) == (1, 2, 6)
    assert tokenizer.encode("hello world") == [3, 4]
    assert tokenizer.encode("hello world", add_bos=True) == [1, 3, 4]
    assert tokenizer.encode("<|im_start|> user") == [1, 5]  # special tokens are matched whole
    assert tokenizer.decode([1, 3, 4, 2]) == "hello world"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}])
    assert prompt == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=False).endswith("<|im_end|>\n")


def test_hf_backend_chat_template_file_and_errors(tmp_path):
    raising = "{{ raise_exception('only user messages') }}"
    model_dir = _hf_model_dir(tmp_path, {"bos_token": None})
    (model_dir / "chat_template.jinja").write_text(raising, encoding="utf-8")
    tokenizer = load_tokenizer(model_dir)
    assert tokenizer.bos_token_id is None
    with pytest.raises(UserError, match="chat template failed: only user messages"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hello"}])
    with pytest.raises(UserError, match="no BOS token"):
        tokenizer.encode("hello", add_bos=True)


def test_hf_backend_special_ids_from_config_json_and_post_processor(tmp_path):
    """Llama-3-style dir: no special tokens or add_bos_token in tokenizer_config.json; config.json
    has the ids and tokenizer.json's post-processor prepends BOS."""
    from tokenizers import Tokenizer, processors

    _hf_model_dir(tmp_path, {"chat_template": CHATML})
    tokenizer_json = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tokenizer_json.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    tokenizer_json.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0]}), encoding="utf-8")
    tokenizer = load_tokenizer(tmp_path)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.add_bos_token) == (1, 2, True)
    assert tokenizer.encode("hello") == [3]  # the post-processor is never applied implicitly

    # An explicit null in tokenizer_config.json wins over config.json (Qwen2.5: no BOS).
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "add_bos_token": False}), encoding="utf-8")
    tokenizer = load_tokenizer(tmp_path)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.add_bos_token) == (None, 2, False)


def test_no_chat_template_is_a_user_error(tmp_path):
    tokenizer = load_tokenizer(_hf_model_dir(tmp_path, None))
    with pytest.raises(UserError, match="the model has no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hello"}])
    llama2c_dir = tmp_path / "llama2c"
    llama2c_dir.mkdir()
    llama2c = load_tokenizer(_write_llama2c_json(llama2c_dir))
    with pytest.raises(UserError, match="the model has no chat template"):
        llama2c.apply_chat_template([{"role": "user", "content": "hello"}])


def test_unknown_special_token_names_config(tmp_path):
    _hf_model_dir(tmp_path, {"bos_token": "<s>"})
    with pytest.raises(UserError, match=r"bos_token '<s>' is not in the vocabulary") as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer_config.json") in str(info.value)
