"""SafetensorsFile reads tensors on demand (no memmap) and validates every header entry; the writer."""
import json
import shutil
import struct

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from hf_fixtures import tiny_convertible, write_text
from mindyouzhi.cli import main
from mindyouzhi.convert_weights.safetensors_io import MAX_HEADER_BYTES, SafetensorsFile, ShardedWriter
from mindyouzhi.errors import UserError


def test_reads_fresh_writable_arrays_and_refuses_a_truncated_file(tmp_path):
    path = tmp_path / "m.safetensors"
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.arange(6, dtype=np.float16)
    save_file({"a": a, "b": b}, path)
    f = SafetensorsFile(path)
    got = f.get("a")
    np.testing.assert_array_equal(got, a)
    got[0, 0] = 7.0  # writable, and a copy: the next read is unaffected
    np.testing.assert_array_equal(f.get("a"), a)
    assert f.get("b").dtype == np.float32 and np.array_equal(f.get("b"), b.astype(np.float32))
    last = max(f.keys(), key=lambda n: f._entries[n]["data_offsets"][1])  # the tensor at the end of the file
    data = path.read_bytes()
    path.write_bytes(data[:-4])
    with pytest.raises(UserError, match="truncated"):
        SafetensorsFile(path).get(last)


# -- fuzzing: every corruption is one line naming the file (and the tensor), exit 2 through the CLI ----
def _file(header: dict, data: bytes = b"") -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


GOOD = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "BF16", "shape": [4], "data_offsets": [16, 24]}}


def _with(name, **changes):
    header = json.loads(json.dumps(GOOD))
    header[name].update(changes)
    return header


CORRUPTIONS = {
    "truncated data": (_file(GOOD, bytes(20)), "b", "truncated"),
    "truncated header": (_file(GOOD)[:30], None, "truncated"),
    "shorter than the length field": (b"\x01\x02", None, "8-byte header length"),
    "offsets past the end": (_file(_with("b", data_offsets=[16, 32], shape=[8]), bytes(24)), "b", "truncated"),
    "offsets not a pair": (_file(_with("a", data_offsets=[0]), bytes(24)), "a", "data_offsets"),
    "offsets reversed": (_file(_with("a", data_offsets=[16, 0]), bytes(24)), "a", "data_offsets"),
    "bad dtype": (_file(_with("a", dtype="F8_E9M9"), bytes(24)), "a", "unsupported dtype"),
    "shape not ints": (_file(_with("a", shape=[2, "2"]), bytes(24)), "a", "shape"),
    "shape x itemsize != range": (_file(_with("a", shape=[3, 2]), bytes(24)), "a", "needs 24"),
    "overlapping ranges": (_file(_with("b", data_offsets=[8, 16], shape=[4]), bytes(24)), "b", "overlaps tensor a"),
    "no data_offsets": (_file({"a": {"dtype": "F32", "shape": [1]}}, bytes(4)), "a", "no 'data_offsets'"),
    "entry not an object": (_file({"a": [1, 2]}, bytes(4)), "a", "expected an object"),
    "list header": (_file([1, 2], bytes(4)), None, "JSON list"),
    "not JSON": (struct.pack("<Q", 4) + b"\xff{[x" + bytes(8), None, "not valid JSON"),
    "huge header": (struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", None, "header length"),
    "zero header": (struct.pack("<Q", 0), None, "header length"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_files_are_one_line_errors(case, tmp_path):
    data, tensor, words = CORRUPTIONS[case]
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    with pytest.raises(UserError) as caught:
        SafetensorsFile(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and words in message, message
    if tensor:
        assert f"tensor {tensor}" in message, message


def test_the_good_fuzz_base_reads(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(_file(GOOD, np.arange(4, dtype=np.float32).tobytes() + np.array([0x3F80] * 4, np.uint16).tobytes()))
    f = SafetensorsFile(path)
    np.testing.assert_array_equal(f.get("a"), np.arange(4, dtype=np.float32).reshape(2, 2))
    np.testing.assert_array_equal(f.get("b"), np.ones(4, np.float32))  # bf16 0x3F80 == 1.0


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    return tiny_convertible(root, "llama"), write_text(root / "text.txt", 300, seed=2)


@pytest.mark.parametrize("case", ["truncated data", "overlapping ranges", "bad dtype", "huge header", "list header",
                                  "no data_offsets", "offsets past the end"])
def test_corrupt_checkpoint_through_the_cli(case, tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model[0], model)
    (model / "model.safetensors").write_bytes(CORRUPTIONS[case][0])
    result = CliRunner().invoke(main, ["eval", "ppl", "--model", str(model), "--data", str(tiny_model[1]),
                                       "--seq-len", "16"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.safetensors" in errors[0] and CORRUPTIONS[case][2] in errors[0], result.output


def test_writer_writes_the_header_first_and_each_tensor_once(tmp_path, monkeypatch):
    """No spill files: the bytes written equal the final file size (each tensor's bytes once)."""
    import builtins

    tensors = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "bf": np.ones(5, np.float16)}
    written = []
    real_open = builtins.open

    class Counting:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            written.append(memoryview(data).nbytes)
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

    def counting_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return Counting(handle) if "w" in mode else handle

    monkeypatch.setattr(builtins, "open", counting_open)
    writer = ShardedWriter(tmp_path, {n: t.shape for n, t in tensors.items()}, dtypes={"bf": np.float16})
    writer.add_all(tensors.items())
    (name,) = writer.close()
    monkeypatch.setattr(builtins, "open", real_open)
    assert sum(written) == (tmp_path / name).stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    f = SafetensorsFile(tmp_path / name)
    for key, value in tensors.items():
        np.testing.assert_array_equal(f.get(key, dtype=None), value)


def test_writer_refuses_undeclared_wrong_shape_and_missing_tensors(tmp_path):
    writer = ShardedWriter(tmp_path, {"x": (2,), "y": (3,)})
    with pytest.raises(ValueError, match="not declared"):
        writer.add("z", np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="shape"):
        writer.add("x", np.zeros(3, np.float32))
    writer.add("x", np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="y declared but never written"):
        writer.close()
    assert not list(tmp_path.iterdir())
