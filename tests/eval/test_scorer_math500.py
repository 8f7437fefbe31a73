"""MATH-500 answer equivalence (math-verify): the cases where the former hand-written checker
disagreed with the reference, and every reference solution of the real test set."""
import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from mindyouzhi.eval.tasks.math500 import answers_equal, last_boxed, score_math
from mindyouzhi.eval.tasks.base import GenerationItem

MIXED = "137 \\frac{1}{2}"  # MATH-500 #472 (test/algebra/2470.json); #264 is 1\frac{4}{5}


@pytest.mark.parametrize("predicted, gold, equal", [
    # A mixed number is a sum, not a product (the old checker read 137·½ = 68.5).
    ("275/2", MIXED, True), ("137.5", MIXED, True), ("\\frac{275}{2}", MIXED, True), ("68.5", MIXED, False),
    ("1.8", "1\\frac{4}{5}", True), ("\\frac95", "1\\frac{4}{5}", True), ("\\frac45", "1\\frac{4}{5}", False),
    # Thousands separators written with a braced comma.
    ("58500", "58{,}500", True), ("58,500", "58{,}500", True), ("58499", "58{,}500", False),
    # ± is the set of both values, whichever way the root is written or the values are listed.
    ("3\\pm2\\sqrt{2}", "3\\pm\\sqrt{8}", True), ("3\\pm\\sqrt{8}", "3\\pm2\\sqrt{2}", True),
    ("3+2\\sqrt{2}, 3-2\\sqrt{2}", "3\\pm\\sqrt{8}", True), ("3-2\\sqrt2,3+2\\sqrt2", "3\\pm2\\sqrt{2}", True),
    ("3+2\\sqrt{2}", "3\\pm\\sqrt{8}", False), ("3\\pm\\sqrt{2}", "3\\pm\\sqrt{8}", False),
    # Intervals: +∞ is ∞; the brackets still matter.
    ("(2,+\\infty)", "(2,\\infty)", True), ("(2,\\infty)", "(2,+\\infty)", True),
    ("[2,\\infty)", "(2,+\\infty)", False), ("(-\\infty,2)", "(2,\\infty)", False),
])
def test_reference_equivalence_cases(predicted, gold, equal):
    assert answers_equal(predicted, gold) is equal


def test_scoring_outside_the_main_thread():
    """math-verify's timer is SIGALRM, which only the main thread may set: elsewhere it must still judge."""
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(answers_equal, "137.5", MIXED).result() is True
        assert pool.submit(answers_equal, "68.5", MIXED).result() is False


def test_score_uses_the_last_box_only():
    item = GenerationItem("test/algebra/2470.json", "Algebra", "...", MIXED, stop=())
    row = score_math("Maybe \\boxed{68.5}? No: the mean is \\boxed{137.5}.", item)
    assert row == {"gold": MIXED, "extracted": "137.5", "correct": True}
    assert score_math("The mean is 137.5.", item)["correct"] is False  # no box, no answer
    assert last_boxed("\\boxed{3\\pm\\sqrt{8}}") == "3\\pm\\sqrt{8}"


def _bare(answer: str) -> str:
    return re.sub(r"^[a-z]\s*=\s*", "", answer.replace(" ", ""))


@pytest.mark.shared
def test_every_reference_solution_is_accepted_and_shifted_answers_rejected(shared_dir):
    """All 500 prm800k solutions' last box against their answer; each answer against the next
    problem's answer (pairs with the same written answer, e.g. "7" and "7", left out)."""
    path = shared_dir / "data" / "eval" / "math500" / "test.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) == 500
    rejected = [row["unique_id"] for row in rows if not answers_equal(last_boxed(row["solution"]), row["answer"])]
    assert rejected == []
    pairs = [(row["answer"], rows[(index + 1) % len(rows)]["answer"]) for index, row in enumerate(rows)]
    pairs = [(gold, other) for gold, other in pairs if _bare(gold) != _bare(other)]
    assert len(pairs) >= 495
    accepted = [(gold, other) for gold, other in pairs if answers_equal(other, gold)]
    assert accepted == []
