"""Corpus readers (.txt / .jsonl / .parquet, --text-field) and data-free generated text (generate:N)."""
import hashlib
import json

import numpy as np
import pytest
from click.testing import CliRunner

from hf_fixtures import tiny_convertible, write_text
from mindyouzhi import generated_text
from mindyouzhi.cli import main
from mindyouzhi.errors import UserError
from mindyouzhi.textdata import join_records, read_text

WIKI_LIKE = " \n = Title = \n \n First paragraph , with @-@ tokens . \n \n = = Section = = \n \n Second one . \n \n"


def hf_line_rows(text: str) -> list[str]:
    """Rows as Hugging Face's line-based builders (WikiText) store a file: each line with its newline, blanks empty."""
    return [line if line.strip() else "" for line in text.splitlines(keepends=True)]


def write_parquet(path, columns: dict):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def test_line_rows_rejoin_into_the_original_file():
    assert join_records(hf_line_rows(WIKI_LIKE)) == WIKI_LIKE
    plain = "first line\n\nsecond line\n"
    assert join_records(hf_line_rows(plain)) == plain


def test_document_rows_are_separated_by_a_blank_line():
    assert join_records(["doc one", None, "", "doc two"]) == "doc one\n\ndoc two"


def test_jsonl_text_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"body": "alpha", "id": 1}, {"body": "beta", "id": 2}]) + "\n\n")
    assert read_text(path, "--calib", "body") == "alpha\n\nbeta"
    with pytest.raises(UserError, match=r"--calib .*c.jsonl: line 1: .*string field 'text'.*--text-field"):
        read_text(path, "--calib")
    path.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(UserError, match="line 2: invalid JSON"):
        read_text(path, "--calib")


def test_parquet_wikitext_layout_reproduces_the_raw_file(tmp_path):
    path = write_parquet(tmp_path / "test-00000-of-00001.parquet", {"text": hf_line_rows(WIKI_LIKE)})
    assert read_text(path) == WIKI_LIKE
    with pytest.raises(UserError, match=r"no column 'body' \(columns: text\)"):
        read_text(path, "--data", "body")
    numbers = write_parquet(tmp_path / "n.parquet", {"text": [1, 2]})
    with pytest.raises(UserError, match="column 'text' holds int64, expected strings"):
        read_text(numbers)


def test_parquet_without_pyarrow_is_a_user_error(tmp_path, monkeypatch):
    path = tmp_path / "x.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)
    with pytest.raises(UserError, match=r"--eval-data .*x.parquet: reading .parquet needs pyarrow: pip install 'mindyouzhi\[parquet\]'"):
        read_text(path, "--eval-data")


@pytest.mark.shared
def test_hf_wikitext_parquet_equals_wiki_test_raw(shared_dir, tmp_path):
    raw = (shared_dir / "data/wikitext-2/wiki.test.raw").read_text(encoding="utf-8")
    path = write_parquet(tmp_path / "test.parquet", {"text": hf_line_rows(raw)})
    text = read_text(path)
    assert hashlib.sha256(text.encode()).hexdigest() == "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"


# -- through the CLI, on a tiny model --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("textdata")
    return dict(root=root, model=tiny_convertible(root, "llama"), text=write_text(root / "corpus.txt", 1200, seed=3))


