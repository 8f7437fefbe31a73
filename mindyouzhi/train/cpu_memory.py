"""What one training step holds on MindSpore's CPU backend (the plan for ``device_target: CPU``).

Measured here (MindSpore 2.10 CPU, ``bench/train_memory.py --layer``: one GQA layer's graph at
2 and 8 × 256 tokens): a compiled CPU graph gives every op its own output buffer and keeps it to
the end of the graph — the layer's forward alone holds about the sum of all its op outputs (28.3k
floats per token measured, 25.1k counted below), its gradient graph also every gradient the
backward computes (71.2–71.9k measured in two runs, 60.7k counted).  So the
count is not "what the backward needs" (the Ascend plan in ``memory.py``) but every tensor the
model code creates, forward and backward, walked op by op through ``models/functional.py``:

* ``_Graph`` counts elements: an op's forward output, and the gradients its backward creates
  (one per differentiable input; a broadcast input's gradient is made at full size, then reduced;
  a slice's gradient is a zero-padded full-size tensor; a tensor read by several ops gets one
  extra summed gradient);
* the whole-graph step holds every layer's forward and backward tensors plus the head's at once;
  the layer-wise step holds each layer's input (kept for the backward), one layer's forward +
  backward graph (the recomputation), and the head's graph;
* the head: logits [tokens, vocab], the loss's [tokens, vocab] tensors forward and backward
  (cross-entropy: logsumexp and the one-hot gather; GKD: log-softmax, exp, the products with the
  teacher's log-probs, which are themselves a [tokens, vocab] input);
* buffers outside the graphs: fp32 weights, AdamW's two moments, the gradients, the clipped copy
  of the gradients (clipping multiplies every gradient into a new tensor), accumulation buffers;
  for GKD the teacher's weights and its log-probs (its inference graphs run before the step and
  their freed tensors are reused by it);
* two costs measured once on nano models (hidden 16, vocab 128: weights negligible) and named as
  such: the runtime's working set of a training run, and the compilation of the whole-graph step,
  which grows with the number of layers in that one graph (the layer-wise step compiles one small
  graph per layer shape, part of the working set).
"""
from __future__ import annotations

from dataclasses import dataclass

FP32 = 4
# Measured once on nano models (hidden 16, 2 heads, vocab 128, 2 × 256 tokens; bench/train_memory.py
# --calibrate, 2026-12-04), where weights are negligible: the measured peak minus the buffers
# counted below.  The runtime's own working set of a training run (CPU kernels, thread pools, the
# small layer graphs, the plotting library) — the same at 4 and 8 layers of the layer-wise step —
# and what compiling the whole-graph step adds per decoder layer in that one graph.
RUNTIME_BYTES = 141 << 20
WHOLE_GRAPH_COMPILE_BYTES_PER_LAYER = 27 << 20


@dataclass
class _Graph:
    """Element counter for one graph's forward outputs and backward gradients."""

    forward: int = 0
    backward: int = 0

    def op(self, out: int, grads: int = 0) -> int:
        self.forward += out
        self.backward += grads
        return out

    # one helper per kind of op in models/functional.py, with what its backward creates
    def dense(self, tokens: int, width_in: int, width_out: int) -> int:
        return self.op(tokens * width_out, tokens * width_in)  # dx (dW is a weight gradient)

    def unary(self, size: int) -> int:  # silu, exp, rsqrt: one gradient
        return self.op(size, size)

    def mul(self, size: int) -> int:  # both inputs get a full-size gradient (broadcast ones then reduced)
        return self.op(size, 2 * size)

    def scale(self, size: int) -> int:  # times a constant (RoPE table, 1/√d, the teacher): one gradient
        return self.op(size, size)

    def add(self, size: int) -> int:  # the incoming gradient passes through
        return self.op(size, 0)

    def sub(self, size: int) -> int:  # the second input's gradient is negated
        return self.op(size, size)

    def copy(self, size: int) -> int:  # transpose / swapaxes: the gradient is transposed back
        return self.op(size, size)

    def slice(self, source: int, part: int) -> int:  # StridedSliceGrad: zero-padded full-size gradient
        return self.op(part, source)

    def concat(self, size: int) -> int:
        return self.op(size, size)

    def reduce(self, source: int, out: int) -> int:  # mean / sum: the gradient is broadcast back
        return self.op(out, source)

    def matmul(self, a: int, b: int, out: int) -> int:
        return self.op(out, a + b)

    def softmax(self, size: int) -> int:  # (dout − Σ dout·p)·p: two full-size tensors
        return self.op(size, 2 * size)

    def fan_in(self, size: int, readers: int) -> None:  # gradients of a tensor read by several ops summed
        self.backward += size * (readers - 1)


