"""Which of MindSpore's parallel / mixed-precision features run on CPU: one tiny network, five Adam
steps, one feature per run (``python parallel_probe.py FEATURE OUT`` alone or under ``msrun``).

Prints ``PROBE {json}`` with the losses, the optimizer-state shapes (sharded state would be
smaller than its parameter) or the first line of the error.  Used by
tests/test_train_parallel_facts.py; the findings are the table in docs/training.md.
"""
import json
import os
import sys

import numpy as np


def main(feature: str) -> dict:
    import mindspore as ms
    from mindspore import Parameter, Tensor, nn, ops

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    if "MS_WORKER_NUM" in os.environ:
        from mindspore.communication import init

        init()
    rng = np.random.default_rng(0)
    w_in, w_out, w_head = (rng.standard_normal(s).astype(np.float32) * 0.3 for s in ((16, 32), (32, 16), (16, 16)))
    xs, ys = rng.standard_normal((2, 5, 8, 16)).astype(np.float32)

    class Net(nn.Cell):
        def __init__(self, column=None, row=None, compute=None):
            super().__init__()
            self.compute = compute
            self.w_in, self.w_out, self.head = (Parameter(Tensor(w), name=n) for w, n in
                                                ((w_in, "w_in"), (w_out, "w_out"), (w_head, "head")))
            self.first, self.second, self.third = ops.MatMul(), ops.MatMul(), ops.MatMul()
            if column:  # Megatron layout: column-split first matrix, row-split second
                self.first.shard(column)
                self.second.shard(row)

        def construct(self, x, y):
            w_in, w_out, head = self.w_in, self.w_out, self.head
            if self.compute is not None:  # fp16 compute on fp32 master weights
                x, w_in, w_out, head = x.astype(self.compute), w_in.astype(self.compute), \
                    w_out.astype(self.compute), head.astype(self.compute)
            hidden = self.second(ops.relu(self.first(x, w_in)), w_out)
            diff = self.third(hidden, head).astype(ms.float32) - y
            return (diff * diff).mean()

    sharded = feature in ("semi_auto_shard", "hsdp", "pipeline")
    net = Net(((1, 1), (1, 2)), ((1, 2), (2, 1))) if sharded else Net(
        compute=ms.float16 if feature == "fp16_functional" else None)
    if feature == "recompute":
        net.recompute()
    if feature == "bf16_amp":
        from mindspore import amp

        net = amp.auto_mixed_precision(net, "O2", dtype=ms.bfloat16)
    if feature == "fp16_amp_cell":
        from mindspore import amp

        net = amp.auto_mixed_precision(net, "O2")
    optimizer = nn.AdamWeightDecay(net.trainable_params(), learning_rate=1e-2)
    if feature == "fp16_amp_cell":
        step = nn.TrainOneStepWithLossScaleCell(net, optimizer, scale_sense=nn.DynamicLossScaleUpdateCell(
            loss_scale_value=2.0 ** 12, scale_factor=2, scale_window=1000))
    elif feature == "fp16_functional":
        step = _functional_fp16_step(net, optimizer)
    else:
        step = nn.TrainOneStepCell(net, optimizer)
    if feature == "dp_parallel_optimizer":
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                     enable_parallel_optimizer=True,
                                     parallel_optimizer_config={"parallel_optimizer_threshold": 0})
    if sharded:
        from mindspore.parallel.auto_parallel import AutoParallel

        step = AutoParallel(step, parallel_mode="semi_auto")
        step.dataset_strategy("full_batch")
        if feature == "hsdp":
            step.hsdp(threshold=0)
        if feature == "pipeline":
            step.pipeline(stages=2)
    report = {"feature": feature}
    try:
        losses = []
        for x, y in zip(xs, ys):
            out = step(Tensor(x), Tensor(y))
            losses.append(float((out[0] if isinstance(out, tuple) else out).asnumpy()))
        report["losses"] = losses
        report["state_shapes"] = [list(p.asnumpy().shape) for p in optimizer.moments1]
        report["param_shapes"] = [list(p.shape) for p in optimizer.parameters]
    except Exception as exc:  # the finding is the error itself
        lines = [line.strip() for line in str(exc).splitlines() if line.strip() and set(line.strip()) - set("-")]
        report["error"] = f"{type(exc).__name__}: {' | '.join(lines[:2])}"
    return report


def _functional_fp16_step(net, optimizer):
    """fp16 compute, fp32 master weights, dynamic loss scaling with the functional amp API."""
    import mindspore as ms
    from mindspore import amp

    scaler = amp.DynamicLossScaler(scale_value=2.0 ** 12, scale_factor=2, scale_window=1000)
    params = optimizer.parameters

    def scaled_loss(x, y):
        return scaler.scale(net(x, y))

    grad_fn = ms.value_and_grad(scaled_loss, None, params)

    @ms.jit
    def step(x, y):
        loss, grads = grad_fn(x, y)
        grads = scaler.unscale(grads)
        finite = amp.all_finite(grads)
        scaler.adjust(finite)
        if finite:
            optimizer(grads)
        return scaler.unscale(loss)

    return step


if __name__ == "__main__":
    result = main(sys.argv[1])
    print("PROBE " + json.dumps(result), flush=True)
