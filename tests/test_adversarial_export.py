"""`mindyouzhi export` (and `import`) as an adversarial user tries it (issue 24): --out never replaces or
enters the source model, unwritable or dangling --out is refused before any work, and damaged
converted models (NaN weights, a malformed 'mla' section, zero KV heads, a corrupt tokenizer) are
exit 2 with one line — nothing written, every input byte-identical."""
import pytest

from adversarial_support import assert_refused, damaged_copy, leftovers, run, snapshot, unwritable_outs
from hf_fixtures import tiny_convertible, write_text

FAST = ["--rope-dim", "8", "--kv-lora-rank", "24", "--freqfold", "2", "--calib-tokens", "512",
        "--calib-seq-len", "64", "--no-progress"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("adv-export")
    source = tiny_convertible(root, "llama")
    calib = write_text(root / "calib.txt", 2000, seed=0)
    code, output = run("convert", "--model", source, "--out", root / "parent" / "mla", "--calib", calib, *FAST)
    assert code == 0, output
    return root / "parent" / "mla"


def export(model, out, *args):
    return run("export", "--model", model, "--out", out, *args)


@pytest.mark.parametrize("relation", ["same", "parent", "inside", "link"])
def test_out_overlapping_the_model_is_refused_even_with_overwrite(converted, tmp_path, relation):
    before = snapshot(converted)
    out = {"same": converted, "parent": converted.parent, "inside": converted / "exported"}.get(relation)
    if out is None:
        out = tmp_path / "link"
        out.symlink_to(converted.parent)
    assert_refused(*export(converted, out, "--overwrite"), "--out", "--model")
    assert snapshot(converted) == before and not (converted / "exported").exists()
    assert leftovers(converted.parent, "mla") == ["mla"]


def test_unwritable_and_dangling_out_are_refused(converted, tmp_path):
    for out, words in unwritable_outs(tmp_path):
        assert_refused(*export(converted, out), "--out", words)
    dangling = tmp_path / "o"
    dangling.symlink_to(tmp_path / "missing")
    assert_refused(*export(converted, dangling), "--out", "does not exist")
    assert leftovers(tmp_path, "o") == ["o"]


@pytest.mark.parametrize("damage, words", [
    (dict(tensor="model.layers.0.self_attn.kv_a_proj_with_mqa.weight"), ["kv_a_proj_with_mqa.weight", "non-finite"]),
    (dict(config={"mla": "yes"}), ["config.json", "'mla' must be a JSON object"]),
    (dict(config={"num_key_value_heads": 0}), ["config.json", "num_key_value_heads", "positive"]),
    (dict(files={"tokenizer.json": "{corrupt"}), ["tokenizer.json", "invalid"]),
    (dict(files={"generation_config.json": b"\xff\xfe"}), ["generation_config.json", "invalid JSON"]),
])
def test_damaged_converted_model_is_refused_and_nothing_written(converted, tmp_path, damage, words):
    model = damaged_copy(converted, tmp_path / "damaged", **damage)
    before = snapshot(model)
    out = tmp_path / "o"
    assert_refused(*export(model, out), *words)
    assert snapshot(model) == before and leftovers(tmp_path, "o") == []


def test_missing_recipe_names_the_recipe_flag(converted, tmp_path):
    line = assert_refused(*export(converted, tmp_path / "o", "--format", "mindformers", "--recipe",
                                  tmp_path / "missing.yaml"), "--recipe", "not found")
    assert "--config" not in line and leftovers(tmp_path, "o") == []


def test_import_out_holding_the_checkpoint_is_refused(tmp_path):
    checkpoint = tmp_path / "m" / "model.bin"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"\0" * 64)
    tokenizer = tmp_path / "m" / "tok.bin"
    tokenizer.write_bytes(b"\0" * 8)
    before = snapshot(checkpoint.parent)
    assert_refused(*run("import", "--llama2c", checkpoint, "--tokenizer", tokenizer, "--out", checkpoint.parent,
                        "--overwrite"), "--out", "--llama2c")
    assert_refused(*run("import", "--llama2c", checkpoint, "--tokenizer", tokenizer, "--out", tmp_path), "--out")
    assert snapshot(checkpoint.parent) == before
