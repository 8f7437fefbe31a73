"""Generalized knowledge distillation (GKD): the frozen teacher and on-policy sampling.

The teacher (the original GQA model) runs through ``ModelRunner`` — the inference path, layer by
layer under ``ms.jit`` — on exactly the student's micro-batch and yields log-probabilities at the
loss temperature, ``log_softmax(teacher_logits / T)`` [B, T, V], which go into the student's
jitted step (``losses.generalized_jsd``).

Knobs, named as in TRL's ``GKDTrainer`` / the GKD paper:

* ``lmbda`` — the on-policy fraction: each optimizer step is, with probability ``lmbda`` (drawn
  from ``default_rng([seed, step])``, so a resumed run draws the same), an on-policy step whose
  responses are sampled from the *current* student (``models.generation.generate``) given the
  prompt of each example, the loss covering the sampled tokens; otherwise the data's own responses
  (off-policy, the YouZhi recipe: ``lmbda = 0``);
* ``beta`` — 0 = forward KL(teacher ‖ student), 1 = reverse KL, in between the generalized JSD;
* ``temperature`` — of both distributions in the loss; ``generation_temperature`` and ``top_p``
  for on-policy sampling; ``max_new_tokens`` caps the sampled response.

The teacher and the student must share the vocabulary (same ids for the same text): a mismatch is
refused before training starts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import mindspore as ms
from mindspore import ops

from mindyouzhi.errors import UserError

from .sft import Example

_VOCAB_PROBE = "The quick brown fox, 1234567890 — 你好，世界! <|im_start|>\n\t"


@ms.jit
def _tempered_logprobs(logits, inverse_temperature):
    return ops.log_softmax(logits * inverse_temperature, -1)


class Teacher:
    def __init__(self, model_dir: Path, temperature: float, precision: str = "fp32"):
        """``precision``: the inference path's projections (``ModelRunner``), the student step's."""
        from mindyouzhi.models.runner import ModelRunner

        self.runner = ModelRunner.from_dir(model_dir, precision=precision)
        self.inverse_temperature = ms.Tensor(1.0 / float(temperature), ms.float32)

    @property
    def config(self):
        return self.runner.config

    @property
    def tokenizer(self):
        return self.runner.tokenizer

    def logprobs(self, ids: np.ndarray):
        """[B, T, V] MindSpore tensor of tempered teacher log-probs (stays on the device)."""
        logits = self.runner.head_logits(self.runner.hidden(ids))
        return _tempered_logprobs(logits, self.inverse_temperature)


def check_same_vocabulary(teacher_dir: Path, teacher_config, teacher_tokenizer, student_dir: Path, student_config,
                          student_tokenizer) -> None:
    """Refuse a teacher/student pair whose token ids do not mean the same thing."""
    problems = []
    if teacher_config.vocab_size != student_config.vocab_size:
        problems.append(f"vocab_size {teacher_config.vocab_size} vs {student_config.vocab_size}")
    if teacher_tokenizer.vocab_size != student_tokenizer.vocab_size:
        problems.append(f"tokenizer size {teacher_tokenizer.vocab_size} vs {student_tokenizer.vocab_size}")
    elif teacher_tokenizer.encode(_VOCAB_PROBE) != student_tokenizer.encode(_VOCAB_PROBE):
        problems.append("the tokenizers split the same text into different ids")
    if teacher_tokenizer.eos_token_id != student_tokenizer.eos_token_id:
        problems.append(f"eos_token_id {teacher_tokenizer.eos_token_id} vs {student_tokenizer.eos_token_id}")
    if problems:
        raise UserError(f"model.teacher {teacher_dir} and model.student {student_dir} do not share a vocabulary "
                        f"({'; '.join(problems)}): distillation compares next-token distributions id by id")


def is_on_policy_step(lmbda: float, seed: int, step: int) -> bool:
    if lmbda <= 0:
        return False
    return bool(np.random.default_rng([seed, step, 7]).random() < lmbda)


def student_runner(net, config, tokenizer):
    """An inference runner over the student's current weights (for sampling)."""
    from mindyouzhi.models.runner import ModelRunner

    weights = {name: param.asnumpy() for name, param in net.parameters_and_names()}
    return ModelRunner.from_weights(config, weights, tokenizer)


def on_policy_examples(runner, examples: Sequence[Example], seq_length: int, options: dict, seed: int, step: int,
                       stop_ids: tuple[int, ...]) -> list[Example]:
    """Replace each example's response by the student's own sample for the same prompt."""
    from mindyouzhi.models.generation import generate

    out = []
    for row, example in enumerate(examples):
        prompt = example.ids[: max(1, example.prompt_length)]
        room = min(int(options["max_new_tokens"]), seq_length - len(prompt))
        if room < 1:
            out.append(example)  # no room to sample after this prompt: keep the off-policy example
            continue
        produced = generate(runner, prompt.tolist(), room, stop_ids=stop_ids,
                            temperature=float(options["generation_temperature"]), top_p=float(options["top_p"]),
                            seed=int(np.random.default_rng([seed, step, row]).integers(2**31)))
        ids = np.concatenate([prompt, np.asarray(produced, np.int32)]).astype(np.int32)
        loss = np.zeros(len(ids), bool)
        loss[len(prompt):] = True
        out.append(Example(ids, loss, len(prompt), example.source))
    return out