def _rms_norm(g: _Graph, tokens: int, width: int) -> None:
    size = tokens * width
    g.mul(size)                     # x * x
    g.reduce(size, tokens)          # mean
    g.add(tokens)                   # + eps
    g.unary(tokens)                 # rsqrt
    g.mul(size)                     # x * rsqrt
    g.mul(size)                     # * weight
    g.fan_in(size, 3)               # x read by x*x (twice) and x*rsqrt


def _rope(g: _Graph, size: int) -> None:
    """apply_rotate_half on ``size`` elements: two half slices, four products, sub, add, concat."""
    half = size // 2
    g.slice(size, half)
    g.slice(size, half)
    for _ in range(4):
        g.scale(half)               # by the cos / sin tables (inputs, no gradient of their own)
    g.sub(half)
    g.add(half)
    g.concat(size)
    g.fan_in(half, 2)
    g.fan_in(half, 2)


def _mlp(g: _Graph, tokens: int, hidden: int, ffn: int) -> None:
    _rms_norm(g, tokens, hidden)
    gate = g.dense(tokens, hidden, ffn)
    g.unary(gate)                   # silu
    g.dense(tokens, hidden, ffn)    # up
    g.mul(gate)                     # silu(gate) * up
    g.dense(tokens, ffn, hidden)    # down
    g.add(tokens * hidden)          # residual
    g.fan_in(tokens * hidden, 2)    # the normed input read by gate and up
    g.fan_in(tokens * hidden, 2)    # the residual stream read by the norm and the residual add


