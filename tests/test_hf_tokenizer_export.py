"""Hugging Face tokenizers for every import, carried by ``export``.

* llama2.c's ``tok*.bin`` becomes a ``tokenizer.json`` that gives run.c's ids (checked against
  a transcription of run.c's encode and against mindyouzhi's own port);
* ``AutoTokenizer`` loads the DeepSeek-V3 export of a llama2.c, GGUF or HF model with the fast
  tokenizer exactly as written (no sentencepiece, no slow conversion) and gives mindyouzhi's ids;
* acceptance: stories260K → convert → export gives mindyouzhi's perplexity in transformers.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import struct
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner

from hf_fixtures import tiny_convertible, write_text
from test_import_gguf import write_gguf
from test_import_llama2c import SEQ as LLAMA2C_SEQ, write_llama2c
from test_tokenizer import SENTENCES, reference_llama2c_encode
from mindyouzhi.cli import main
from mindyouzhi.convert_weights.gguf_reader import import_gguf
from mindyouzhi.convert_weights.gguf_tokenizer import build_tokenizer_files
from mindyouzhi.convert_weights.hf_tokenizer import SPIECE_SPACE, llama2c_hf_files
from mindyouzhi.convert_weights.llama2c import import_llama2c, llama2c_tokenizer_files
from mindyouzhi.errors import UserError
from mindyouzhi.export.deepseek import export_deepseek_v3
from mindyouzhi.tokenizer import HFTokenizer, Llama2cTokenizer, load_tokenizer

STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the sun. "
         "One day, she saw a big red ball in the park. \"Can I play with it?\" she asked her mom. "
         "Her mom smiled and said, \"Yes, but share it with your friend Tom!\" Lily and Tom played all day... "
         "They were very happy!!! The end.\n")
# Characters the synthetic vocabulary leaves out, so they take the byte fallback.
HELD_OUT = set("Tq!")
SAMPLES = SENTENCES + [
    STORY,
    "Lily said, “Wow!” — a café, 你好, 🐶🐶 and T-Rex?",
    " leading space", "two  spaces\tand a tab", "\n\nnewlines first", "aaaa", "",
]
FAST = ["--rope-dim", "8", "--kv-lora-rank", "24", "--freqfold", "2", "--calib-tokens", "1024",
        "--calib-seq-len", "64", "--no-trajectories"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer_llama2c.json",
                   "chat_template.jinja")


def train_llama2c_vocab(corpus: str, merges: int) -> tuple[list[str], list[float]]:
    """A llama2.c vocabulary as its export writes one: specials, 256 byte tokens, merged pieces
    scored ``-rank`` (plain BPE over ``corpus``' space-led words, like sentencepiece's), then the
    single characters."""
    corpus = "".join(c for c in corpus if c not in HELD_OUT)
    words = Counter(re.findall(r" ?[^ ]+| ", " " + corpus))
    segmented = {word: list(word) for word in words}
    learned: list[str] = []
    while len(learned) < merges:
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(segmented[word], segmented[word][1:]):
                pairs[pair] += count
        if not pairs or max(pairs.values()) < 2:
            break
        (left, right), _ = max(pairs.items(), key=lambda item: (item[1], item[0]))
        learned.append(left + right)
        for word, parts in segmented.items():
            index = 0
            while index + 1 < len(parts):
                if (parts[index], parts[index + 1]) == (left, right):
                    parts[index:index + 2] = [left + right]
                index += 1
    chars = sorted(set(" " + corpus))
    vocab = ["<unk>", "\n<s>\n", "\n</s>\n"] + [f"<0x{b:02X}>" for b in range(256)] + learned + chars
    scores = [0.0] * 259 + [-float(rank) for rank in range(len(learned) + len(chars))]
    return vocab, scores


def write_tok_bin(path, vocab: list[str], scores: list[float]):
    """llama2.c's tokenizer file: max_token_length, then (score, length, bytes) per token."""
    encoded = [piece.encode("utf-8") for piece in vocab]
    body = b"".join(struct.pack("<fi", score, len(piece)) + piece for piece, score in zip(encoded, scores))
    path.write_bytes(struct.pack("<i", max(map(len, encoded))) + body)
    return path


@pytest.fixture(scope="module")
def synthetic_tok(tmp_path_factory):
    vocab, scores = train_llama2c_vocab(STORY + " ".join(SENTENCES[:2]), merges=120)
    return write_tok_bin(tmp_path_factory.mktemp("tok") / "tok.bin", vocab, scores), vocab, scores


def write_files(directory, files: dict[str, str]):
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


