"""ModelRunner: a loaded model plus its tokenizer, with fast forwards for evaluation.

The forward runs layer by layer through ``functional.gqa_layer`` / ``mla_layer`` (each under
``ms.jit``, weights passed as arguments), then a jitted head.  One compiled graph per layer shape
serves every layer, and intermediates of one layer are freed before the next runs: a whole-model
graph on CPU compiles slowly and keeps every layer's attention scores alive (tens of GB at 2k
context), while this path is both faster and bounded in memory.

``precision="bf16"`` (``--forward-precision``, resolved by ``transition.calibration.
resolve_forward_precision``) runs every projection and the LM head through the bf16 kernels of
``mindyouzhi.ops.bf16`` (bf16 inputs, float32 accumulation; matrices rounded once at load) and
the attention core through its fused causal kernel; norms, softmaxes, log-softmax and NLL stay
float32.  ``fp32`` (the default of the API) is plain MindSpore ops throughout.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import mindspore as ms
from mindspore import ops

from mindyouzhi.convert_weights.safetensors_io import SafetensorsStore

from . import functional as F
from .config import ModelConfig
from .decoder import LAYER_PRECISIONS, RopeTables, layer_function, read_global_weights, read_layer_weights
from .layers import causal_mask, to_tensor

_DEVICE_SET = False


def ensure_device() -> None:
    """Select the CPU backend once (Ascend users set the device before importing us)."""
    global _DEVICE_SET
    if not _DEVICE_SET:
        try:
            if ms.get_context("device_target") != "Ascend":
                ms.set_device("CPU")
        except RuntimeError:
            pass
        _DEVICE_SET = True


@ms.jit
def _embed(table, ids):
    return ops.gather(table, ids, 0)


def _norm_dense(hidden, norm, head, eps):
    return ops.dense(F.rms_norm(hidden, norm, eps), head)


def _head_graph_functions(norm_dense):
    """The jitted vocabulary-wide heads with ``norm_dense`` for the final norm and the LM head
    product (the softmaxes and the NLL stay float32)."""

    def logits(hidden, norm, head, eps):
        return norm_dense(hidden, norm, head, eps)

    def nll(hidden, targets, norm, head, eps):
        """hidden [N, D], targets [N] → NLL [N]."""
        out = logits(hidden, norm, head, eps)
        picked = ops.gather_elements(out, 1, targets.expand_dims(-1)).squeeze(-1)
        return ops.logsumexp(out, -1) - picked

    def kl(hidden, reference, norm, head, eps):
        """KL(reference ‖ hidden) per row for hidden/reference [N, D] through the same head."""
        log_q = ops.log_softmax(logits(hidden, norm, head, eps), -1)
        log_p = ops.log_softmax(logits(reference, norm, head, eps), -1)
        return ops.sum(ops.exp(log_p) * (log_p - log_q), -1)

    def logprobs(hidden, norm, head, eps):
        return ops.log_softmax(logits(hidden, norm, head, eps), -1)

    return HeadFunctions(*(ms.jit(fn) for fn in (logits, nll, kl, logprobs)))


class HeadFunctions(NamedTuple):
    logits: Callable
    nll: Callable
    kl: Callable
    logprobs: Callable


@functools.lru_cache(maxsize=None)
def head_functions(precision: str) -> HeadFunctions:
    """The heads of ``precision`` (``decoder.LAYER_PRECISIONS``): fp32 ops, or the bf16 kernel that
    norms in float32 and multiplies bf16 operands with float32 accumulation (one call) on a head
    matrix packed once by ``bf16_bits``."""
    if precision == "fp32":
        return _head_graph_functions(_norm_dense)
    if precision == "bf16":
        from mindyouzhi.ops.bf16 import graph_norm_dense

        return _head_graph_functions(graph_norm_dense())
    raise ValueError(f"head precision {precision!r}: expected one of {LAYER_PRECISIONS}")


# Rows per head call.  A compiled MindSpore graph keeps its intermediates' memory for as long as
# the process lives, and a vocabulary-wide head holds ~7 [rows, vocab] float32 buffers: measured
# on SmolLM2 (49k vocabulary), +1.4 GB for 1024 rows, +185 MB for 128 rows, at the same speed.
# Every call is padded to exactly HEAD_ROWS rows so that one graph serves every length.
HEAD_ROWS = 128


def head_rows(fn, hidden, other, norm, head, eps) -> np.ndarray:
    """Apply a per-token head function over [B, T, D] in fixed chunks of ``HEAD_ROWS`` tokens.

    ``other`` is the per-token second input ([B, T] targets or [B, T, D] reference states).
    """
    rows = hidden.reshape(-1, hidden.shape[-1])
    other = other.reshape((-1,) + tuple(other.shape[2:]))
    return _in_head_chunks(lambda r, o: fn(r, o, norm, head, eps), rows, other).reshape(hidden.shape[:2])


def _in_head_chunks(fn, *per_row) -> np.ndarray:
    """``fn`` over row-aligned inputs (tensors or arrays, first axis = rows) in chunks of exactly
    ``HEAD_ROWS`` rows — the last one zero-padded, its padding rows dropped — concatenated."""
    count = per_row[0].shape[0]
    padded = [_padded_rows(x) for x in per_row]
    out = [fn(*(x[start:start + HEAD_ROWS] for x in padded)).asnumpy() for start in range(0, count, HEAD_ROWS)]
    return np.concatenate(out)[:count]


def _padded_rows(rows):
    if isinstance(rows, np.ndarray):
        rows = to_tensor(rows)
    missing = -rows.shape[0] % HEAD_ROWS
    if not missing:
        return rows
    return ops.concat([rows, ops.zeros((missing,) + tuple(rows.shape[1:]), rows.dtype)])


def is_projection(name: str) -> bool:
    """A matrix the bf16 path multiplies with (the names ``decoder.layer_function`` packs)."""
    return name.endswith(("_proj.weight", "_mqa.weight"))


def _packed(array: np.ndarray):
    from mindyouzhi.ops.bf16 import bf16_bits

    return ms.Tensor(bf16_bits(array))


class ModelRunner:
    """Inference over plain weight tensors (no Cells: training builds ``decoder.CausalLM``)."""

    def __init__(self, config: ModelConfig, source, tokenizer=None, model_dir: Optional[Path] = None,
                 where: str = "weights", precision: str = "fp32"):
        if precision not in LAYER_PRECISIONS:
            raise ValueError(f"forward precision {precision!r}: expected one of {LAYER_PRECISIONS}")
        ensure_device()
        self.config = config
        self.tokenizer = tokenizer
        self.model_dir = model_dir
        self.precision = precision
        self.rope = RopeTables(config)
        self.max_seq_len = config.max_position_embeddings
        glob = read_global_weights(source, config, where)
        self.layer_weights = []
        # bf16: the projection matrices as bf16 bit patterns, rounded once here (the kernel's own
        # rounding); the float32 tensors stay the reference for everything that is not a product.
        self.packed_weights: list[dict] = []
        for i in range(config.num_hidden_layers):
            weights = read_layer_weights(source, config, i, where)
            self.layer_weights.append({k: to_tensor(v) for k, v in weights.items()})
            self.packed_weights.append({k: _packed(v) for k, v in weights.items()
                                        if precision == "bf16" and is_projection(k)})
        self._layers = [layer_function(config, i, {**w, **p}, precision)
                        for i, (w, p) in enumerate(zip(self.layer_weights, self.packed_weights))]
        self._embed_table = to_tensor(glob["model.embed_tokens.weight"])
        self._norm = to_tensor(glob["model.norm.weight"])
        head = glob["model.embed_tokens.weight"] if config.tie_word_embeddings else glob["lm_head.weight"]
        self._head = self._embed_table if config.tie_word_embeddings else to_tensor(head)
        self._head_product = _packed(head) if precision == "bf16" else self._head
        self._heads = head_functions(precision)
        self._eps = float(config.rms_norm_eps)
        self._tables: dict[int, tuple] = {}

    @classmethod
    def from_dir(cls, model_dir, with_tokenizer: bool = True, precision: str = "fp32") -> "ModelRunner":
        ensure_device()
        model_dir = Path(model_dir)
        config = ModelConfig.from_dir(model_dir)
        tokenizer = None
        if with_tokenizer:
            from mindyouzhi.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(model_dir)
        return cls(config, SafetensorsStore(model_dir), tokenizer, model_dir, where=str(model_dir), precision=precision)

    @classmethod
    def from_weights(cls, config: ModelConfig, weights, tokenizer=None, precision: str = "fp32") -> "ModelRunner":
        return cls(config, weights, tokenizer, precision=precision)

    def head_weights(self) -> tuple:
        """(embedding table, final norm, head matrix as the head functions take it, eps tensor [1]):
        what a caller's own graph needs to embed and to apply ``head_functions(self.precision)``."""
        if not hasattr(self, "_eps_tensor"):
            self._eps_tensor = ms.Tensor(np.asarray([self._eps], np.float32))
        return self._embed_table, self._norm, self._head_product, self._eps_tensor

    def embed(self, ids):
        return _embed(self._embed_table, ids)

    def head_logits(self, hidden):
        return self._heads.logits(hidden, self._norm, self._head_product, self._eps)

    def _inputs(self, length: int):
        if length not in self._tables:
            cos, sin, mcos, msin = self.rope(length)
            self._tables = {length: tuple(to_tensor(t) for t in (cos, sin, mcos, msin, causal_mask(length)))}
        return self._tables[length]

    def hidden(self, input_ids: np.ndarray):
        """Final hidden states (before the last norm) as a MindSpore tensor [B, T, D]."""
        ids = to_tensor(np.asarray(input_ids, dtype=np.int32), ms.int32)
        tables = self._inputs(ids.shape[1])
        x = _embed(self._embed_table, ids)
        for layer in self._layers:
            x = layer(x, *tables)
        return x

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        return self.head_logits(self.hidden(input_ids)).asnumpy()

    def token_nll(self, input_ids: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Per-position NLL of ``targets`` [B, T] after ``input_ids`` [B, T] (float32)."""
        targets = to_tensor(np.asarray(targets, np.int32), ms.int32)
        return head_rows(self._heads.nll, self.hidden(input_ids), targets, self._norm, self._head_product, self._eps)

    def logprobs(self, batch: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Per sequence, [n, vocab] log-softmax of the next-token distribution after ids[:t+1]."""
        if not batch:
            return []
        length = max(len(seq) for seq in batch)
        padded = np.zeros((len(batch), length), dtype=np.int32)
        for row, seq in enumerate(batch):
            padded[row, : len(seq)] = seq  # right padding: causal attention never sees it
        out = self._heads.logprobs(self.hidden(padded), self._norm, self._head_product, self._eps).asnumpy()
        return [out[row, : len(seq)] for row, seq in enumerate(batch)]

    def logprobs_rows(self, batch: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Per sequence, only rows ``start:stop`` of ``logprobs`` (e.g. a continuation's rows).

        The hidden states of the whole batch are small ([B, T, D]); the vocabulary-wide part is what
        costs memory and compilation.  Here it runs on just the wanted rows, in fixed chunks of
        ``HEAD_ROWS`` (the last one zero-padded) so one compiled head graph serves every request
        length — instead of a [B, T, V] graph per prompt shape (gigabytes at 3k tokens).
        """
        if not batch:
            return []
        if len(spans) != len(batch):
            raise ValueError(f"{len(spans)} spans for {len(batch)} sequences")
        for seq, (start, stop) in zip(batch, spans):
            if not 0 <= start < stop <= len(seq):
                raise ValueError(f"span {start}:{stop} outside a sequence of {len(seq)} ids")
        length = max(len(seq) for seq in batch)
        padded = np.zeros((len(batch), length), dtype=np.int32)
        for row, seq in enumerate(batch):
            padded[row, : len(seq)] = seq
        hidden = self.hidden(padded).asnumpy()
        rows = np.concatenate([hidden[row, start:stop] for row, (start, stop) in enumerate(spans)])
        out = _in_head_chunks(lambda r: self._heads.logprobs(r, self._norm, self._head_product, self._eps), rows)
        bounds = np.cumsum([0] + [stop - start for start, stop in spans])
        return [out[bounds[i]:bounds[i + 1]] for i in range(len(spans))]

    def greedy_generate(self, prompt_ids: Sequence[int], max_new_tokens: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
        """New token ids (the stop token included when one ends it), through the paged engine with
        one sequence: its compiled layer steps (in this runner's precision) instead of the
        contiguous-cache reference of ``generation.generate``, whose PyNative operators cost more
        than the arithmetic; the engine is tested to produce that reference's tokens."""
        from mindyouzhi.serve.engine import Engine, EngineOptions
        from mindyouzhi.serve.sampling import SamplingParams

        prompt = list(prompt_ids)
        blocks = -(-(len(prompt) + max_new_tokens) // EngineOptions.block_size) + 1
        engine = Engine(self, EngineOptions(max_batch=1, num_blocks=blocks))
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=tuple(stop_ids))
        return engine.generate([prompt], params)[0].output_ids


def streamed_window_nll(config: ModelConfig, source, window_ids: np.ndarray, batch_size: int = 1,
                        precision: str = "fp32", where: str = "weights",
                        progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """Per-window total NLL of ``window_ids`` [N, T] with one layer's weights in memory at a time.

    Every window goes through layer l before layer l+1 is read (the conversion's streaming order):
    what stays resident is the hidden states of all windows ([N, T−1, D] float32), the embedding,
    the final norm and the head, and one layer — so a model larger than the machine's RAM is
    scored as exactly as ``ModelRunner.token_nll`` scores it (the same layer functions and head)."""
    ensure_device()
    inputs, targets = window_ids[:, :-1], window_ids[:, 1:]
    length = inputs.shape[1]
    cos, sin, mcos, msin = RopeTables(config)(length)
    tables = tuple(to_tensor(t) for t in (cos, sin, mcos, msin, causal_mask(length)))
    glob = read_global_weights(source, config, where)
    embed_table = to_tensor(glob.pop("model.embed_tokens.weight") if not config.tie_word_embeddings
                            else glob["model.embed_tokens.weight"])
    starts = range(0, len(inputs), batch_size)
    hidden = [_embed(embed_table, to_tensor(inputs[b:b + batch_size].astype(np.int32), ms.int32)).asnumpy()
              for b in starts]
    del embed_table
    for layer in range(config.num_hidden_layers):
        weights = read_layer_weights(source, config, layer, where)
        packed = {k: _packed(v) for k, v in weights.items() if precision == "bf16" and is_projection(k)}
        function = layer_function(config, layer, {**{k: to_tensor(v) for k, v in weights.items()}, **packed}, precision)
        hidden = [function(to_tensor(h), *tables).asnumpy() for h in hidden]
        del weights, packed, function
        if progress:
            progress(layer + 1)
    head = glob["model.embed_tokens.weight"] if config.tie_word_embeddings else glob["lm_head.weight"]
    head_product = _packed(head) if precision == "bf16" else to_tensor(head)
    norm, eps = to_tensor(glob["model.norm.weight"]), float(config.rms_norm_eps)
    heads = head_functions(precision)
    out = []
    for start, states in zip(starts, hidden):
        rows = to_tensor(targets[start:start + batch_size].astype(np.int32), ms.int32)
        out.append(head_rows(heads.nll, to_tensor(states), rows, norm, head_product, eps).astype(np.float64).sum(axis=1))
    return np.concatenate(out)