def _attend(g: _Graph, batch: int, seq: int, heads: int, q_width: int, k_width: int, v_width: int,
            kv_elements: int) -> None:
    """Scores, mask, softmax, weighted sum and the output transpose (gqa_attend / mla_attend_expanded)."""
    tokens = batch * seq
    scores = batch * heads * seq * seq
    g.matmul(tokens * q_width, kv_elements, scores)
    g.scale(scores)                 # * 1/sqrt(d)
    g.add(scores)                   # + mask
    g.softmax(scores)
    out = g.matmul(scores, tokens * v_width, tokens * heads * (v_width // heads))
    g.copy(out)                     # transpose back to [B, T, H·d]


def gqa_layer_elements(config, batch: int, seq: int) -> tuple[int, int]:
    """(forward, backward) elements of one GQA layer's graph (functional.gqa_layer)."""
    g = _Graph()
    tokens, hidden = batch * seq, config.hidden_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    _rms_norm(g, tokens, hidden)
    for width in (q, kv):           # q and k: projection, transpose, RoPE (qk_norm adds a norm)
        g.dense(tokens, hidden, width)
        if config.qk_norm:
            _rms_norm(g, tokens, width)
        g.copy(tokens * width)
        _rope(g, tokens * width)
    g.dense(tokens, hidden, kv)     # v and its transpose
    g.copy(tokens * kv)
    g.copy(tokens * kv)             # k swapaxes for the scores
    _attend(g, batch, seq, config.num_attention_heads, q, kv, kv, tokens * kv)
    g.dense(tokens, q, hidden)      # o_proj
    g.add(tokens * hidden)          # residual
    g.fan_in(tokens * hidden, 3)    # the normed input read by q, k and v
    _mlp(g, tokens, hidden, config.intermediate_size)
    return g.forward, g.backward


def mla_layer_elements(config, layer: int, batch: int, seq: int) -> tuple[int, int]:
    """(forward, backward) elements of one MLA layer's graph (functional.mla_layer, expanded form)."""
    from mindyouzhi.models.decoder import mla_dims

    heads, nope, rope, v_dim, rank = mla_dims(config, layer)
    g = _Graph()
    tokens, hidden = batch * seq, config.hidden_size
    _rms_norm(g, tokens, hidden)
    q = g.dense(tokens, hidden, heads * (nope + rope))
    g.copy(q)                                           # transpose to heads
    g.slice(q, tokens * heads * nope)                   # q_nope
    g.slice(q, tokens * heads * rope)                   # q_pe
    _rope(g, tokens * heads * rope)
    g.fan_in(q, 2)
    latent = g.dense(tokens, hidden, rank + rope)       # kv_a
    g.slice(latent, tokens * rank)
    g.slice(latent, tokens * rope)
    if config.mla.latent_norm:
        _rms_norm(g, tokens, rank)
    _rope(g, tokens * rope)
    kv = g.dense(tokens, rank, heads * (nope + v_dim))  # kv_b
    g.copy(kv)                                          # transpose to heads
    g.slice(kv, tokens * heads * nope)
    g.slice(kv, tokens * heads * v_dim)
    g.fan_in(kv, 2)
    scores = batch * heads * seq * seq
    g.copy(tokens * rope)                               # k_pe expand + swapaxes
    g.matmul(tokens * heads * rope, tokens * rope, scores)          # q_pe · k_peᵀ
    if nope:
        g.copy(tokens * heads * nope)                               # k_nope swapaxes
        g.matmul(tokens * heads * nope, tokens * heads * nope, scores)
        g.add(scores)
    g.scale(scores)
    g.add(scores)
    g.softmax(scores)
    out = g.matmul(scores, tokens * heads * v_dim, tokens * heads * v_dim)
    g.copy(out)
    g.dense(tokens, heads * v_dim, hidden)              # o_proj
    g.add(tokens * hidden)
    g.fan_in(tokens * hidden, 2)                        # the normed input read by q and kv_a
    _mlp(g, tokens, hidden, config.intermediate_size)
    return g.forward, g.backward


def layer_elements(config, layer: int, batch: int, seq: int) -> tuple[int, int]:
    if config.is_mla(layer):
        return mla_layer_elements(config, layer, batch, seq)
    return gqa_layer_elements(config, batch, seq)


def head_elements(config, tokens: int, gkd: bool) -> tuple[int, int]:
    """(forward, backward) of final norm + head + per-token loss over the vocabulary."""
    g = _Graph()
    vocab = config.vocab_size
    _rms_norm(g, tokens, config.hidden_size)
    logits = g.dense(tokens, config.hidden_size, vocab)
    if gkd:  # generalized_jsd, beta 0: exp(t) · (t − log_softmax(s)), summed over the vocabulary
        g.softmax(logits)           # log_softmax (same backward shape as softmax)
        g.op(logits)                # exp(teacher): no gradient (the teacher is an input)
        g.sub(logits)               # teacher − student
        g.scale(logits)             # exp(teacher) · (…): only the student side gets a gradient
        g.reduce(logits, tokens)
    else:    # token_cross_entropy: logsumexp − gathered target logit
        g.op(tokens, 3 * logits)    # max; its gradient: equal-to-max indicator, its cast, the scaled share
        g.sub(logits)
        g.unary(logits)             # exp
        g.reduce(logits, tokens)    # sum
        g.unary(tokens)             # log
        g.op(tokens, logits)        # gather_elements: its gradient scatters into a [tokens, vocab] zero tensor
        g.fan_in(logits, 3)
    return g.forward, g.backward


def step_buffers(config, parameters: int, *, batch: int, seq: int, recompute: bool, gkd: bool,
                 clip: bool, accumulation: int, teacher_config=None, teacher_parameters: int = 0,
                 data_parallel: int = 1) -> dict:
    """Rows of the CPU plan in bytes (fp32 throughout: CPU has no bf16 MatMul); ``parameters`` /
    ``teacher_parameters``: the models' weight elements (the plan counts them)."""
    tokens = batch * seq
    rows = {"weights (float32)": parameters * FP32,
            "AdamW moments (fp32)": 2 * parameters * FP32,
            "gradients (fp32)": parameters * FP32}
    if data_parallel > 1:  # AllReduce writes the summed gradients into new tensors
        rows["all-reduced gradients (data parallel)"] = parameters * FP32
    if clip:
        rows["clipped gradients (a second fp32 copy)"] = parameters * FP32
    if accumulation > 1 and not recompute:
        rows["gradient accumulation buffers"] = parameters * FP32
    layers = [layer_elements(config, i, batch, seq) for i in range(config.num_hidden_layers)]
    embed = 2 * tokens * config.hidden_size  # the gathered embeddings and their gradient
    if recompute:
        inputs = tokens * config.hidden_size * config.num_hidden_layers
        working = max(f + b for f, b in layers)
        rows["layer inputs kept + one recomputed layer (forward and backward)"] = (inputs + working + embed) * FP32
    else:
        rows["every layer's forward and backward tensors (no reuse in the CPU graph)"] = (
            sum(f + b for f, b in layers) + embed) * FP32
        rows["whole-graph compilation (measured on a nano model)"] = (
            WHOLE_GRAPH_COMPILE_BYTES_PER_LAYER * config.num_hidden_layers)
    head_forward, head_backward = head_elements(config, tokens, gkd)
    rows["head and loss over the vocabulary (forward and backward)"] = (head_forward + head_backward) * FP32
    if teacher_config is not None:
        rows["teacher weights (float32)"] = teacher_parameters * FP32
        # the teacher's inference graphs run before the student's step and free their tensors; only
        # the log-probs they hand over stay alive through the step
        rows["teacher log-probs [tokens, vocab]"] = tokens * teacher_config.vocab_size * FP32
    rows["runtime working set (measured on a nano model)"] = RUNTIME_BYTES
    return rows
