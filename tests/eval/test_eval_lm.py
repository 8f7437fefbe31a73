"""Continuation scoring: exact log-likelihoods, token boundaries, BOS, truncation, batching, sharing."""
import math

import numpy as np
import pytest

from eval_fakes import BigramLM, PieceTokenizer, PrefixHashLM, ScriptedLM, bigram_table
from mindyouzhi.errors import UserError
from mindyouzhi.eval.lm import ContinuationScorer, bucketed_length, common_prefix_length, cut_at_stop, generate_text

PIECES = ["Answer", ":", " A", " B", " A B", "x", "y", "z"]


def _bigram(with_bos=True, max_seq_len=4096):
    tokenizer = PieceTokenizer(PIECES, with_bos=with_bos)
    table = bigram_table(tokenizer, {
        "<bos>": {"Answer": 0.5},
        "Answer": {":": 0.8},
        ":": {" A": 0.6, " B": 0.3},
        " A": {" B": 0.25},
        "<eos>": {"x": 0.5},
        "x": {"y": 0.9},
        "y": {"z": 0.7},
    })
    return tokenizer, BigramLM(tokenizer, table, max_seq_len)


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([], [1]) == 0


def test_loglikelihood_is_the_sum_of_known_bigram_logprobs():
    _, lm = _bigram()
    scorer = ContinuationScorer(lm)
    (single, double) = scorer.score([("Answer:", " A"), ("Answer:", " A B")])
    assert single.logprob == pytest.approx(math.log(0.6), abs=1e-6)
    assert single.is_greedy and single.num_tokens == 1
    # " A B" is one piece, so it is one token; its probability after ":" is the uniform remainder.
    assert double.num_tokens == 1
    assert not double.is_greedy


def test_continuation_tokens_are_the_differing_suffix_of_the_whole_encoding():
    tokenizer, lm = _bigram()
    # The context's trailing space merges with the letter: "Answer: " encodes with a byte token
    # for the space, "Answer: A" with the piece " A"; the continuation is [" A"] after ":".
    assert tokenizer.encode("Answer: ")[-1] != tokenizer.id(" A")
    request = ContinuationScorer(lm).encode("Answer: ", "A")
    assert request.targets == (tokenizer.id(" A"),)
    assert request.inputs == (tokenizer.bos_token_id, tokenizer.id("Answer"), tokenizer.id(":"))
    (score,) = ContinuationScorer(lm).score([("Answer: ", "A")])
    assert score.logprob == pytest.approx(math.log(0.6), abs=1e-6)


def test_bos_is_prepended_only_when_the_tokenizer_has_one():
    tokenizer, lm = _bigram(with_bos=True)
    (score,) = ContinuationScorer(lm).score([("", "Answer")])
    assert score.logprob == pytest.approx(math.log(0.5), abs=1e-6)  # p(Answer | <bos>)
    tokenizer, lm = _bigram(with_bos=False)
    # Without BOS an empty context conditions on EOS (p(x | <eos>) = 0.5).
    (score,) = ContinuationScorer(lm).score([("", "x")])
    assert score.logprob == pytest.approx(math.log(0.5), abs=1e-6)
    request = ContinuationScorer(lm).encode("x", "y")
    assert request.inputs == (tokenizer.id("x"),)


def test_multi_token_continuation_and_greedy_flag():
    _, lm = _bigram()
    (score,) = ContinuationScorer(lm).score([("x", "yz")])
    assert score.num_tokens == 2
    assert score.logprob == pytest.approx(math.log(0.9) + math.log(0.7), abs=1e-6)
    assert score.is_greedy


def test_left_truncation_keeps_the_last_max_seq_len_tokens():
    tokenizer = PieceTokenizer(PIECES)
    long_context = "xyz" * 20
    full = PrefixHashLM(tokenizer, max_seq_len=4096)
    short = PrefixHashLM(tokenizer, max_seq_len=8)
    scorer = ContinuationScorer(short)
    (truncated,) = scorer.score([(long_context, "xy")])
    assert scorer.stats.truncated_requests == 1
    fed = short.calls[0][0]
    assert len(fed) == 8
    # The fed window is exactly the last 8 tokens of BOS + context + continuation[:-1].
    whole = [tokenizer.bos_token_id] + tokenizer.encode(long_context + "xy")
    assert fed == whole[:-1][-8:]
    rows = full.row_logprobs(fed)  # the same rows a model seeing only that window produces
    expected = rows[-2, tokenizer.id("x")] + rows[-1, tokenizer.id("y")]
    assert truncated.logprob == pytest.approx(float(expected), abs=1e-4)


def test_continuation_longer_than_the_model_window_is_a_user_error():
    tokenizer = PieceTokenizer(PIECES)
    with pytest.raises(UserError, match="exceeds the model's max_seq_len 4"):
        ContinuationScorer(PrefixHashLM(tokenizer, max_seq_len=4)).score([("x", "yzyzyz")])


