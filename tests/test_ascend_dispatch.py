"""The device dispatch picks the plain-op twins here and, with the device target forced to Ascend,
the fused operators (selected by name, never run: there is no NPU)."""
import numpy as np
import pytest

from mindyouzhi.models import functional as F
from mindyouzhi.models.layers import RMSNorm
from mindyouzhi.ops import ascend, dispatch, reference
from mindyouzhi.serve import attention, paged_model


@pytest.fixture
def on_ascend(monkeypatch):
    monkeypatch.setattr(dispatch, "device_target", lambda: "Ascend")
    paged_model.compiled_layer_step.cache_clear()  # steps capture their norm when first built
    yield
    paged_model.compiled_layer_step.cache_clear()


def test_cpu_picks_the_plain_op_twins():
    kernels = dispatch.kernels()
    assert dispatch.device_target() == "CPU"
    assert kernels.fused == {}
    assert kernels.rms_norm is F.rms_norm
    assert RMSNorm(np.ones(4, np.float32), 1e-6).norm is F.rms_norm
    assert attention.select_attention("gather").mla is kernels.decode_mla
    assert attention.select_attention("auto").name in ("custom", "gather")  # never the fused path on CPU


def test_plain_decode_twin_is_the_reference_math():
    from mindspore import Tensor

    rng = np.random.default_rng(0)
    q_latent, q_pe = (Tensor(rng.normal(size=(1, 2, 1, n)).astype(np.float32)) for n in (4, 2))
    pools = [Tensor(rng.normal(size=(3, 2, n)).astype(np.float32)) for n in (4, 2)]
    tables, positions, lens = Tensor(np.array([[1, 2]], np.int32)), Tensor(np.array([[2]], np.int32)), None
    got = dispatch.kernels().decode_mla(q_latent, q_pe, *pools, tables, positions, lens, 0.5).asnumpy()
    want = reference.paged_mla_attend(q_latent, q_pe, *pools, tables, positions, 0.5).asnumpy()
    np.testing.assert_array_equal(got, want)


def test_forced_ascend_selects_the_fused_operators_by_name(on_ascend):
    kernels = dispatch.kernels()
    assert kernels.device == "Ascend"
    assert kernels.fused == {"rms_norm": "ops.rms_norm", "decode_mla": "ops.auto_generate.Mla",
                             "decode_gqa": "ops.auto_generate.PagedAttention"}
    assert kernels.rms_norm is ascend.rms_norm
    assert (kernels.decode_mla, kernels.decode_gqa) == (ascend.decode_mla, ascend.decode_gqa)
    # the cells and the serving path take them from the dispatch
    assert RMSNorm(np.ones(4, np.float32), 1e-6).norm is ascend.rms_norm
    for choice in ("auto", "custom"):
        chosen = attention.select_attention(choice)
        assert (chosen.name, chosen.mla, chosen.gqa) == ("ascend", ascend.decode_mla, ascend.decode_gqa)
        assert not chosen.dynamic_shapes
    step = paged_model.compiled_layer_step("mla", attention.select_attention("auto"))
    assert ascend.rms_norm in _closure_values(step)


def _closure_values(jitted):
    """Free variables of the function ms.jit wrapped (which norm the compiled step will call)."""
    function = getattr(jitted, "__wrapped__", jitted)
    return [cell.cell_contents for cell in function.__closure__ or ()]
