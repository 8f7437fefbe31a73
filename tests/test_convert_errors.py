"""Bad input to `mindyouzhi convert` / `eval ppl`: one line, exit code 2, nothing written."""
import pytest
from click.testing import CliRunner

from hf_fixtures import build_hf_model, tiny_convertible, write_text
from mindyouzhi.cli import main


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    return dict(root=root, model=tiny_convertible(root, "llama"), calib=write_text(root / "calib.txt", 2000, seed=0))


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def convert(env, out, *args):
    return run("convert", "--model", env["model"], "--out", out, "--calib", env["calib"], "--calib-tokens", 512,
               "--calib-seq-len", 64, *args)


def assert_refused(code, output, *words, out=None):
    assert code == 2, output
    lines = [line for line in output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in output, output
    for word in words:
        assert word in lines[0], lines[0]
    if out is not None:
        assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_illegal_fold_lists_legal_values(env, tmp_path):
    out = tmp_path / "o"
    assert_refused(*convert(env, out, "--rope-dim", 8, "--freqfold", 3), "--freqfold 3", "legal values: 1, 2, 4, 8", out=out)


@pytest.mark.parametrize("args, words", [
    (["--key-weight", 0], ["--key-weight 0", "positive"]),
    (["--shortlist", 0], ["--shortlist 0", "at least 1"]),
    (["--freqfold", "2,x"], ["--freqfold 2,x", "one fold per layer"]),
    (["--freqfold", "2,4", "--layers", "1"], ["--layers", "per-layer fold plan"]),
])
def test_bad_conversion_options_are_named(env, tmp_path, args, words):
    out = tmp_path / "o"
    assert_refused(*convert(env, out, "--rope-dim", 8, *args), *words, out=out)


def test_rank_above_maximum_gives_the_maximum(env, tmp_path):
    out = tmp_path / "o"
    # 2 KV heads × head_dim 16: latent 2·32 − rope 8 = 56
    assert_refused(*convert(env, out, "--rope-dim", 8, "--freqfold", 2, "--kv-lora-rank", 57), "maximum", "56", out=out)


def test_rope_dim_must_divide_head_dim(env, tmp_path):
    out = tmp_path / "o"
    assert_refused(*convert(env, out, "--rope-dim", 6, "--freqfold", 2), "--rope-dim 6", "head_dim 16", out=out)


def test_calibration_text_shorter_than_requested(env, tmp_path):
    out = tmp_path / "o"
    code, output = run("convert", "--model", env["model"], "--out", out, "--calib", env["calib"], "--calib-tokens",
                       100000, "--rope-dim", 8, "--freqfold", 2)
    assert_refused(code, output, "--calib", "shorter than the requested", out=out)


def test_qk_norm_model_is_refused(env, tmp_path):
    model = build_hf_model("qwen3", tmp_path / "qwen3")
    out = tmp_path / "o"
    code, output = run("convert", "--model", model, "--out", out, "--calib", env["calib"], "--freqfold", 2)
    assert_refused(code, output, "qwen3", "QK RMSNorm", "not exact", out=out)


def test_existing_output_needs_overwrite(env, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert_refused(*convert(env, out, "--rope-dim", 8, "--freqfold", 2), "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "precious"


def test_concurrent_run_on_the_same_out_is_refused(env, tmp_path):
    """A second convert to the same --out would share (and delete) the first one's resumable state."""
    from mindyouzhi.io_utils import locked_work_dir

    out = tmp_path / "o"
    with locked_work_dir(tmp_path / ".o.work", out):  # a run in progress
        assert_refused(*convert(env, out, "--rope-dim", 8, "--freqfold", 2), "another run", "locked", out=out)
    code, output = convert(env, out, "--rope-dim", 8, "--freqfold", 2)  # free again: runs, cleans up
    assert code == 0, output
    assert not (tmp_path / ".o.work").exists()


def test_missing_calibration_file(env, tmp_path):
    out = tmp_path / "o"
    code, output = run("convert", "--model", env["model"], "--out", out, "--calib", tmp_path / "nope.txt")
    assert_refused(code, output, "--calib", "not found", out=out)


@pytest.mark.parametrize("content, words", [
    (None, ["config.json not found"]),
    ("{not json", ["invalid JSON"]),
    ('{"model_type": "gpt2", "hidden_size": 8}', ["unsupported model_type 'gpt2'", "llama", "qwen2"]),
    ('{"model_type": "llama", "vocab_size": 8}', ["missing required field"]),
])
def test_bad_config_json(tmp_path, content, words, env):
    model = tmp_path / "m"
    model.mkdir()
    if content is not None:
        (model / "config.json").write_text(content)
    assert_refused(*run("eval", "ppl", "--model", model, "--data", env["calib"]), *words)


def test_missing_and_misshapen_tensors_are_named(tmp_path, env):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    for mode in ("missing", "shape"):
        model = tiny_convertible(tmp_path / mode, "llama")
        tensors = load_file(model / "model.safetensors")
        name = "model.layers.1.self_attn.k_proj.weight"
        if mode == "missing":
            del tensors[name]
        else:
            tensors[name] = np.zeros((3, 3), np.float32)
        save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
        words = [name, "missing"] if mode == "missing" else [name, "[3, 3]", "expected [32, 64]"]
        assert_refused(*run("eval", "ppl", "--model", model, "--data", env["calib"]), *words)


def test_truncated_safetensors(tmp_path, env):
    model = tiny_convertible(tmp_path, "llama")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert_refused(*run("eval", "ppl", "--model", model, "--data", env["calib"]), "truncated", "model.safetensors")


def test_data_shorter_than_one_window(tmp_path, env):
    short = write_text(tmp_path / "short.txt", 50, seed=3)
    assert_refused(*run("eval", "ppl", "--model", env["model"], "--data", short, "--seq-len", 64),
                   "shorter than one window", "--seq-len 64")


def test_streaming_writer_roundtrip_shards_and_readers(tmp_path):
    """Our streaming writer's files read back exactly, through our reader and the safetensors package."""
    import numpy as np
    from safetensors.numpy import load_file

    from mindyouzhi.convert_weights.safetensors_io import SafetensorsStore, ShardedWriter

    rng = np.random.default_rng(0)
    tensors = {f"t{i}": rng.normal(size=(7, 5 + i)).astype(np.float32) for i in range(6)}
    tensors["ids"] = np.arange(5, dtype=np.int32)
    writer = ShardedWriter(tmp_path, {name: value.shape for name, value in tensors.items()}, max_shard_bytes=300,
                           dtypes={"ids": np.int32})
    writer.add_all(reversed(tensors.items()))  # any order: every offset is fixed up front
    names = writer.close()
    assert len(names) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names + ["model.safetensors.index.json"])
    store = SafetensorsStore(tmp_path)
    loaded = {}
    for name in names:
        loaded.update(load_file(tmp_path / name))
    for name, value in tensors.items():
        np.testing.assert_array_equal(store.get(name, dtype=None), value)
        np.testing.assert_array_equal(loaded[name], value)
