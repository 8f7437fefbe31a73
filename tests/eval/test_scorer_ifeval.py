"""IFEval rules where the scorer used to part from the reference (google-research
``instruction_following_eval``, ported unchanged by lm-evaluation-harness): the English-case rules
check the case before the language, sentences are counted as NLTK's Punkt counts them and capital
words over ``nltk.word_tokenize``'s tokens.  Expected values are the reference's, worked out by hand
from its rules, and the tokenizers are compared with NLTK's own public functions."""
import random

import pytest

from mindyouzhi.eval.tasks import ifeval
from mindyouzhi.eval.tasks.ifeval import RULES, count_sentences, split_sentences, word_tokens


def check(instruction, response, **kwargs):
    return RULES[instruction].check(response, kwargs)


# --------------------------------------------------------------------------------------------
# change_case:english_lowercase / english_capital
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("instruction", ["change_case:english_lowercase", "change_case:english_capital"])
@pytest.mark.parametrize("response", ["12345 !!!", "2024 - 2025", "$$$ ..."])
def test_case_rules_fail_on_text_without_letters(instruction, response):
    """No cased letter: neither lower- nor upper-case; the reference's ``value.islower() and detect(...)``
    never reaches the language detector (which cannot decide here and used to make this True)."""
    assert ifeval.detected_language(response) is None
    assert check(instruction, response) is False


def test_case_is_checked_before_an_undecidable_language(monkeypatch):
    monkeypatch.setattr(ifeval, "detected_language", lambda text: None)
    assert check("change_case:english_lowercase", "all lower case words") is True
    assert check("change_case:english_lowercase", "Not all lower case") is False
    assert check("change_case:english_capital", "ALL CAPITALS HERE") is True
    assert check("change_case:english_capital", "ALL CAPITALS but one") is False
    monkeypatch.setattr(ifeval, "detected_language", lambda text: "de")
    assert check("change_case:english_lowercase", "all lower case words") is False


# --------------------------------------------------------------------------------------------
# length_constraints:number_sentences (Punkt, English model)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, sentences", [
    # The reference's own counts (instructions_util_test.py).
    ("xx,x. xx,x! xx/x. x{x}x? x.", 5), ("xx,x! xxxx. x(x)x?", 3), ("xxxx. xx,x! xx|x. x&x x?", 4),
    ("xx-x]xx,x! x{x}xx,x.", 2),
    # "e.g" and "i.e" are not among Punkt's English abbreviations: a sentence ends after them.
    ("Use a tool, e.g. a hammer. It works.", 3), ("Some fruit, i.e. apples, are red. Others are not.", 3),
    ("Dr. J. R. Doe arrived, e.g. on time. Fine", 3),
    # Known abbreviations, initials, decimals and ellipses do not end one; "a.m." before a capital does.
    ("Mr. Smith paid $3.50 at 5 p.m. today. He left!", 2), ("Prices rose vs. last year. Good.", 2),
    ("Wait... what? No!", 2), ("It was 5 a.m. The sun rose.", 2), ("I live in the U.S. It is big.", 2),
    ("See Fig. 3 for details. Done.", 3), ("Hello\n\nWorld", 1), ("", 0),
])
def test_sentence_counts_follow_punkt(text, sentences):
    assert count_sentences(text) == sentences


@pytest.mark.parametrize("text, relation, threshold, followed", [
    ("Use a tool, e.g. a hammer. It works.", "at least", 3, True),
    ("Some fruit, i.e. apples, are red. Others are not.", "less than", 3, False),
])
def test_number_sentences_rule_on_abbreviations(text, relation, threshold, followed):
    assert check("length_constraints:number_sentences", text, relation=relation, num_sentences=threshold) is followed


# --------------------------------------------------------------------------------------------
# change_case:capital_word_frequency (nltk.word_tokenize)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, capitals", [
    ("P.S. I love you.", 2),  # "P.S", ".", "I", ...: the initials are one word
    ("NASA's rover", 1),  # "NASA", "'s"
    ("the U.S.A. is big", 1),  # "U.S.A." stays whole inside a sentence
    ("I'M FINE", 3), ("DON'T STOP", 3),  # "I" "'M", "DO" "N'T": contractions split as the Treebank rules do
    ("THIS is VERY well-known AI-BASED work", 3),  # hyphenated words stay whole
    ("the NBA's best (MVP) player", 2),
])
def test_capital_words_counted_over_word_tokenize(text, capitals):
    assert sum(token.isupper() for token in word_tokens(text)) == capitals
    assert check("change_case:capital_word_frequency", text, capital_frequency=capitals, capital_relation="at least")
    assert not check("change_case:capital_word_frequency", text, capital_frequency=capitals + 1,
                     capital_relation="at least")


# --------------------------------------------------------------------------------------------
# Against NLTK's public functions, with the same English model installed as nltk_data would have it
# --------------------------------------------------------------------------------------------
FRAGMENTS = [
    "The results, e.g. the yields,", "were reported", "i.e. twice a year.", "Mr. Lee", "and Dr. Wong", "met at 9 a.m.",
    "in the U.S.", "It cost $3.50.", "NASA's budget", "rose 2.5 percent.", "P.S. Thanks!", "Why not?", "Wait...",
    "\"Stop,\" he said.", "U.S.A. TODAY", "(see Fig. 2)", "I'M HERE.", "don't worry", "state-of-the-art tools",
    "Inc. and Co. merged.", "on Jan. 5", "GREAT NEWS!", "1. First\n2. Second", "\n\n", "-- a dash --", "vs. them.",
]


def _punkt_tab(root):
    """The model in nltk_data's ``punkt_tab`` layout, the files the reference would download."""
    from punkt.data import english

    folder = root / "tokenizers" / "punkt_tab" / "english"
    folder.mkdir(parents=True)
    (folder / "abbrev_types.txt").write_text("".join(f"{word}\n" for word in sorted(english.ABBREV_TYPES)))
    (folder / "sent_starters.txt").write_text("".join(f"{word}\n" for word in sorted(english.SENT_STARTERS)))
    (folder / "collocations.tab").write_text("".join(f"{a}\t{b}\n" for a, b in sorted(english.COLLOCATIONS)))
    (folder / "ortho_context.tab").write_text("".join(f"{k}\t{v}\n" for k, v in sorted(english.ORTHO_CONTEXT.items())))


def test_tokenizers_equal_nltk_sent_and_word_tokenize(tmp_path, monkeypatch):
    import nltk
    import nltk.tokenize
    import punkt

    _punkt_tab(tmp_path)
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    nltk.tokenize._get_punkt_tokenizer.cache_clear()
    try:
        rng = random.Random(0)
        texts = [" ".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 12))) for _ in range(300)]
        for text in texts:
            assert split_sentences(text) == nltk.sent_tokenize(text) == punkt.sent_tokenize(text), text
            assert word_tokens(text) == nltk.word_tokenize(text), text
    finally:
        nltk.tokenize._get_punkt_tokenizer.cache_clear()
