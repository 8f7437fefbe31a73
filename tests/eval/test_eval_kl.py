"""Token KL(teacher‖student) and top-1 agreement on bigram models with known distributions."""
import json
import math

import numpy as np
import pytest

from eval_fakes import BigramLM, PieceTokenizer, bigram_table
from mindyouzhi.errors import UserError
from mindyouzhi.eval.kl import default_bucket_edges, parse_bucket_edges, read_sequences, run_kl


def models():
    tokenizer = PieceTokenizer(["x", "y", "z"])
    teacher = BigramLM(tokenizer, bigram_table(tokenizer, {"x": {"y": 0.5}}))
    student = BigramLM(tokenizer, bigram_table(tokenizer, {"x": {"y": 0.1, "z": 0.3}}))
    return tokenizer, teacher, student


def kl_after_x(vocab):
    """KL on the row after "x": teacher y .5 and r_t elsewhere; student y .1, z .3 and r_s elsewhere."""
    r_t, r_s = 0.5 / (vocab - 1), 0.6 / (vocab - 2)
    return 0.5 * math.log(0.5 / 0.1) + r_t * math.log(r_t / 0.3) + (vocab - 2) * r_t * math.log(r_t / r_s)


def test_kl_and_agreement_are_exact_and_bucketed_by_position(tmp_path):
    tokenizer, teacher, student = models()
    data = tmp_path / "text.txt"
    data.write_text("xyyxyyxyx")  # 9 tokens: two windows of 4 as in eval ppl, the last token dropped
    result = run_kl(teacher, student, data, seq_len=4, buckets="2", show_progress=False)
    # Windows [x y y x] and [y y x y]: three rows follow an "x", the other five are identical.
    kl_x = kl_after_x(tokenizer.vocab_size)
    assert result["windows"] == 2 and result["tokens"] == 8
    assert result["kl_mean"] == pytest.approx(3 * kl_x / 8, rel=1e-5)
    assert result["top1_agreement"] == pytest.approx(5 / 8)
    first, second = result["buckets"]
    assert first == {"positions": "0-1", "tokens": 4, "kl_mean": pytest.approx(kl_x / 4, rel=1e-5), "top1_agreement": 0.75}
    assert second["positions"] == "2-3" and second["kl_mean"] == pytest.approx(kl_x / 2, rel=1e-5)
    assert second["top1_agreement"] == 0.5
    # Perplexity of the observed next tokens: y after x twice (0.5), four times after y (uniform).
    uniform = 1 / tokenizer.vocab_size
    teacher_nll = -(4 * math.log(uniform) + 2 * math.log(0.5)) / 6
    assert result["teacher_ppl"] == pytest.approx(math.exp(teacher_nll), rel=1e-5)
    student_nll = -(4 * math.log(uniform) + 2 * math.log(0.1)) / 6
    assert result["student_ppl"] == pytest.approx(math.exp(student_nll), rel=1e-5)


def test_identical_models_have_zero_kl_and_full_agreement(tmp_path):
    _, teacher, _ = models()
    data = tmp_path / "text.txt"
    data.write_text("xyzzyx" * 5)
    result = run_kl(teacher, teacher, data, seq_len=8, max_windows=2, show_progress=False)
    assert result["windows"] == 2
    assert result["kl_mean"] == pytest.approx(0.0, abs=1e-9) and result["top1_agreement"] == 1.0


def test_jsonl_gives_one_sequence_per_record(tmp_path):
    tokenizer, _, _ = models()
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "xyz"}) + "\n\n" + json.dumps({"text": "xyzxyzxyz"}) + "\n")
    assert read_sequences(data, tokenizer, seq_len=5) == [[2, 3, 4], [2, 3, 4, 2, 3]]
    data.write_text(json.dumps({"txt": "x"}) + "\n")
    with pytest.raises(UserError, match="line 1: expected an object with a non-empty 'text'"):
        read_sequences(data, tokenizer, seq_len=5)


def test_different_tokenizers_are_refused(tmp_path):
    _, teacher, _ = models()
    other_tokenizer = PieceTokenizer(["x", "y", "z", "extra"])
    other = BigramLM(other_tokenizer, bigram_table(other_tokenizer, {}))
    data = tmp_path / "text.txt"
    data.write_text("xyxyxyxy")
    with pytest.raises(UserError, match="tokenize differently"):
        run_kl(teacher, other, data, seq_len=4, show_progress=False)


def test_bucket_edges():
    assert default_bucket_edges(512) == [0, 16, 64, 256]
    assert parse_bucket_edges("64, 16", 128) == [0, 16, 64]
    with pytest.raises(UserError, match="--buckets"):
        parse_bucket_edges("16,abc", 128)
    with pytest.raises(UserError, match="between 1 and seq_len-1"):
        parse_bucket_edges("200", 128)


def test_kl_chunked_rows_match_a_direct_computation():
    from mindyouzhi.eval.kl import _token_kl

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(150, 40)), rng.normal(size=(150, 40))
    lp_a = a - np.logaddexp.reduce(a, axis=1, keepdims=True)
    lp_b = b - np.logaddexp.reduce(b, axis=1, keepdims=True)
    direct = (np.exp(lp_a) * (lp_a - lp_b)).sum(1)
    assert np.allclose(_token_kl(lp_a.astype(np.float32), lp_b.astype(np.float32)), direct, atol=1e-5)
