"""Evaluation: perplexity (``ppl``), benchmarks (``bench`` over ``tasks``), teacher-vs-student fidelity
(``kl``) and side-by-side suites (``suite``); ``cli`` holds the commands.  See docs/eval.md."""

# Values the commands' --help lists.  They live here, not in bench.py / kl.py, so that `mindyouzhi
# --help` does not import numpy and the scorers.
SCORING_MODES = ("loglik", "calibrated", "generate")
DEFAULT_KL_SEQ_LEN = 512
