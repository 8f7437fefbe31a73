"""The AOT CPU paged-attention kernels against their plain-op references."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from mindyouzhi.ops import paged_attention, reference
from mindyouzhi.serve import attention as decode_attention

RNG = np.random.default_rng(2024)

# (batch, heads, rank, rope, blocks, block size, table width): widths below and above the kernel's
# 16-lane vectors, tails, and SmolLM2's own shape (9 heads, r 96, dr 32, blocks of 16).
MLA_SHAPES = [(3, 4, 24, 8, 30, 4, 7), (5, 16, 40, 6, 50, 3, 9), (2, 9, 96, 32, 40, 16, 12)]


def tensor(array, dtype=np.float32):
    return Tensor(np.ascontiguousarray(array, dtype=dtype))


def paged_inputs(batch, blocks, block_size, width):
    """Scattered block tables (distinct blocks, random order) and ragged lengths incl. 0 and full."""
    tables = RNG.permutation(blocks)[: batch * width].reshape(batch, width)
    lengths = RNG.integers(1, width * block_size, batch)
    lengths[0], lengths[-1] = 0, width * block_size  # a padding row and a sequence using its whole table
    return tensor(tables, np.int32), tensor(lengths, np.int32)


def mla_inputs(shape):
    """q_latent, q_pe, latent pool, k_pe pool, block tables, lengths for one MLA_SHAPES entry."""
    batch, heads, rank, rope, blocks, block_size, width = shape
    normal = lambda *dims: tensor(RNG.standard_normal(dims))  # noqa: E731
    return (normal(batch, heads, rank), normal(batch, heads, rope), normal(blocks, block_size, rank),
            normal(blocks, block_size, rope), *paged_inputs(batch, blocks, block_size, width))


@pytest.mark.parametrize("shape", MLA_SHAPES)
def test_mla_kernel_equals_reference(shape):
    q_latent, q_pe, latent, k_pe, tables, lengths = mla_inputs(shape)
    scale = 1.0 / np.sqrt(shape[2] + shape[3])
    got = paged_attention.paged_mla_decode(q_latent, q_pe, latent, k_pe, tables, lengths, scale).asnumpy()
    want = reference.paged_mla_decode_reference(q_latent, q_pe, latent, k_pe, tables, lengths, scale).asnumpy()
    assert np.abs(want).max() > 0.1 and not got[0].any()  # a real comparison; the padding row is zero
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kv_heads", [1, 3, 4])
def test_gqa_kernel_equals_reference(kv_heads):
    batch, heads, dim, blocks, block_size, width = 4, 3 * kv_heads, 16, 40, 4, 8
    q = tensor(RNG.standard_normal((batch, heads, dim)))
    keys, values = (tensor(RNG.standard_normal((blocks, block_size, kv_heads, dim))) for _ in range(2))
    tables, lengths = paged_inputs(batch, blocks, block_size, width)
    got = paged_attention.paged_gqa_decode(q, keys, values, tables, lengths, 0.25).asnumpy()
    want = reference.paged_gqa_decode_reference(q, keys, values, tables, lengths, 0.25).asnumpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_kernel_runs_inside_a_compiled_graph():
    q_latent, q_pe, latent, k_pe, tables, lengths = mla_inputs(MLA_SHAPES[0])
    mla = paged_attention.custom_ops().mla

    @ms.jit
    def doubled(q_latent, q_pe, latent, k_pe, tables, lengths, scale):
        return mla(q_latent * 2.0, q_pe, latent, k_pe, tables, lengths, scale)

    got = doubled(q_latent, q_pe, latent, k_pe, tables, lengths, paged_attention.scale_tensor(0.2)).asnumpy()
    want = reference.paged_mla_decode_reference(q_latent * 2.0, q_pe, latent, k_pe, tables, lengths, 0.2).asnumpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_out_of_range_block_is_an_error_not_a_crash():
    q = tensor(RNG.standard_normal((1, 2, 8)))
    pool = tensor(RNG.standard_normal((4, 2, 8)))
    with pytest.raises(RuntimeError, match="is 4"):
        paged_attention.paged_mla_decode(q, q[..., :2], pool, pool[..., :2], tensor([[9]], np.int32),
                                         tensor([2], np.int32), 1.0).asnumpy()


def test_missing_compiler_is_a_clear_error_and_auto_falls_back_loudly(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    monkeypatch.setenv("MINDYOUZHI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(decode_attention, "_KERNEL", [])
    monkeypatch.setattr(paged_attention, "custom_ops", paged_attention.custom_ops.__wrapped__)  # no cached ops
    paged_attention.kernel_library.cache_clear()
    try:
        with pytest.raises(paged_attention.KernelBuildError, match="g\\+\\+ not found"):
            paged_attention.kernel_library()
        with pytest.raises(paged_attention.KernelBuildError):
            decode_attention.select_attention("custom")
        assert decode_attention.select_attention("auto") is decode_attention.GATHER
        assert "plain-op paged attention" in capsys.readouterr().err
    finally:
        paged_attention.kernel_library.cache_clear()


def test_kernel_library_is_cached_by_source_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("MINDYOUZHI_CACHE_DIR", str(tmp_path))
    paged_attention.kernel_library.cache_clear()
    try:
        built = paged_attention.kernel_library()
        assert built.parent == tmp_path / "ops" and built.name.startswith("paged_attention-")
        stamp = built.stat().st_mtime_ns
        paged_attention.kernel_library.cache_clear()
        assert paged_attention.kernel_library() == built and built.stat().st_mtime_ns == stamp  # not rebuilt
    finally:
        paged_attention.kernel_library.cache_clear()