def test_batching_and_padding_give_identical_scores():
    tokenizer = PieceTokenizer(PIECES)
    requests = [(f"{'xy' * n}Answer:", choice) for n in range(7) for choice in (" A", " B", " A B", "zz")]
    reference = ContinuationScorer(PrefixHashLM(tokenizer), batch_size=1).score(requests)
    for batch_size, pad in ((3, 1), (100, 1), (4, 16)):
        scores = ContinuationScorer(PrefixHashLM(tokenizer), batch_size=batch_size, pad_multiple=pad).score(requests)
        assert [s.logprob for s in scores] == pytest.approx([s.logprob for s in reference], abs=1e-5)
        assert [s.is_greedy for s in scores] == [s.is_greedy for s in reference]


def test_choices_sharing_a_context_share_one_forward():
    tokenizer = PieceTokenizer(PIECES)
    lm = PrefixHashLM(tokenizer)
    scorer = ContinuationScorer(lm, batch_size=8)
    # Three one-token answers feed the same input; "zz" feeds context + "z", a longer sequence
    # whose prefix is that same input: one forward serves all four.
    scorer.score([("Answer:", " A"), ("Answer:", " B"), ("Answer:", "x"), ("Answer:", "zz")])
    assert scorer.stats.forward_sequences == 1
    assert len(lm.calls) == 1 and len(lm.calls[0]) == 1


def test_shapes_are_bucketed_so_a_jitted_model_compiles_few_graphs():
    assert [bucketed_length(n, 64) for n in (1, 64, 65, 300, 700, 1500, 2100)] == [64, 64, 128, 384, 768, 1536, 3072]
    assert all(n <= bucketed_length(n, 8) <= max(1.5 * n, n + 7) for n in range(1, 5000))
    assert sorted({bucketed_length(n, 64) for n in range(1, 4097)}) == [64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096]
    tokenizer = PieceTokenizer(PIECES)
    lm = PrefixHashLM(tokenizer)
    requests = [("xy" * n, "z") for n in range(1, 40)]
    ContinuationScorer(lm, batch_size=4, pad_multiple=16).score(requests)
    # 39 requests of 3..79 ids, in 10 batches: the short last batch is filled with dummy rows and
    # every length is rounded up to 16, 32, 48, 64 or 96, so the model sees 5 shapes instead of 10.
    shapes = {(len(batch), max(len(seq) for seq in batch)) for batch in lm.calls}
    assert len(lm.calls) == 10
    assert shapes == {(4, 16), (4, 32), (4, 48), (4, 64), (4, 96)}


def test_token_budget_limits_rows_per_forward():
    tokenizer = PieceTokenizer(PIECES)
    lm = PrefixHashLM(tokenizer)
    requests = [("xy" * 30, "z"), ("xy" * 29, "z"), ("x", "y"), ("y", "x"), ("z", "x")]
    scores = ContinuationScorer(lm, batch_size=8, max_batch_tokens=100).score(requests)
    # 61- and 59-token inputs: one per call under a 100-token budget; the three 2-token ones together.
    assert [len(batch) for batch in lm.calls] == [1, 1, 3]
    reference = ContinuationScorer(PrefixHashLM(tokenizer)).score(requests)
    assert [s.logprob for s in scores] == pytest.approx([s.logprob for s in reference])


def test_bos_follows_the_tokenizers_add_bos_token():
    tokenizer = PieceTokenizer(PIECES)
    tokenizer.add_bos_token = False  # e.g. GPT-2 style tokenizers: the model never saw a BOS
    request = ContinuationScorer(PrefixHashLM(tokenizer)).encode("x", "y")
    assert request.inputs == (tokenizer.id("x"),)


def test_padding_stays_within_max_seq_len():
    tokenizer = PieceTokenizer(PIECES)
    lm = PrefixHashLM(tokenizer, max_seq_len=10)
    ContinuationScorer(lm, pad_multiple=64).score([("xyz", "x")])
    assert len(lm.calls[0][0]) == 10


def test_generate_text_cuts_at_eos_and_stop_strings_and_truncates_the_prompt():
    tokenizer = PieceTokenizer(PIECES)
    lm = ScriptedLM(tokenizer, lambda prompt: "B\n\nmore text", max_seq_len=16)
    generation = generate_text(lm, "x" * 40, max_new_tokens=6, stop_strings=("\n\n",))
    assert generation.text == "B"
    assert generation.prompt_tokens == 10  # 16 - 6 new tokens
    assert lm.prompts[0] == "x" * 10
    assert cut_at_stop("a;b.c", [";", "."]) == "a"
    with pytest.raises(UserError, match="max-new-tokens"):
        generate_text(lm, "x", max_new_tokens=16)


def test_bigram_fake_is_normalised():
    _, lm = _bigram()
    rows = lm.logprobs([[0, 2, 3]])[0]
    assert np.allclose(np.exp(rows).sum(-1), 1.0, atol=1e-5)
