"""``ModelRunner.logprobs_rows``: the continuation-rows path the evaluation harness scores through.

It must give exactly the rows of the full ``logprobs`` (chunked head, zero padding of the last
chunk, right padding of short sequences), and the scorer must give the same scores through it
as through full ``logprobs``.
"""
import numpy as np
import pytest

from hf_fixtures import WORDS, add_word_tokenizer, build_hf_model
from mindyouzhi.eval.lm import ContinuationScorer
from mindyouzhi.models import runner as runner_module
from mindyouzhi.models.runner import ModelRunner


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = add_word_tokenizer(build_hf_model("llama", tmp_path_factory.mktemp("rows") / "m"))
    return ModelRunner.from_dir(model)


def test_rows_equal_full_logprobs(tiny, monkeypatch):
    monkeypatch.setattr(runner_module, "HEAD_ROWS", 8)  # several chunks and a padded last one
    rng = np.random.default_rng(0)
    batch = [list(rng.integers(4, 120, size=n)) for n in (23, 9, 17)]
    spans = [(3, 23), (0, 9), (16, 17)]
    full = tiny.logprobs(batch)
    rows = tiny.logprobs_rows(batch, spans)
    for (start, stop), whole, part in zip(spans, full, rows):
        assert part.shape == (stop - start, whole.shape[1])
        np.testing.assert_allclose(part, whole[start:stop], atol=2e-6, rtol=0)
    with pytest.raises(ValueError, match="outside"):
        tiny.logprobs_rows(batch[:1], [(5, 30)])


class _FullOnly:
    """The same model without ``logprobs_rows``: the scorer slices full ``logprobs``."""

    def __init__(self, runner):
        self.tokenizer, self.max_seq_len, self.logprobs = runner.tokenizer, runner.max_seq_len, runner.logprobs


def test_scorer_same_scores_through_rows(tiny):
    w = WORDS  # words the tokenizer knows (anything else is <unk>)
    requests = [(" ".join(w[0:4]), " " + " ".join(w[4:6])), (" ".join(w[0:4]), " " + w[7]),
                (" ".join(w[10:12]), " " + " ".join(w[12:15])), (" ".join(w[20:28]), " " + w[30])]
    through_rows = ContinuationScorer(tiny, batch_size=2, pad_multiple=8).score(requests)
    through_full = ContinuationScorer(_FullOnly(tiny), batch_size=2, pad_multiple=8).score(requests)
    for a, b in zip(through_rows, through_full):
        assert a.num_tokens == b.num_tokens and a.is_greedy == b.is_greedy
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
    assert len({round(s.logprob, 3) for s in through_rows}) == len(requests)  # distinct: not a constant
