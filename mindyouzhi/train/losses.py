"""Training losses as MindSpore functions of logits (used inside the jitted train step).

Every loss returns a *per-token* value [B, T]; the trainer multiplies by the loss weights (1 on
loss tokens divided by the number of loss tokens of the whole global batch, 0 elsewhere) and sums,
so the gradient of one micro-batch on one rank is exactly its share of the global mean and
micro-batches / data-parallel ranks combine by plain summation.

``generalized_jsd`` follows the GKD paper (Agarwal et al., 2024) and TRL's ``GKDTrainer``:
``beta = 0`` is the forward KL(teacher ‖ student) (the YouZhi recipe), ``beta = 1`` the reverse
KL(student ‖ teacher), and in between the generalized Jensen–Shannon divergence
``β·KL(T ‖ M) + (1−β)·KL(S ‖ M)`` with the mixture ``M = β·T + (1−β)·S``.  Both distributions are
``softmax(logits / temperature)``.
"""
from __future__ import annotations

import math

import numpy as np
from mindspore import ops


def token_cross_entropy(logits, targets):
    """−log p(target) per position: logits [B, T, V], targets [B, T] int32 → [B, T]."""
    picked = ops.gather_elements(logits, 2, targets.expand_dims(-1)).squeeze(-1)
    return ops.logsumexp(logits, -1) - picked


def tempered_log_softmax(logits, temperature: float):
    if temperature != 1.0:
        logits = logits * (1.0 / temperature)
    return ops.log_softmax(logits, -1)


def generalized_jsd(student_logits, teacher_logprobs, beta: float, temperature: float):
    """Per-token divergence [B, T] between the teacher (given as log-probs at ``temperature``) and
    the student (given as logits).  ``beta`` and ``temperature`` are Python floats (graph constants)."""
    student = tempered_log_softmax(student_logits, temperature)
    teacher = teacher_logprobs
    if beta == 0.0:
        return (ops.exp(teacher) * (teacher - student)).sum(-1)
    if beta == 1.0:
        return (ops.exp(student) * (student - teacher)).sum(-1)
    mixture = ops.logsumexp(ops.stack([student + math.log(1.0 - beta), teacher + math.log(beta)]), 0)
    kl_teacher = (ops.exp(teacher) * (teacher - mixture)).sum(-1)
    kl_student = (ops.exp(student) * (student - mixture)).sum(-1)
    return beta * kl_teacher + (1.0 - beta) * kl_student


# -- numpy references (float64) for tests and reports --------------------------------------------
def _np_log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    scaled = np.asarray(logits, np.float64) / temperature
    scaled = scaled - scaled.max(-1, keepdims=True)
    return scaled - np.log(np.exp(scaled).sum(-1, keepdims=True))


def generalized_jsd_numpy(student_logits: np.ndarray, teacher_logits: np.ndarray, mask: np.ndarray,
                          beta: float = 0.0, temperature: float = 1.0) -> float:
    """The masked mean divergence over loss tokens, straight from the definition."""
    s = _np_log_softmax(student_logits, temperature)
    t = _np_log_softmax(teacher_logits, temperature)
    ps, pt = np.exp(s), np.exp(t)
    if beta == 0.0:
        per_token = (pt * (t - s)).sum(-1)
    elif beta == 1.0:
        per_token = (ps * (s - t)).sum(-1)
    else:
        m = np.log(beta * pt + (1.0 - beta) * ps)
        per_token = beta * (pt * (t - m)).sum(-1) + (1.0 - beta) * (ps * (s - m)).sum(-1)
    mask = np.asarray(mask, np.float64)
    return float((per_token * mask).sum() / mask.sum())
