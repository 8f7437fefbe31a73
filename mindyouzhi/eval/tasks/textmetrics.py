"""Reference-based text metrics: ROUGE-L and corpus BLEU-4 over word tokens.

Chinese text is segmented with jieba (as the CFLUE scorers do), English with a word/punctuation
regex.  ROUGE-L is the F1 of the longest-common-subsequence precision and recall per pair, averaged
over pairs (the ``rouge`` package's ``avg=True``); BLEU is Papineni et al.'s corpus BLEU-4 (clipped
n-gram precisions summed over the corpus, geometric mean, brevity penalty), reported 0-100 as
sacrebleu does.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

from .base import contains_cjk


def tokens(text: str) -> list[str]:
    text = text.strip()
    if not text:
        return []
    if contains_cjk(text):
        import jieba

        jieba.setLogLevel(60)  # its "Building prefix dict" chatter on stderr
        return [token for token in jieba.lcut(text) if token.strip()]
    return re.findall(r"\w+|[^\w\s]", text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str) -> float:
    hyp, ref = tokens(candidate), tokens(reference)
    common = lcs_length(hyp, ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(hyp), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def corpus_bleu(candidates: Sequence[str], references: Sequence[str], max_n: int = 4) -> float:
    matches, totals = [0] * max_n, [0] * max_n
    hyp_length = ref_length = 0
    for candidate, reference in zip(candidates, references):
        hyp, ref = tokens(candidate), tokens(reference)
        hyp_length += len(hyp)
        ref_length += len(ref)
        for n in range(1, max_n + 1):
            hyp_grams, ref_grams = _ngrams(hyp, n), _ngrams(ref, n)
            matches[n - 1] += sum((hyp_grams & ref_grams).values())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    if hyp_length == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    brevity = 1.0 if hyp_length > ref_length else math.exp(1 - ref_length / hyp_length)
    return 100 * brevity * math.exp(log_precision)
