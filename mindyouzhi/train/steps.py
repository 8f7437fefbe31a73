"""The jitted train step, in two forms with the same result.

``WholeGraphStep`` — the whole model in one graph (``ms.value_and_grad`` over the ``CausalLM``
Cell): forward, backward, gradient all-reduce, clipping and the fused AdamW update compiled once.
Fastest for small models, but MindSpore's CPU graph keeps every layer's intermediates alive:
measured on SmolLM2-135M-MLA (30 layers) at 128 tokens per micro-batch ≈ 0.15 GB per layer and
tens of seconds of compilation, so > 12 GB at 2 × 256 tokens.

``LayerwiseStep`` (``recompute_config.recompute: true``) — layer-by-layer with recomputation, the
training counterpart of ``ModelRunner``: the forward runs one jitted layer function per layer
shape (weights are arguments, so all 30 layers share one compiled graph) and keeps only each
layer's input; the backward walks the layers in reverse, recomputing each layer inside a jitted
``ms.grad`` of ⟨layer(x, w), dy⟩ that returns (dx, dw).  Memory is one layer's graph plus the
head's [B, T, V] tensors; compilation is a handful of small graphs; the price is one extra
forward.  The accumulated gradients are all-reduced, clipped and applied one parameter at a time
(the same fused AdamW kernel, outside a graph).

Both compute the gradient of Σ per-token-loss × weight, with weights = loss mask / loss tokens of
the global batch (see ``trainer``), so micro-batches and ranks combine by summation.

Both run the projections and the LM head in float32 (MindSpore's MatMul) or, with
``context.cpu_precision`` resolving to ``bf16`` on a CPU, in bf16 with float32 accumulation,
forward and backward (``bf16_ops.py``); master weights, optimizer, norms, attention core and
losses stay float32 either way.
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np


def _per_token_loss(run_mode: str, gkd: dict):
    from .losses import generalized_jsd, token_cross_entropy

    beta, temperature = float(gkd["beta"]), float(gkd["temperature"])
    if run_mode == "gkd":
        def per_token(logits, targets, teacher):
            return generalized_jsd(logits, teacher, beta, temperature)
    else:
        def per_token(logits, targets, teacher):
            return token_cross_entropy(logits, targets)
    return per_token


def _finisher(optimizer, max_grad_norm: Optional[float], world_size: int):
    """all-reduce (data parallel) → global-norm clip → AdamW; returns (loss, grad_norm)."""
    from mindspore import ops

    hyper = ops.HyperMap()
    reduce = ops.AllReduce() if world_size > 1 else None

    def finish(grads, loss, lr, eps, decay):
        if world_size > 1:
            grads = hyper(reduce, grads)
            loss = reduce(loss)
        norm = ops.sqrt(ops.addn([(g * g).sum() for g in grads]))
        if max_grad_norm:
            factor = ops.minimum(max_grad_norm / (norm + 1e-6), 1.0)
            grads = hyper(ops.partial(ops.mul, factor), grads)
        loss = ops.depend(loss, optimizer(grads, lr, eps, decay))
        return loss, norm

    return finish


class WholeGraphStep:
    def __init__(self, net, params, optimizer, run_mode: str, gkd: dict, max_grad_norm: Optional[float],
                 world_size: int, accumulation: int, graph_mode: bool):
        import mindspore as ms
        from mindspore import ParameterTuple, ops

        per_token = _per_token_loss(run_mode, gkd)
        finish = _finisher(optimizer, max_grad_norm, world_size)
        hyper = ops.HyperMap()
        jit = ms.jit if graph_mode else _identity

        def loss_fn(ids, targets, weights, teacher, cos, sin, mla_cos, mla_sin, mask):
            logits = net(ids, cos, sin, mla_cos, mla_sin, mask)
            return (per_token(logits, targets, teacher) * weights).sum()

        grad_fn = ms.value_and_grad(loss_fn, None, params)

        def fused(ids, targets, weights, teacher, lr, eps, decay, cos, sin, mla_cos, mla_sin, mask):
            loss, grads = grad_fn(ids, targets, weights, teacher, cos, sin, mla_cos, mla_sin, mask)
            return finish(grads, loss, lr, eps, decay)

        self._fused = jit(fused)
        self.accumulation = accumulation
        if accumulation > 1:
            buffers = ParameterTuple(params).clone(prefix="grad_accumulation", init="zeros")

            def add_into(keep, buffer, grad):
                return ops.assign(buffer, buffer * keep + grad)

            def accumulate(ids, targets, weights, teacher, keep, cos, sin, mla_cos, mla_sin, mask):
                loss, grads = grad_fn(ids, targets, weights, teacher, cos, sin, mla_cos, mla_sin, mask)
                return ops.depend(loss, hyper(ops.partial(add_into, keep), buffers, grads))

            def apply(loss, lr, eps, decay):
                return finish(buffers, loss, lr, eps, decay)

            self._accumulate = jit(accumulate)
            self._apply = jit(apply)

    def run(self, micro_batches: Iterable[tuple], lr, eps, decay, tables):
        """``micro_batches`` yields (ids, targets, weights, teacher[, masks]) tensors; returns (loss, norm)
        tensors.  The whole graph passes one mask to every layer: the trainer gives it masks only
        for models whose layers are all MLA."""
        import mindspore as ms

        if self.accumulation == 1:
            (ids, targets, weights, teacher), masks = _split_micro(next(iter(micro_batches)))
            return self._fused(ids, targets, weights, teacher, lr, eps, decay, *_with_mask(tables, masks))
        local = 0.0
        for index, batch in enumerate(micro_batches):
            (ids, targets, weights, teacher), masks = _split_micro(batch)
            keep = ms.Tensor(0.0 if index == 0 else 1.0, ms.float32)
            local += float(self._accumulate(ids, targets, weights, teacher, keep,
                                            *_with_mask(tables, masks)).asnumpy())
        return self._apply(ms.Tensor(local, ms.float32), lr, eps, decay)


def _identity(function):
    return function


def _with_mask(tables: tuple, masks: Optional[tuple], kind: str = "mla") -> tuple:
    """``tables`` = (cos, sin, mla_cos, mla_sin, causal mask); a micro-batch with packed examples
    kept apart brings its own (MLA-layout, GQA-layout) block-diagonal masks."""
    if masks is None:
        return tables
    return tables[:-1] + (masks[1] if kind == "gqa" else masks[0],)


def _split_micro(batch: tuple) -> tuple:
    """(ids, targets, weights, teacher[, masks]) → the four tensors and the masks (or None)."""
    return batch[:4], (batch[4] if len(batch) > 4 else None)


class LayerwiseStep:
    def __init__(self, net, config, params, optimizer, run_mode: str, gkd: dict, max_grad_norm: Optional[float],
                 world_size: int, graph_mode: bool, precision: str = "fp32"):
        import mindspore as ms
        from mindspore import ops

        from mindyouzhi.models import functional as F
        from mindyouzhi.models.decoder import mla_dims

        jit = ms.jit if graph_mode else _identity
        if precision == "bf16":  # projections and head in bf16 (bf16_ops); attention core, norms, losses fp32
            from .bf16_ops import HEAD_GRADIENTS, graph_dense

            self._layer_functions = F.layer_graphs(graph_dense())
            head_dense = graph_dense(HEAD_GRADIENTS)
        else:
            self._layer_functions = (F.gqa_layer, F.mla_layer)
            head_dense = ops.dense
        per_token = _per_token_loss(run_mode, gkd)
        eps = float(config.rms_norm_eps)
        named = dict(net.parameters_and_names())
        self.params = list(params)
        self.slot = {p.name: i for i, p in enumerate(self.params)}
        self._graphs: dict[tuple, tuple] = {}
        self.layers = []
        self.kinds: list[str] = []
        for index in range(config.num_hidden_layers):
            prefix = f"model.layers.{index}."
            if config.is_mla(index):
                order, dims, kind = F.MLA_LAYER_WEIGHTS, mla_dims(config, index), "mla"
            else:
                order, kind = F.GQA_LAYER_WEIGHTS, "gqa"
                dims = (config.num_attention_heads, config.num_key_value_heads, config.head_dim)
            present = tuple(i for i, name in enumerate(order) if prefix + name in named)
            weights = tuple(named[prefix + order[i]] for i in present)
            # gradients only for trainable weights (``model.trainable: attention`` skips the MLP's dW)
            wanted = tuple(slot for slot, i in enumerate(present) if prefix + order[i] in self.slot)
            names = tuple(prefix + order[present[slot]] for slot in wanted)
            forward, backward = self._layer_graphs(kind, dims, eps, len(order), present, wanted, jit)
            self.layers.append((forward, backward, weights, names))
            self.kinds.append(kind)

        self.embed = named["model.embed_tokens.weight"]
        self.norm = named["model.norm.weight"]
        self.head = self.embed if config.tie_word_embeddings else named["lm_head.weight"]
        self.head_name = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"

        def head_objective(hidden, norm, head, targets, weights, teacher):
            logits = head_dense(F.rms_norm(hidden, norm, eps), head)
            return (per_token(logits, targets, teacher) * weights).sum()

        def embed_objective(table, ids, upstream):
            return (ops.gather(table, ids, 0) * upstream).sum()

        def embed(table, ids):
            return ops.gather(table, ids, 0)

        self.head_positions = (0,) + tuple(position for position, name in ((1, "model.norm.weight"),
                                                                        (2, self.head_name)) if name in self.slot)
        self._head = jit(ms.value_and_grad(head_objective, grad_position=self.head_positions))
        self._embed = jit(embed)
        self._embed_grad = jit(ms.grad(embed_objective, grad_position=0))
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.world_size = world_size

    def _layer_graphs(self, kind, dims, eps, width, present, wanted, jit):
        """(forward, backward) for one layer shape, shared by every layer with that shape; the
        backward returns (dx, d(weights[wanted]))."""
        import mindspore as ms

        from mindyouzhi.models import functional as F

        key = (kind, dims, present, wanted)
        if key in self._graphs:
            return self._graphs[key]
        gqa_layer, mla_layer = self._layer_functions
        layer = mla_layer if kind == "mla" else gqa_layer

        def full(weights):
            out = [None] * width
            for slot, position in enumerate(present):
                out[position] = weights[slot]
            return tuple(out)

        if kind == "mla":
            def forward(x, cos, sin, mla_cos, mla_sin, mask, *weights):
                return layer(x, mla_cos, mla_sin, mask, *dims, eps, *full(weights))
        else:
            def forward(x, cos, sin, mla_cos, mla_sin, mask, *weights):
                return layer(x, cos, sin, mask, *dims, eps, *full(weights))

        def objective(x, upstream, cos, sin, mla_cos, mla_sin, mask, *weights):
            return (forward(x, cos, sin, mla_cos, mla_sin, mask, *weights) * upstream).sum()

        backward = ms.grad(objective, grad_position=(0,) + tuple(7 + slot for slot in wanted))
        self._graphs[key] = (jit(forward), jit(backward))
        return self._graphs[key]

    def _micro(self, ids, targets, weights, teacher, tables, layer_values, masks=None):
        """Loss and gradients (aligned with ``self.params``, None where untouched) of one micro-batch."""
        layer_tables = [_with_mask(tables, masks, kind) for kind in self.kinds]
        grads: list = [None] * len(self.params)

        def add(name, grad):
            slot = self.slot.get(name)
            if slot is not None:
                grads[slot] = grad if grads[slot] is None else grads[slot] + grad

        hidden = self._embed(self.embed, ids)
        inputs = []
        for (forward, _, _, _), layer_weights, own_tables in zip(self.layers, layer_values, layer_tables):
            inputs.append(hidden)
            hidden = forward(hidden, *own_tables, *layer_weights)
        loss, head_out = self._head(hidden, self.norm, self.head, targets, weights, teacher)
        upstream, *head_grads = head_out if isinstance(head_out, (tuple, list)) else (head_out,)  # 1 position: bare
        for position, grad in zip(self.head_positions[1:], head_grads):
            add("model.norm.weight" if position == 1 else self.head_name, grad)
        for (_, backward, _, names), layer_weights, layer_input, own_tables in zip(
                reversed(self.layers), reversed(layer_values), reversed(inputs), reversed(layer_tables)):
            grads_out = backward(layer_input, upstream, *own_tables, *layer_weights)
            upstream, *layer_grads = grads_out if isinstance(grads_out, (tuple, list)) else (grads_out,)
            for name, grad in zip(names, layer_grads):
                add(name, grad)
        if "model.embed_tokens.weight" in self.slot:
            add("model.embed_tokens.weight", self._embed_grad(self.embed, ids, upstream))
        return loss, grads

    def run(self, micro_batches: Iterable[tuple], lr, eps, decay, tables):
        import mindspore as ms

        # Plain-tensor copies of this step's weights: a Parameter passed to a jitted function keys the
        # compile cache by its identity (30 layers = 30 graphs); tensors of one shape share one graph.
        layer_values = [tuple(p.value() for p in layer[2]) for layer in self.layers]
        total = None
        local = 0.0
        for batch in micro_batches:
            (ids, targets, weights, teacher), masks = _split_micro(batch)
            loss, grads = self._micro(ids, targets, weights, teacher, tables, layer_values, masks)
            local += float(loss.asnumpy())
            total = grads if total is None else [a + b for a, b in zip(total, grads)]
        total = [g if g is not None else ms.ops.zeros_like(p) for g, p in zip(total, self.params)]
        return self._apply_eagerly(total, local, lr, eps, decay)

    def _apply_eagerly(self, grads, local_loss: float, lr, eps, decay):
        """all-reduce → clip → AdamW one parameter at a time (PyNative).  As one graph, the apply step
        for SmolLM2 took ~30 s to compile and ~3 GB for temporaries of all 270 tensors at once."""
        import mindspore as ms
        from mindspore import ops

        loss = ms.Tensor(np.float32(local_loss))
        if self.world_size > 1:
            reduce = ops.AllReduce()
            grads = [reduce(g) for g in grads]
            loss = reduce(loss)
        norm = float(np.sqrt(sum(float((g * g).sum().asnumpy()) for g in grads)))
        if self.max_grad_norm:
            factor = min(1.0, self.max_grad_norm / (norm + 1e-6))
            if factor < 1.0:
                grads = [g * factor for g in grads]
        self.optimizer.apply_eagerly(grads, lr, eps, decay)
        return loss, ms.Tensor(np.float32(norm))


def build_step(net, config, params, optimizer, recipe, world_size: int):
    """The step of a data-parallel run (CPU or Ascend); ``step.precision`` records the projections'
    precision (``context.cpu_precision`` resolved on this machine, ``bf16_ops.resolve``)."""
    from .bf16_ops import RECIPE_KEY, resolve, use_bf16_projections

    clip = recipe.runner_wrapper["max_grad_norm"] if recipe.runner_wrapper["use_clip_grad"] else None
    requested = recipe.context["cpu_precision"]
    precision, fallback = resolve(requested, f"recipe {recipe.path}")
    if recipe.recompute:
        step = LayerwiseStep(net, config, params, optimizer, recipe.run_mode, recipe.gkd, clip, world_size,
                             recipe.graph_mode, precision)
    else:
        if precision == "bf16":
            use_bf16_projections(net)
        step = WholeGraphStep(net, params, optimizer, recipe.run_mode, recipe.gkd, clip, world_size,
                              recipe.runner_config["gradient_accumulation_steps"], recipe.graph_mode)
    step.precision = {"projections": precision, RECIPE_KEY: requested, "fallback_reason": fallback}
    return step


def as_tensors(ids: np.ndarray, targets: np.ndarray, weights: np.ndarray):
    import mindspore as ms

    from mindyouzhi.models.layers import to_tensor

    return to_tensor(ids, ms.int32), to_tensor(targets, ms.int32), to_tensor(weights)
