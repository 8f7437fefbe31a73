"""llama2.c import: stories260K end to end, the RoPE row permutation, bad files, the CLI commands."""
from __future__ import annotations

import json
import struct

import click
import numpy as np
import pytest
from click.testing import CliRunner

from mindyouzhi.commands_import import fetch, import_cmd
from mindyouzhi.convert_weights.hf_layout import interleaved_to_rotate_half
from mindyouzhi.convert_weights.llama2c import import_llama2c, read_llama2c_checkpoint
from mindyouzhi.errors import UserError
from mindyouzhi.tokenizer import load_tokenizer

STORY_START = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


@pytest.fixture(scope="module")
def stories_dir(shared_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("stories") / "model"
    root = shared_dir / "models/stories260K"
    summary = import_llama2c(root / "stories260K.bin", root / "tok512.bin", out)
    return out, summary


@pytest.mark.shared
def test_stories260k_greedy_decoding_in_transformers(stories_dir):
    import torch
    from transformers import LlamaForCausalLM

    out, summary = stories_dir
    assert (summary["layers"], summary["heads"], summary["kv_heads"], summary["head_dim"], summary["vocab"]) == (5, 8, 4, 8, 512)
    assert summary["params"] == 260_032
    model = LlamaForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.tensor([[1]])
    threads = torch.get_num_threads()
    # A 260K-parameter model gains nothing from intra-op threads; on a busy 2-core box their
    # barriers made these 40 tiny forwards take seconds.
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for _ in range(40):  # plain argmax loop: no generation-config defaults involved
                ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    finally:
        torch.set_num_threads(threads)
    text = load_tokenizer(out).decode(ids[0].tolist())
    assert text.startswith(STORY_START), text


@pytest.mark.shared
def test_stories260k_tokenizer_round_trip(stories_dir):
    tokenizer = load_tokenizer(stories_dir[0])
    ids = tokenizer.encode(STORY_START, add_bos=True)
    assert ids[0] == 1 and len(ids) < len(STORY_START) / 2
    assert tokenizer.decode(ids) == STORY_START
    config = json.loads((stories_dir[0] / "config.json").read_text())
    assert (config["rope_theta"], config["rms_norm_eps"], config["tie_word_embeddings"]) == (10000.0, 1e-5, True)


def rope_interleaved(x: np.ndarray, position: int, theta: float = 10000.0) -> np.ndarray:
    """llama2.c's RoPE on one head: rotate pairs (2i, 2i+1)."""
    head_dim = x.shape[0]
    angle = position / theta ** (np.arange(0, head_dim, 2) / head_dim)
    even, odd = x[0::2], x[1::2]
    out = np.empty_like(x)
    out[0::2] = even * np.cos(angle) - odd * np.sin(angle)
    out[1::2] = even * np.sin(angle) + odd * np.cos(angle)
    return out


def rope_rotate_half(x: np.ndarray, position: int, theta: float = 10000.0) -> np.ndarray:
    """HF Llama's RoPE on one head: rotate pairs (i, i + head_dim/2)."""
    head_dim = x.shape[0]
    angle = np.tile(position / theta ** (np.arange(0, head_dim, 2) / head_dim), 2)
    rotated = np.concatenate([-x[head_dim // 2:], x[: head_dim // 2]])
    return x * np.cos(angle) + rotated * np.sin(angle)


def test_row_permutation_turns_interleaved_rope_into_rotate_half():
    """For q = W x: rotate_half(P W x) == P interleaved(W x) per head, so q·k is unchanged."""
    rng = np.random.default_rng(0)
    heads, head_dim, hidden = 3, 8, 12
    weight = rng.standard_normal((heads * head_dim, hidden))
    x = rng.standard_normal(hidden)
    permuted = interleaved_to_rotate_half(weight, heads)
    for position in (0, 1, 7, 300):
        for head in range(heads):
            rows = slice(head * head_dim, (head + 1) * head_dim)
            expected = interleaved_to_rotate_half(rope_interleaved(weight[rows] @ x, position)[:, None], 1)[:, 0]
            np.testing.assert_allclose(rope_rotate_half(permuted[rows] @ x, position), expected, atol=1e-12)


# ------------------------------------------------------------------------------------------
# Synthetic llama2.c files
# ------------------------------------------------------------------------------------------

DIM, HIDDEN_DIM, LAYERS, HEADS, KV_HEADS, VOCAB, SEQ = 16, 24, 2, 4, 2, 262, 8


def write_llama2c(path, shared=True, drop_bytes=0, extra_bytes=0, theta=10000.0, seed=0, vocab=VOCAB):
    rng = np.random.default_rng(seed)
    head_dim, kv_dim = DIM // HEADS, DIM // HEADS * KV_HEADS
    shapes = [(vocab, DIM), (LAYERS, DIM), (LAYERS, DIM, DIM), (LAYERS, kv_dim, DIM), (LAYERS, kv_dim, DIM),
              (LAYERS, DIM, DIM), (LAYERS, DIM), (LAYERS, HIDDEN_DIM, DIM), (LAYERS, DIM, HIDDEN_DIM),
              (LAYERS, HIDDEN_DIM, DIM), (DIM,)]
    angles = np.arange(SEQ)[:, None] / theta ** (np.arange(0, head_dim, 2) / head_dim)[None, :]
    tensors = [rng.standard_normal(shape) for shape in shapes] + [np.cos(angles), np.sin(angles)]
    if not shared:
        tensors.append(rng.standard_normal((vocab, DIM)))
    header = struct.pack("<7i", DIM, HIDDEN_DIM, LAYERS, HEADS, KV_HEADS, vocab if shared else -vocab, SEQ)
    body = b"".join(t.astype("<f4").tobytes() for t in tensors)
    body = body[: len(body) - drop_bytes] + bytes(extra_bytes)
    path.write_bytes(header + body)
    return path, tensors


def write_tok_bin(path, vocab_size=VOCAB):
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [f"<0x{b:02X}>".encode() for b in range(256)] + [b" ", b"a", b" a"]
    pieces = pieces[:vocab_size]
    body = b"".join(struct.pack("<fi", -float(i), len(p)) + p for i, p in enumerate(pieces))
    path.write_bytes(struct.pack("<i", 6) + body)
    return path


def test_synthetic_llama2c_import_maps_and_permutes(tmp_path):
    path, tensors = write_llama2c(tmp_path / "model.bin", shared=False)
    config, lazy = read_llama2c_checkpoint(path)
    assert config["tie_word_embeddings"] is False and config["head_dim"] == DIM // HEADS
    np.testing.assert_array_equal(lazy["lm_head.weight"], tensors[-1].astype(np.float32))
    np.testing.assert_array_equal(lazy["model.layers.1.mlp.gate_proj.weight"], tensors[7][1].astype(np.float32))  # w1
    np.testing.assert_array_equal(lazy["model.layers.1.mlp.down_proj.weight"], tensors[8][1].astype(np.float32))  # w2
    np.testing.assert_array_equal(
        lazy["model.layers.0.self_attn.k_proj.weight"], interleaved_to_rotate_half(tensors[3][0].astype(np.float32), KV_HEADS)
    )
    np.testing.assert_array_equal(
        lazy["model.layers.1.self_attn.q_proj.weight"], interleaved_to_rotate_half(tensors[2][1].astype(np.float32), HEADS)
    )


@pytest.mark.parametrize("drop_bytes, extra_bytes, words", [(4, 0, "truncated"), (0, 8, "longer than its header describes")])
def test_wrong_file_size_names_the_expected_size(tmp_path, drop_bytes, extra_bytes, words):
    path, _ = write_llama2c(tmp_path / "model.bin", drop_bytes=drop_bytes, extra_bytes=extra_bytes)
    expected = path.stat().st_size + drop_bytes - extra_bytes
    with pytest.raises(UserError, match=words) as info:
        import_llama2c(path, write_tok_bin(tmp_path / "tok.bin"), tmp_path / "out")
    assert str(path) in str(info.value) and f"implies {expected} bytes" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_bad_rope_table_and_header(tmp_path):
    path, _ = write_llama2c(tmp_path / "model.bin", theta=500000.0)
    with pytest.raises(UserError, match="RoPE table freq_cis_real differs from θ=10000"):
        read_llama2c_checkpoint(path)
    (tmp_path / "short.bin").write_bytes(b"\x01\x02")
    with pytest.raises(UserError, match="too short for a llama2.c header"):
        read_llama2c_checkpoint(tmp_path / "short.bin")
    (tmp_path / "v1.bin").write_bytes(struct.pack("<7i", 0x616B3432, 1, 0, 0, 0, 0, 0))
    with pytest.raises(UserError, match="versioned llama2.c export"):
        read_llama2c_checkpoint(tmp_path / "v1.bin")


def test_tokenizer_problems_name_the_file(tmp_path):
    model, _ = write_llama2c(tmp_path / "model.bin")
    missing = tmp_path / "tok_missing.bin"
    with pytest.raises(UserError, match="llama2.c tokenizer file not found") as info:
        import_llama2c(model, missing, tmp_path / "out")
    assert str(missing) in str(info.value)
    with pytest.raises(UserError, match="tokenizer has 261 tokens but the checkpoint's vocab_size is 262"):
        import_llama2c(model, write_tok_bin(tmp_path / "tok261.bin", vocab_size=261), tmp_path / "out")
    truncated = tmp_path / "tok_cut.bin"
    truncated.write_bytes(write_tok_bin(tmp_path / "tok.bin").read_bytes()[:-1])
    with pytest.raises(UserError, match="token 261 claims 2 bytes"):
        import_llama2c(model, truncated, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_out_refused_and_overwrite_replaces(tmp_path):
    model, _ = write_llama2c(tmp_path / "model.bin")
    tok = write_tok_bin(tmp_path / "tok.bin")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        import_llama2c(model, tok, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    import_llama2c(model, tok, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "special_tokens_map.json",
                                                     "tokenizer.json", "tokenizer_config.json", "tokenizer_llama2c.json"]
    assert load_tokenizer(out).encode("a a") == [261, 261]
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == SEQ


# ------------------------------------------------------------------------------------------
# CLI (a stand-in for the lead's top-level group: UserError -> "error: msg", exit 2)
# ------------------------------------------------------------------------------------------


class _TopLevel(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=_TopLevel)
def cli():
    pass


cli.add_command(import_cmd)
cli.add_command(fetch)


def run_cli(args):
    return CliRunner().invoke(cli, args)


def test_cli_import_json_and_errors(tmp_path):
    model, _ = write_llama2c(tmp_path / "model.bin")
    tok = write_tok_bin(tmp_path / "tok.bin")
    result = run_cli(["import", "--llama2c", str(model), "--tokenizer", str(tok), "--out", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["arch"], summary["layers"], summary["kv_heads"], summary["vocab"]) == ("llama", LAYERS, KV_HEADS, VOCAB)
    assert len(summary["source_sha256"]) == 64 and len(summary["tokenizer_sha256"]) == 64

    result = run_cli(["import", "--llama2c", str(model), "--tokenizer", str(tok), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "error: --out" in result.stderr and "already exists" in result.stderr

    result = run_cli(["import", "--llama2c", str(model), "--tokenizer", str(tok), "--out", str(tmp_path / "out"), "--overwrite"])
    assert result.exit_code == 0 and result.stdout.startswith("imported llama from llama2c: 2 layers")

    for args, words in [
        (["import", "--out", str(tmp_path / "x")], "pass exactly one of --gguf FILE or --llama2c"),
        (["import", "--llama2c", str(model), "--out", str(tmp_path / "x")], "--llama2c needs --tokenizer"),
        (["import", "--gguf", str(model), "--tokenizer", str(tok), "--out", str(tmp_path / "x")], "--tokenizer applies to --llama2c only"),
        (["fetch", "no-such-model", "--out", str(tmp_path / "x")], "unknown model 'no-such-model'; known models: smollm2-135m-instruct"),
    ]:
        result = run_cli(args)
        assert result.exit_code == 2 and words in result.stderr, result.stderr
    assert not (tmp_path / "x").exists()
