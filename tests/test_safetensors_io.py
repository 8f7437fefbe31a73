"""SafetensorsFile reads tensors on demand (no memmap): values, dtypes, and a truncated file."""
import numpy as np
import pytest
from safetensors.numpy import save_file

from mindyouzhi.convert_weights.safetensors_io import SafetensorsFile
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