def auto_tokenizer(directory):
    """``AutoTokenizer`` on ``directory``, asserting it is the fast tokenizer.json as written:
    a slow-to-fast conversion (what needs sentencepiece) would rebuild normalizer and model."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert tokenizer.is_fast
    written = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    loaded = json.loads(tokenizer.backend_tokenizer.to_str())
    for part in ("normalizer", "pre_tokenizer", "model", "decoder"):
        assert loaded[part] == written[part], part
    return tokenizer


def test_llama2c_tokenizer_json_gives_run_c_ids(synthetic_tok, tmp_path):
    tok_bin, vocab, scores = synthetic_tok
    files = llama2c_tokenizer_files(tok_bin, len(vocab), 64)
    assert sorted(files) == sorted(TOKENIZER_FILES[:4])
    directory = write_files(tmp_path / "model", files)
    ours, port = load_tokenizer(directory), Llama2cTokenizer.from_file(directory / "tokenizer_llama2c.json")
    assert isinstance(ours, HFTokenizer) and (ours.bos_token_id, ours.eos_token_id, ours.add_bos_token) == (1, 2, True)
    auto = auto_tokenizer(directory)
    assert (auto.bos_token, auto.eos_token, auto.unk_token, auto.model_max_length) == ("<s>", "</s>", "<unk>", 64)
    fallbacks = 0
    for text in SAMPLES:
        expected = reference_llama2c_encode(vocab, scores, text, bos=False)
        assert ours.encode(text) == port.encode(text) == expected, text
        assert auto(text).input_ids == [1] + expected  # BOS first, as llama2.c models are trained
        assert ours.decode(expected) == auto.decode([1] + expected, skip_special_tokens=True) == text
        fallbacks += sum(3 <= token < 259 for token in expected)
    assert fallbacks > 20  # held-out characters, CJK and emoji went through the byte tokens
    hf_vocab = json.loads(files["tokenizer.json"])["model"]["vocab"]
    assert hf_vocab[f"{SPIECE_SPACE}the"] == vocab.index(" the") and hf_vocab["<0x0A>"] == 13


def test_llama2c_pieces_that_hf_cannot_spell_are_refused(synthetic_tok, tmp_path):
    _, vocab, scores = synthetic_tok
    for changed, words in [({-1: "x" + SPIECE_SPACE}, "contains '▁'"), ({-1: " the"}, "are both spelled '▁the'")]:
        bad = list(vocab)
        for index, piece in changed.items():
            bad[index] = piece
        path = write_tok_bin(tmp_path / "bad.bin", bad, scores)
        with pytest.raises(UserError, match=words) as info:
            llama2c_tokenizer_files(path, None, None)
        assert str(path) in str(info.value)


def test_sentencepiece_gguf_tokenizer_puts_bos_first(synthetic_tok, tmp_path):
    """A GGUF "llama" vocabulary (no merges: ranked from the scores) says add_bos_token; the
    tokenizer.json itself must then prepend BOS for AutoTokenizer, vLLM and MindIE."""
    _, vocab, scores = synthetic_tok
    pieces = ["<unk>", "<s>", "</s>"] + [piece.replace(" ", SPIECE_SPACE) for piece in vocab[3:]]
    metadata = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": pieces, "tokenizer.ggml.scores": scores,
                "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * (len(vocab) - 259),
                "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                "tokenizer.ggml.unknown_token_id": 0}
    auto = auto_tokenizer(write_files(tmp_path / "gguf", build_tokenizer_files(metadata, "synthetic.gguf")))
    for text in SAMPLES[-6:]:
        assert auto(text).input_ids == reference_llama2c_encode(vocab, scores, text, bos=True)


# ------------------------------------------------------------------------------------------
# Exports of every source kind load in AutoTokenizer
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """One tiny converted model; each export test gives it the tokenizer files of another source."""
    root = tmp_path_factory.mktemp("converted")
    source = tiny_convertible(root / "hf", "llama")
    out = root / "mla"
    result = CliRunner().invoke(main, ["convert", "--model", str(source), "--out", str(out), "--calib",
                                       str(write_text(root / "calib.txt", 3000, seed=0)), "--json", *FAST])
    assert result.exit_code == 0, result.output
    return source, out


def llama2c_source(tmp_path, tok_bin, vocab):
    model, _ = write_llama2c(tmp_path / "model.bin", vocab=len(vocab))
    import_llama2c(model, tok_bin, tmp_path / "imported")
    return tmp_path / "imported"


def llama2c_source_imported_before_tokenizer_json(tmp_path, tok_bin, vocab):
    directory = llama2c_source(tmp_path, tok_bin, vocab)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (directory / name).unlink()
    return directory


def gguf_source(tmp_path, *_):
    import_gguf(write_gguf(tmp_path / "tiny.gguf"), tmp_path / "imported")
    return tmp_path / "imported"


SOURCES = {
    "llama2c": (llama2c_source, STORY + "Lily said, “Wow!” 🐶"),
    "llama2c_imported_before": (llama2c_source_imported_before_tokenizer_json, STORY),
    "gguf": (gguf_source, "the teeth<|endoftext|>thé"),
    "hf": (lambda tmp_path, *_: None, "w1 w2 w17 w3"),
}


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_every_export_loads_in_auto_tokenizer(kind, converted, synthetic_tok, tmp_path):
    hf_source, mla = converted
    tok_bin, vocab, _ = synthetic_tok
    make_source, text = SOURCES[kind]
    source = make_source(tmp_path, tok_bin, vocab) or hf_source
    model = tmp_path / "mla"
    shutil.copytree(mla, model)
    for name in TOKENIZER_FILES:
        (model / name).unlink(missing_ok=True)
        if (source / name).is_file():
            shutil.copyfile(source / name, model / name)

    summary = export_deepseek_v3(model, tmp_path / "ds")
    exported = {path.name for path in (tmp_path / "ds").iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= exported
    assert summary["derived_tokenizer_files"] == {
        "llama2c_imported_before": ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"],
        "gguf": ["special_tokens_map.json"], "hf": ["special_tokens_map.json"]}.get(kind, [])
    auto = auto_tokenizer(tmp_path / "ds")
    expected = load_tokenizer(source).encode(text)
    assert auto(text, add_special_tokens=False).input_ids == expected and len(expected) > 3
    assert auto.decode(expected, skip_special_tokens=True) == load_tokenizer(source).decode(expected)
    special_map = json.loads((tmp_path / "ds" / "special_tokens_map.json").read_text())
    assert special_map["eos_token"] == auto.eos_token
    if kind.startswith("llama2c"):
        assert auto(text).input_ids == [1] + expected
        # An import takes the length from the llama2.c header, the export from the converted config.
        assert auto.model_max_length == (LLAMA2C_SEQ if kind == "llama2c" else
                                         json.loads((mla / "config.json").read_text())["max_position_embeddings"])


# ------------------------------------------------------------------------------------------
# The real stories260K tokenizer and model
# ------------------------------------------------------------------------------------------


@pytest.mark.shared
def test_tok512_tokenizer_json_matches_run_c_on_wikitext(shared_dir, tmp_path):
    from mindyouzhi.convert_weights.llama2c import read_llama2c_tokenizer

    tok512 = shared_dir / "models/stories260K/tok512.bin"
    data = read_llama2c_tokenizer(tok512, 512)
    directory = write_files(tmp_path / "model", llama2c_hf_files(Llama2cTokenizer(tok512, data), 512))
    ours, port = load_tokenizer(directory), Llama2cTokenizer(tok512, data)
    wiki = (shared_dir / "data/wikitext-2/wiki.test.raw").read_text(encoding="utf-8")
    ids = ours.encode(wiki)
    assert ids == port.encode(wiki) and len(ids) > 800_000
    assert ours.decode(ids) == wiki
    lines = [line for line in wiki.splitlines(keepends=True) if line.strip()][:150]
    for text in lines + SAMPLES:
        assert ours.encode(text) == reference_llama2c_encode(data["vocab"], data["scores"], text, bos=False), text


@pytest.mark.shared
def test_stories260k_export_gives_mindyouzhi_perplexity_in_transformers(shared_dir, tmp_path):
    """Acceptance (issue 13): import → convert → export; AutoTokenizer + DeepseekV3ForCausalLM on
    wiki.test.raw windows give mindyouzhi's ids and perplexity (asked: relative difference ≤ 1e-3; both
    sides fp32 here, so ≤ 1e-5 — the default bf16 forward alone moves it by ~2e-3)."""
    import torch
    import transformers

    models, wiki = shared_dir / "models/stories260K", shared_dir / "data/wikitext-2"
    import_llama2c(models / "stories260K.bin", models / "tok512.bin", tmp_path / "src")
    runner = CliRunner()
    result = runner.invoke(main, ["convert", "--model", str(tmp_path / "src"), "--out", str(tmp_path / "mla"),
                                  "--calib", str(wiki / "wiki.valid.tokens"), "--rope-dim", "4", "--kv-lora-rank", "32",
                                  "--freqfold", "2", "--calib-tokens", "2048", "--calib-seq-len", "64",
                                  "--no-trajectories", "--json"])
    assert result.exit_code == 0, result.output
    export_deepseek_v3(tmp_path / "mla", tmp_path / "ds")
    seq_len, count = 256, 4
    result = runner.invoke(main, ["eval", "ppl", "--model", str(tmp_path / "mla"), "--data", str(wiki / "wiki.test.raw"),
                                  "--seq-len", str(seq_len), "--max-windows", str(count),
                                  "--forward-precision", "fp32", "--json"])
    assert result.exit_code == 0, result.output
    ours = json.loads(result.stdout)

    text = (wiki / "wiki.test.raw").read_text(encoding="utf-8")
    ids = auto_tokenizer(tmp_path / "ds")(text, add_special_tokens=False).input_ids
    assert ids == load_tokenizer(tmp_path / "mla").encode(text)
    windows = torch.tensor(np.asarray(ids[: count * seq_len]).reshape(count, seq_len))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ds"), dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    with torch.no_grad():
        logits = model(windows).logits.double()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1),
                                            reduction="sum").item()
    theirs = math.exp(nll / (count * (seq_len - 1)))
    assert ours["windows"] == count and abs(theirs / ours["ppl"] - 1) <= 1e-5, (theirs, ours["ppl"])
