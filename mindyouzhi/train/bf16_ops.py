"""bf16 projections for the CPU train step: bf16 operands, float32 accumulation, forward and backward.

A projection ``y = x Wᵀ`` (x [tokens, in], W [out, in]) and its two gradients

    dx = dy W          (dy [tokens, out])
    dW = dyᵀ x         (summed over the tokens)

are the three products of every training matmul.  ``bf16_matmul()`` computes each of them with the
bf16 dense kernel of ``mindyouzhi.ops.bf16`` (operands rounded to bfloat16, oneDNN's
``gemm_bf16bf16f32`` accumulating in float32) — the arithmetic of a bf16 matmul on an accelerator.
The kernel multiplies ``a · bᵀ`` with the contraction over the last axis of both operands, so the
backward hands it ``(dy, Wᵀ)`` and ``(dyᵀ, xᵀ)`` (float32 transposes; the kernel rounds them).

Everything else of the step stays float32: the master weights and AdamW moments, RMSNorm, RoPE,
the attention core (scores, softmax, value product), the (log-)softmax of the head and the losses,
the gradient sums over micro-batches, clipping.

Which precision a run uses (``context.cpu_precision`` of the recipe, see ``resolve``): ``fp32``
(MindSpore's own MatMul), ``bf16``, or ``auto`` = bf16 where the CPU executes bf16 dot products
natively and the kernel builds (the rule of ``--forward-precision auto`` in the conversion).  This
is a CPU path only: on Ascend the parallel step keeps MindSpore's MatMul primitives and amp
(``model.compute_dtype``), and ``cpu_precision: bf16`` is refused there.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

from mindyouzhi.errors import UserError

CPU_PRECISIONS = ("auto", "bf16", "fp32")
DEFAULT_CPU_PRECISION = "fp32"
RECIPE_KEY = "context.cpu_precision"


def resolve(choice: str, where: str) -> tuple[str, Optional[str]]:
    """(the precision the train step uses, why ``auto`` fell back to fp32 — or None); ``bf16``
    where the kernel cannot run is refused naming the recipe key."""
    from mindyouzhi.transition.calibration import resolve_forward_precision

    try:
        return resolve_forward_precision(choice)
    except UserError as exc:  # "--forward-precision bf16: <reason>": the same reason, under the recipe's key
        reason = str(exc).split(": ", 1)[-1]
        raise UserError(f"{where}: {RECIPE_KEY} bf16: {reason}") from None


@functools.lru_cache(maxsize=None)
def bf16_matmul(gradients: str = "bf16"):
    """``matmul(x [M, K], w [N, K])`` → x · wᵀ [M, N] in bf16 with float32 accumulation: a drop-in for
    ``ops.MatMul(transpose_b=True)`` whose bprop computes dx = dy W and dW = dyᵀ x with the same
    kernel (``gradients="bf16"``) or with MindSpore's float32 MatMul and its transpose flags
    (``"fp32"``: for the LM head, where transposing the [tokens, vocabulary] gradient for the kernel
    costs MindSpore's CPU Transpose as long as the product itself)."""
    from mindspore import ops

    from mindyouzhi.ops.bf16 import kernel_library, primitive

    if gradients not in ("bf16", "fp32"):
        raise ValueError(f"gradients {gradients!r}: expected 'bf16' or 'fp32'")
    product = primitive()  # the kernel without a gradient: the backward's two products
    grad_input, grad_weight = ops.MatMul(), ops.MatMul(transpose_a=True)

    def bprop_bf16(x, w, out, dout):
        dx = product(dout, ops.transpose(w, (1, 0)))                           # dy W     [M, K]
        dw = product(ops.transpose(dout, (1, 0)), ops.transpose(x, (1, 0)))    # dyᵀ x    [N, K]
        return dx, dw

    def bprop_fp32(x, w, out, dout):
        return grad_input(dout, w), grad_weight(dout, x)

    return ops.Custom(f"{kernel_library()}:DenseBf16", out_shape=lambda x, w: [x[0], w[0]],
                      out_dtype=lambda x, w: x, func_type="aot",
                      bprop=bprop_bf16 if gradients == "bf16" else bprop_fp32)


def graph_dense(gradients: str = "bf16") -> Callable:
    """``dense(x, w, b=None)`` = x wᵀ + b over the last axis of x with ``bf16_matmul(gradients)``:
    the ``dense`` the functional layer math takes, usable inside ``ms.jit`` and ``ms.grad``.  The
    bias is added in float32."""
    matmul = bf16_matmul(gradients)

    def dense(x, w, b=None):
        shape = x.shape
        y = matmul(x.reshape(-1, shape[-1]), w)
        if b is not None:
            y = y + b
        return y.reshape(shape[:-1] + (w.shape[0],))

    return dense


# The Projection cells of a ``CausalLM`` that are its LM head (tied: the embedding table).
HEAD_CELLS = ("tied_head", "lm_head.dense")
HEAD_GRADIENTS = "fp32"  # see ``bf16_matmul``; measured in docs/training.md "CPU precision"


def use_bf16_projections(net) -> int:
    """Make every ``Projection`` of ``net`` (a ``CausalLM``: the layers' projections and the LM head)
    multiply with ``bf16_matmul`` — the head's gradients by ``HEAD_GRADIENTS``; returns how many
    were switched."""
    from mindyouzhi.models.layers import Projection

    count = 0
    for name, cell in net.cells_and_names():
        if isinstance(cell, Projection):
            cell.use_matmul(bf16_matmul(HEAD_GRADIENTS if name in HEAD_CELLS else "bf16"))
            count += 1
    return count