def cli(*args):
    """Exit code and the terminal's view (stdout + stderr); ``--json`` output is parsed from ``cli_json``."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def cli_json(*args):
    result = CliRunner().invoke(main, [str(a) for a in args] + ["--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), result.output


def test_eval_ppl_reads_every_format_alike(tiny, tmp_path):
    words = tiny["text"].read_text().split()
    lines = [" ".join(words[i:i + 40]) + "\n" for i in range(0, len(words), 40)]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"content": line}) + "\n" for line in lines))
    parquet = write_parquet(tmp_path / "c.parquet", {"content": lines})
    results = [cli_json("eval", "ppl", "--model", tiny["model"], "--data", data, "--text-field", "content",
                        "--seq-len", 64)[0] for data in (tiny["text"], jsonl, parquet)]
    assert results[0]["windows"] == 18
    for other in results[1:]:
        assert other["windows"] == results[0]["windows"]
        assert other["ppl"] == pytest.approx(results[0]["ppl"], rel=1e-6)
    code, output = cli("eval", "ppl", "--model", tiny["model"], "--data", jsonl, "--seq-len", 64)
    assert code == 2 and output.count("error:") == 1 and "string field 'text'" in output, output


def test_generate_spec_parsing():
    assert generated_text.parse_spec("generate:8192", "--calib") == generated_text.GenerateSpec(8192, None)
    assert generated_text.parse_spec("generate:10:7", "--calib") == generated_text.GenerateSpec(10, 7)
    assert generated_text.parse_spec("data/generate.txt", "--calib") is None
    for bad in ("generate:", "generate:0", "generate:1k", "generate:5:-1"):
        with pytest.raises(UserError, match=f"--calib {bad}: expected generate:N"):
            generated_text.parse_spec(bad, "--calib")
    with pytest.raises(UserError, match="same seed 5: held-out text must use another seed"):
        generated_text.role_specs({"--calib": "generate:100:5", "--eval-data": "generate:50:5"}, seed=42)
    specs = generated_text.role_specs({"--calib": "generate:100", "--search-data": None, "--eval-data": "generate:50"}, 42)
    assert specs == {"--calib": generated_text.GenerateSpec(100, 42), "--eval-data": generated_text.GenerateSpec(50, 1042)}


def test_rows_are_samples_of_the_transformers_distribution(tiny):
    """Each sampled token is what the row's own generator draws from transformers' next-token logits
    for the row so far (one torch forward per row is the reference for every step)."""
    from hf_fixtures import hf_logits
    from mindyouzhi.models.generation import sample_token
    from mindyouzhi.models.runner import ModelRunner

    runner = ModelRunner.from_dir(tiny["model"])
    prompts = [[5], [7, 8, 9], [1, 30]]
    seeds = [(3, 0), (3, 1), (3, 2)]
    rows = generated_text.sample_rows(runner, prompts, 24, seeds)
    for prompt, seed, row in zip(prompts, seeds, rows):
        assert len(row) == 24 and row[:len(prompt)] == prompt
        logits = hf_logits(tiny["model"], np.asarray([row]))[0]
        rng = np.random.default_rng(list(seed))
        expected = [sample_token(logits[t], generated_text.TEMPERATURE, 1.0, rng) for t in range(len(prompt) - 1, 23)]
        assert row[len(prompt):] == expected
    assert len({tuple(row[3:]) for row in rows}) == 3  # the seeds give different text
    assert generated_text.sample_rows(runner, prompts[1:2], 24, seeds[1:2])[0] == rows[1]  # batching changes nothing


def test_bf16_rows_go_through_the_engines_attention_and_do_not_depend_on_batching(tiny, monkeypatch):
    """Data-free sampling decodes with the serving engine's attention (the paged-attention kernel where
    it builds: one compiled graph for every length; the plain ops compiled a bf16 graph per table width,
    each with its own buffers — 3.5 GB on SmolLM2 at 85 rows), and a row is the same alone or in a batch."""
    from mindyouzhi.models.runner import ModelRunner
    from mindyouzhi.ops import bf16
    from mindyouzhi.serve import paged_model
    from mindyouzhi.serve.attention import GATHER_STATIC, select_attention

    if bf16.unavailable():
        pytest.skip(f"bf16 kernels unavailable: {bf16.unavailable()}")
    seen = []

    class Spy(paged_model.PagedModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self.decode_attention)

    monkeypatch.setattr(paged_model, "PagedModel", Spy)
    runner = ModelRunner.from_dir(tiny["model"], precision="bf16")
    prompts, seeds = [[5], [7, 8, 9], [1, 30]], [(3, 0), (3, 1), (3, 2)]
    rows = generated_text.sample_rows(runner, prompts, 40, seeds)
    assert generated_text.sample_rows(runner, prompts[1:2], 40, seeds[1:2])[0] == rows[1]
    engine = select_attention()  # the kernel, or (where it cannot be built) the plain ops, static in bf16
    expected = GATHER_STATIC if engine.dynamic_shapes else engine
    assert seen and all(attention is expected for attention in seen)


def test_convert_calibrates_on_generated_text_and_caches_it(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(generated_text, "ROW_TOKENS", 64)
    out = tmp_path / "mla"
    args = ["convert", "--model", tiny["model"], "--out", out, "--calib", "generate:700", "--calib-tokens", 512,
            "--calib-seq-len", 64, "--rope-dim", 8, "--freqfold", 2, "--eval-data", "generate:300",
            "--eval-seq-len", 64]
    report, output = cli_json(*args)
    assert "generating" in output
    cache = tmp_path / "home/.cache/mindyouzhi/generated"
    files = sorted(cache.glob("*.txt"))
    assert len(files) == 2
    assert report["data"]["calib"]["source"] == "700 tokens generated by the original model (seed 42)"
    assert report["data"]["eval"]["source"] == "300 tokens generated by the original model (seed 1042)"
    assert report["data"]["search"]["path"] == report["data"]["calib"]["path"]
    assert {report["data"]["calib"]["path"], report["data"]["eval"]["path"]} == {str(f) for f in files}
    from mindyouzhi.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny["model"])
    for role, wanted in (("calib", 700), ("eval", 300)):
        assert len(tokenizer.encode(read_text(report["data"][role]["path"]))) >= wanted
    assert read_text(report["data"]["calib"]["path"]) != read_text(report["data"]["eval"]["path"])
    assert np.isfinite(report["ppl"]["final"])
    stamps = [f.stat().st_mtime_ns for f in files]
    code, output = cli(*args, "--overwrite")
    assert code == 0, output
    assert "using cached generated text" in output and "generating" not in output
    assert "data: calibration 700 tokens generated by the original model (seed 42)" in output
    assert [f.stat().st_mtime_ns for f in files] == stamps
    result, output = cli_json("eval", "kl", "--teacher", tiny["model"], "--student", out, "--data", "generate:300",
                              "--seq-len", 64)
    assert result["data"] == report["data"]["eval"]["path"] and "using cached generated text" in output


def test_generated_text_too_short_is_refused_before_any_sampling(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(generated_text, "generated_texts", lambda *a, **k: pytest.fail("must not sample"))
    out = tmp_path / "o"
    code, output = cli("convert", "--model", tiny["model"], "--out", out, "--calib", "generate:300", "--calib-tokens", 512,
                       "--calib-seq-len", 64, "--rope-dim", 8, "--freqfold", 2)
    assert code == 2 and output.count("error:") == 1 and "--calib generate:300: fewer tokens than --calib-tokens 512" in output
    code, output = cli("convert", "--model", tiny["model"], "--out", out, "--calib", "generate:600", "--calib-tokens", 512,
                       "--calib-seq-len", 64, "--rope-dim", 8, "--search-tokens", 1024)
    assert code == 2 and "--calib generate:600: fewer tokens than --search-tokens 1024" in output
    code, output = cli("convert", "--model", tiny["model"], "--out", out, "--calib", "generate:1000", "--calib-tokens", 512,
                       "--calib-seq-len", 64, "--rope-dim", 8, "--freqfold", 2, "--eval-data", "generate:10:42")
    assert code == 2 and "same seed 42" in output and not out.exists()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_generated_text_is_sampled_in_the_machine_precision_and_recorded(tiny, tmp_path, monkeypatch, precision):
    """Every command samples in ``generation_precision()`` (bf16 where auto picks it): the runner gets
    that precision, the file name and record carry it, and an fp32 text keeps its old name and record."""
    from mindyouzhi.models.runner import ModelRunner

    if precision == "bf16":
        from mindyouzhi.ops import bf16

        if bf16.unavailable():
            pytest.skip(f"bf16 kernels unavailable: {bf16.unavailable()}")
    monkeypatch.setattr(generated_text, "ROW_TOKENS", 32)
    monkeypatch.setattr(generated_text, "generation_precision", lambda: precision)
    used = []
    original = ModelRunner.from_dir.__func__

    def spy(cls, model_dir, *args, **kwargs):
        used.append(kwargs.get("precision", "fp32"))
        return original(cls, model_dir, *args, **kwargs)

    monkeypatch.setattr(ModelRunner, "from_dir", classmethod(spy))
    spec = generated_text.GenerateSpec(40, 3)
    [path] = generated_text.generated_texts(tiny["model"], [spec], tmp_path, say=lambda message: None)
    record = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    assert used == [precision]
    assert path.name.endswith("-s3.txt" if precision == "fp32" else "-s3-bf16.txt")
    assert ("forward_precision" in record) == (precision != "fp32") and record.get("forward_precision", "fp32") == precision
    assert generated_text.generated_texts(tiny["model"], [spec], tmp_path, say=lambda message: None) == [path]
    assert used == [precision]  # the second call reads the cache
