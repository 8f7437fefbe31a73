"""`mindyouzhi eval …` as an adversarial user tries it (issue 24): non-finite weights, windows longer
than the model's context and bad batch sizes are exit 2 with one line (never ``ppl nan`` or a silent
extrapolation); a --report never replaces an input or an existing file without --overwrite."""
import pytest

from adversarial_support import assert_refused, damaged_copy, run, snapshot
from hf_fixtures import tiny_convertible, write_text


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("adv-eval")
    return dict(model=tiny_convertible(root, "llama"),  # max_position_embeddings 256
                data=write_text(root / "data.txt", 1200, seed=1))


def ppl(model, data, *args):
    return run("eval", "ppl", "--model", model, "--data", data, "--no-progress", *args)


def test_non_finite_weights_are_named(env, tmp_path):
    name = "model.layers.0.mlp.down_proj.weight"
    model = damaged_copy(env["model"], tmp_path / "nan", tensor=name)
    before = snapshot(model, env["data"])
    line = assert_refused(*ppl(model, env["data"], "--seq-len", "64"), name, "non-finite")
    assert "nan" not in line.split("non-finite")[0].split(name)[-1]
    assert snapshot(model, env["data"]) == before


@pytest.mark.parametrize("args, words", [
    (["--seq-len", "1024"], ["--seq-len 1024", "max_position_embeddings 256"]),
    (["--seq-len", "0"], ["--seq-len 0", "at least 2"]),
    (["--batch-size", "0"], ["--batch-size 0", "at least 1"]),
    (["--max-windows", "0"], ["--max-windows 0"]),
])
def test_bad_windows_are_named(env, args, words):
    assert_refused(*ppl(env["model"], env["data"], *args), *words)


def test_default_window_longer_than_the_context_is_clamped_with_a_notice(env):
    code, output = ppl(env["model"], env["data"], "--json")
    assert code == 0, output
    assert "--seq-len defaults to 2048" in output and "using 256" in output
    assert '"seq_len": 256' in output


def test_kl_window_longer_than_the_context_and_report_on_the_data_are_refused(env, tmp_path):
    before = snapshot(env["data"])
    kl = ["eval", "kl", "--teacher", env["model"], "--student", env["model"], "--data", env["data"], "--no-progress"]
    assert_refused(*run(*kl, "--seq-len", "512"), "--seq-len 512", "context")
    assert_refused(*run(*kl, "--seq-len", "64", "--report", env["data"], "--overwrite"), "--report", "--data")
    report = tmp_path / "r.json"
    report.write_text("precious")
    assert_refused(*run(*kl, "--seq-len", "64", "--report", report), "--report", "already exists")
    assert report.read_text() == "precious" and snapshot(env["data"]) == before


def test_generate_refuses_non_finite_weights(env, tmp_path):
    name = "model.embed_tokens.weight"
    model = damaged_copy(env["model"], tmp_path / "nan", tensor=name)
    before = snapshot(model)
    assert_refused(*run("generate", "--model", model, "--prompt", "w1 w2", "--max-new-tokens", "2"), name, "non-finite")
    assert snapshot(model) == before
