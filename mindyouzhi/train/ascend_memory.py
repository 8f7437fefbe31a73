"""What one rank of the semi-auto parallel step holds on Ascend (the plan for ``device_target:
Ascend``, the A3 recipes): a buffer-reusing device, counted from the model's tensor shapes and the
numbers the plan hands in (``memory.py``: per-rank weight elements from the layout's strategies).

Rows, per rank of the largest pipeline stage:

* weights in the compute dtype; fp32 master weights when the compute dtype is not fp32; fp32
  gradients; AdamW's two fp32 moments — master weights and moments divided over the data-parallel
  ranks with ``optimizer_shard`` (MindSpore's parallel optimizer, ``hsdp`` level 1);
* accumulation: ``GradAccumulation`` unrolls the micro-batches in one graph
  (``mindspore/parallel/nn/parallel_cell_wrapper.py``: ``construct`` calls the network once per
  micro-batch and adds the losses), so the backward sums every micro-batch's weight gradients in
  that graph — one more fp32 gradient set for the running sum; its activations are counted for one
  micro-batch in flight, which holds only if MindSpore's ``ReorderGradAccumulation`` pass
  (``frontend/parallel/graph_util/grad_accumulation_utils.cc``, named in its frontend library)
  runs each micro-batch's backward before the next forward — not checked (no Ascend here);
* pipeline: ``PipelineGradReducer`` clones every trainable parameter as an fp32 accumulation
  buffer (``parallel_grad_reducer.py``: ``parameters.clone(prefix="accu_grads")``), and 1F1B keeps
  up to ``pipeline_stage`` micro-batches' activations on the first stage;
* the GKD teacher's weights in the compute dtype, sharded like the student (it is held in that
  dtype: ``semi_auto.hold_teacher``);
* activations of one micro-batch (every layer's saved tensors, or with recomputation each layer's
  input plus one layer's tensors twice);
* the head: the logits come out of the vocabulary-split MatMul as [tokens, vocab/mp] slices, but
  MindSpore's (Log)Softmax does not split its axis (its operator info refuses a strategy that
  splits it: "The strategy corresponding to axis dimension … is not 1"), so the loss redistributes
  them to full [tokens, vocab] fp32 tensors on every rank: logits, log-softmax and its gradient
  (+ the teacher's full logits and log-probs for GKD) at full vocabulary, the slices on top;
* HCCL: the collective library's send/receive buffers, ``HCCL_BUFFSIZE`` (200 MB by default in
  CANN's documentation) in and out per communication group the layout opens (data-parallel,
  model-parallel, pipeline, world) — an assumption from CANN's documentation, not MindSpore source.

Not counted: the framework's workspace and fragmentation (the gap between HBM and
``max_device_memory``).  Not checked on Ascend (none here); ``train --dry-run`` compiles the
recipe with MindSpore's simulation on an Ascend host and prints its compiled memory next to this.
"""
from __future__ import annotations

import math

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FP32 = 4
HCCL_BUFFER_BYTES = 200 << 20  # CANN's default HCCL_BUFFSIZE, per direction and communication group


def _layer_activation_elements(config, layer: int, tokens: int, seq_length: int, mp: int) -> int:
    """Elements one layer keeps for its backward: every projection's output (split over mp),
    scores and probabilities (heads split over mp), the MLP's activation and product, and the
    hidden-size tensors around the norms and residuals (replicated)."""
    from mindyouzhi.models.decoder import expected_layer_shapes

    shapes = expected_layer_shapes(config, layer)
    projected = sum(shape[0] for name, shape in shapes.items()
                    if len(shape) == 2 and not name.endswith("down_proj.weight") and not name.endswith("o_proj.weight"))
    heads = config.num_attention_heads
    sharded = projected // mp + 2 * heads * seq_length // mp + 2 * config.intermediate_size // mp
    replicated = 6 * config.hidden_size
    return tokens * (sharded + replicated)


def communication_groups(layout) -> int:
    """Groups the layout opens besides the world: data-parallel, model-parallel, pipeline (when > 1)."""
    return 1 + sum(1 for size in (layout.data_parallel, layout.model_parallel, layout.pipeline_stage) if size > 1)


def step_rows(config, layout, params: int, *, seq_length: int, micro_batch: int, compute_dtype: str,
              recompute: bool, accumulation: int, teacher_config=None, teacher_params: int = 0) -> dict:
    """Rows in bytes; ``params`` / ``teacher_params``: weight elements one rank holds (the layout's
    slices of its largest stage)."""
    mp, dp, pp = layout.model_parallel, layout.data_parallel, layout.pipeline_stage
    compute = DTYPE_BYTES[compute_dtype]
    shard = dp if layout.optimizer_shard else 1
    rows = {"weights (" + compute_dtype + ")": params * compute}
    if compute_dtype != "float32":
        rows["fp32 master weights"] = math.ceil(params / shard) * FP32
    rows["gradients (fp32)"] = params * FP32
    rows["AdamW moments (fp32)"] = math.ceil(params / shard) * 2 * FP32
    if pp > 1:
        rows["PipelineGradReducer accumulation buffers (fp32)"] = params * FP32
    elif accumulation > 1:
        rows["GradAccumulation: running sum of the unrolled micro-batches' gradients (fp32)"] = params * FP32
    if teacher_config is not None:
        rows["teacher weights (" + compute_dtype + ", held so)"] = teacher_params * compute

    tokens = micro_batch * seq_length
    layers_per_stage = math.ceil(config.num_hidden_layers / pp)
    per_layer = [_layer_activation_elements(config, i, tokens, seq_length, mp) for i in range(layers_per_stage)]
    in_flight = min(pp, layout.micro_batch_num) if pp > 1 else 1
    if recompute:
        kept = tokens * config.hidden_size * layers_per_stage
        working = 2 * max(per_layer)  # the recomputed layer and its gradients
        rows["activations (recompute)"] = (kept * in_flight + working) * compute
    else:
        rows["activations (no recompute)"] = sum(per_layer) * in_flight * compute
    vocab = config.vocab_size
    slices = 2 + (1 if teacher_config is not None else 0)  # student logits + their gradient (+ teacher logits)
    full = 3 + (2 if teacher_config is not None else 0)    # logits, log-softmax, gradient (+ teacher logits, log-probs)
    rows["head: vocab-split logits (compute dtype)"] = tokens * (vocab // mp) * slices * compute
    rows["head: softmax over the full vocabulary (fp32, the axis is not split)"] = tokens * vocab * full * FP32
    rows["HCCL buffers (default HCCL_BUFFSIZE, in and out per group)"] = (
        2 * HCCL_BUFFER_BYTES * communication_groups(layout))
    return rows


def host_rows(params_full: int, teacher_full: int, local_ranks: int) -> dict:
    """Host RAM of one node while the ranks load: each rank builds the full fp32 student (and
    teacher) from safetensors before MindSpore slices them onto the device."""
    per_rank = (params_full + teacher_full) * FP32
    return {"per rank: full fp32 student" + (" + teacher" if teacher_full else ""): per_rank,
            f"per node: {local_ranks} ranks loading at once": per_rank * local_ranks}
