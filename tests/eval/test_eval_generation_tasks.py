"""IFEval, MATH-500, CrossNER and CFLUE-A: loaders on fixtures in the official layouts, hand-checked
scorer cases (including the IFEval rule examples of the benchmark's own tests and LaTeX equivalences),
and end-to-end runs with scripted models.  The cases where the scorers used to differ from the
reference implementations are in test_scorer_ifeval.py and test_scorer_math500.py."""
import json

import pytest

from eval_fakes import PieceTokenizer, ScriptedLM
from mindyouzhi.errors import UserError
from mindyouzhi.eval.bench import BenchSettings, format_summary, run_bench
from mindyouzhi.eval.tasks import TASKS, TaskOptions
from mindyouzhi.eval.tasks.cflue_app import classification_correct, extraction_f1
from mindyouzhi.eval.tasks.crossner import parse_entities, read_conll
from mindyouzhi.eval.tasks.ifeval import RULES, loose_variants
from mindyouzhi.eval.tasks.math500 import answers_equal, last_boxed
from mindyouzhi.eval.tasks.textmetrics import corpus_bleu, rouge_l

QUIET = BenchSettings(progress=False)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# IFEval
# --------------------------------------------------------------------------------------------
def check(instruction, response, **kwargs):
    return RULES[instruction].check(response, kwargs)


BULLETS_STAR = """
  To make a list, begin each line with an asterisk (*), for example:
  * first point.
  *(a space is optional)second point.
  * third point, no newline at the end
  Lists help with step-by-step guides."""
BULLETS_DASH = """
  Three dash bullets:
  - one
  - two
  -three"""
HIGHLIGHTS_TWO_PER_LINE = """
  A line may hold *two separate* highlighted *parts of text*
  and **bold ones count** as **well as these.**
  """


@pytest.mark.parametrize("instruction, response, kwargs, expected", [
    # The benchmark's own examples for each rule (instructions_test.py), restated.
    ("length_constraints:number_sentences", "xx,x. xx,x! xx/x. x{x}x?", {"relation": "less than", "num_sentences": 4}, False),
    ("length_constraints:number_sentences", "xxxx. xx,x! xxxx. x(x)x?", {"relation": "less than", "num_sentences": 5}, True),
    ("length_constraints:number_sentences", "xxxx. xx,x! xx|x. x&x x?", {"relation": "at least", "num_sentences": 4}, True),
    ("length_constraints:number_sentences", "xx-x. xx,x! xx}x. x,xx?", {"relation": "at least", "num_sentences": 5}, False),
    ("detectable_content:number_placeholders", "My [adjective] [noun] is [adjective] [noun]. I [verb] and [verb].",
     {"num_placeholders": 7}, False),
    ("detectable_content:number_placeholders", "Template:\n[Name]\n[Email]\n[Phone]\n[Address]\n[Website]\nDone.",
     {"num_placeholders": 5}, True),
    ("detectable_format:number_bullet_lists", BULLETS_STAR, {"num_bullets": 3}, True),
    ("detectable_format:number_bullet_lists", BULLETS_DASH, {"num_bullets": 3}, True),
    ("detectable_format:number_bullet_lists", "inline * and *, are not bullets:\n  * one\n  * two\n  . not this",
     {"num_bullets": 2}, True),
    ("detectable_format:constrained_response", "\n My answer is no.\n", {}, True),
    ("detectable_format:constrained_response", "My answer is no. I am still learning.", {}, True),
    ("detectable_format:constrained_response", "Yes, definitely.", {}, False),
    ("detectable_format:number_highlighted_sections", "type *hello* or **hello** for bold", {"num_highlights": 2}, True),
    ("detectable_format:number_highlighted_sections", "*Finite differences\n*Finite elements*\n*Boundary\n",
     {"num_highlights": 2}, False),
    ("detectable_format:number_highlighted_sections", HIGHLIGHTS_TWO_PER_LINE, {"num_highlights": 4}, True),
    ("detectable_format:multiple_sections", "Mark each with \"Section X\":\n  Section 1\n  [one]\n  Section 2\n  [two]",
     {"section_spliter": "Section", "num_sections": 3}, False),
    ("detectable_format:multiple_sections", "SECTION 1\n  [one]\n  SECTION 2\n  [two]",
     {"section_spliter": "SECTION", "num_sections": 2}, True),
    ("length_constraints:number_paragraphs", "\n  paragraph 1\n  ***\n  paragraph 2\n  ***\n  paragraph 3", {"num_paragraphs": 3}, True),
    ("length_constraints:number_paragraphs", "\n ***\n p1\n ***\n p2\n ***\n p3", {"num_paragraphs": 3}, True),
    ("length_constraints:number_paragraphs", "\n p1\n ***\n p2\n ***\n ***", {"num_paragraphs": 2}, False),
    ("detectable_content:postscript", "Text.\n\n  P.S. I hope this helps.", {"postscript_marker": "P.S."}, True),
    ("detectable_content:postscript", "Text.\n\n  P.S. I hope this helps.", {"postscript_marker": "PS:"}, False),
    ("detectable_content:postscript", "Area is one.\n  p.p.s what if it were all lower case?", {"postscript_marker": "P.P.S"}, True),
    ("detectable_content:postscript", "Mysterious.\n  P. S. With a space.", {"postscript_marker": "P.S."}, True),
    ("detectable_format:json_format", '```json\n{"a": 1}\n```', {}, True),
    ("detectable_format:json_format", "Here: {a: 1}", {}, False),
    ("detectable_format:title", "<<poem of joy>>\nroses", {}, True),
    ("detectable_format:title", "<<   >> nothing", {}, False),
    ("combination:two_responses", "first answer\n******\nsecond answer", {}, True),
    ("combination:two_responses", "same\n******\nsame", {}, False),
    ("combination:repeat_prompt", "Write a poem. Here it is", {"prompt_to_repeat": "write a poem."}, True),
    ("startend:end_checker", 'All done. "Any other questions?"', {"end_phrase": "Any other questions?"}, True),
    ("startend:end_checker", "Any other questions? Bye.", {"end_phrase": "Any other questions?"}, False),
    ("keywords:existence", "Banks and LOANS", {"keywords": ["loans", "bank"]}, True),
    ("keywords:frequency", "rate, Rate, RATE", {"keyword": "rate", "frequency": 3, "relation": "at least"}, True),
    ("keywords:frequency", "rate, Rate, RATE", {"keyword": "rate", "frequency": 3, "relation": "less than"}, False),
    ("keywords:forbidden_words", "the banking sector", {"forbidden_words": ["bank"]}, True),  # whole words only
    ("keywords:forbidden_words", "a Bank.", {"forbidden_words": ["bank"]}, False),
    ("keywords:letter_frequency", "Aardvark", {"letter": "a", "let_frequency": 3, "let_relation": "at least"}, True),
    ("length_constraints:number_words", "one two three-four", {"num_words": 4, "relation": "at least"}, True),
    ("length_constraints:number_words", "one two three", {"num_words": 3, "relation": "less than"}, False),
    ("length_constraints:nth_paragraph_first_word", "Intro.\n\n\"Summer, again.\"", {"num_paragraphs": 2, "nth_paragraph": 2,
                                                                                    "first_word": "summer"}, True),
    ("length_constraints:nth_paragraph_first_word", "Intro.\n\nWinter.", {"num_paragraphs": 2, "nth_paragraph": 2,
                                                                          "first_word": "summer"}, False),
    ("change_case:capital_word_frequency", "THIS is VERY well-known", {"capital_frequency": 2, "capital_relation": "at least"}, True),
    ("change_case:english_lowercase", "this is an english sentence about the weather today", {}, True),
    ("change_case:english_lowercase", "This is an English sentence about the weather today", {}, False),
    ("change_case:english_capital", "THIS IS AN ENGLISH SENTENCE ABOUT THE WEATHER TODAY", {}, True),
    ("language:response_language", "The response is English", {"language": "en"}, True),
    ("language:response_language", "Desayunamos en McDonald's hoy", {"language": "es"}, True),
    ("language:response_language", "Today we visit the Louvre", {"language": "en"}, True),
    ("punctuation:no_comma", "no commas here", {}, True),
    ("punctuation:no_comma", "one, two", {}, False),
    ("startend:quotation", '"wrapped"', {}, True),
    ("startend:quotation", '"', {}, False),
])
def test_ifeval_rules(instruction, response, kwargs, expected):
    assert check(instruction, response, **kwargs) is expected


def test_every_registered_instruction_has_a_rule():
    official = {
        "keywords:existence", "keywords:frequency", "keywords:forbidden_words", "keywords:letter_frequency",
        "language:response_language", "length_constraints:number_sentences", "length_constraints:number_paragraphs",
        "length_constraints:number_words", "length_constraints:nth_paragraph_first_word",
        "detectable_content:number_placeholders", "detectable_content:postscript",
        "detectable_format:number_bullet_lists", "detectable_format:constrained_response",
        "detectable_format:number_highlighted_sections", "detectable_format:multiple_sections",
        "detectable_format:json_format", "detectable_format:title", "combination:two_responses",
        "combination:repeat_prompt", "startend:end_checker", "change_case:capital_word_frequency",
        "change_case:english_capital", "change_case:english_lowercase", "punctuation:no_comma", "startend:quotation",
    }
    assert set(RULES) == official


IFEVAL = [
    {"key": 1000, "prompt": "Write a short note without commas. End with Any other questions?",
     "instruction_id_list": ["punctuation:no_comma", "startend:end_checker"],
     "kwargs": [{}, {"end_phrase": "Any other questions?"}]},
    {"key": 1001, "prompt": "Give a title in double angular brackets and answer in lowercase.",
     "instruction_id_list": ["detectable_format:title", "change_case:english_lowercase"],
     "kwargs": [{"num_highlights": None}, {}]},  # the released file pads kwargs with nulls
    {"key": 1002, "prompt": "Wrap the answer in JSON.", "instruction_id_list": ["detectable_format:json_format"],
     "kwargs": [{}]},
]


def test_ifeval_end_to_end_strict_and_loose(tmp_path):
    data = write_jsonl(tmp_path / "input_data.jsonl", IFEVAL)
    responses = {
        "note": "Here is the note.\nplease bring the forms. Any other questions?",  # followed (strict)
        "title": "Sure!\n<<a quiet morning>>\nthe sun rises over the hills and the birds sing softly today",  # loose only
        "json": "Here you go:\n```json\n{\"a\": 1}\n```",  # loose only (drop the first line)
    }

    def respond(prompt):
        return responses["note" if "note" in prompt else "title" if "title" in prompt else "json"]

    result = run_bench(ScriptedLM(PieceTokenizer(), respond), "ifeval", data, settings=QUIET)
    metrics = result["metrics"]
    # strict: prompt 1 passes both; prompt 2 passes title, fails lowercase ("Sure!"); prompt 3 fails.
    assert metrics["prompt_level_strict_acc"] == pytest.approx(1 / 3, abs=1e-6)
    assert metrics["inst_level_strict_acc"] == pytest.approx(3 / 5)
    assert metrics["prompt_level_loose_acc"] == 1.0 and metrics["inst_level_loose_acc"] == 1.0
    assert result["groups"]["change_case:english_lowercase"] == {"n": 1, "strict": 0.0, "loose": 1.0}
    assert "prompt_level_strict_acc" in format_summary(result)


def test_ifeval_loose_variants_and_data_errors(tmp_path):
    assert loose_variants("a\n*b*\nc")[4] == "*b*" and loose_variants("a\n*b*\nc")[7] == "b"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**IFEVAL[0], "instruction_id_list": ["made:up", "punctuation:no_comma"]}])
    with pytest.raises(UserError, match="bad.jsonl: line 1: unknown instruction id"):
        TASKS["ifeval"].load(bad, TaskOptions())
    bad = write_jsonl(tmp_path / "bad2.jsonl", [{**IFEVAL[0], "kwargs": [{}, {"end_phrase": 3}]}])
    with pytest.raises(UserError, match="'end_phrase' must be a non-empty string"):
        TASKS["ifeval"].load(bad, TaskOptions())


# --------------------------------------------------------------------------------------------
# MATH-500
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("predicted, gold, equal", [
    ("\\frac{1}{2}", "0.5", True), ("\\dfrac12", "\\frac{1}{2}", True), ("0.5", "\\dfrac12", True),
    (".5", "\\tfrac{1}{2}", True), ("2\\sqrt{2}", "\\sqrt{8}", True), ("\\sqrt2", "\\sqrt{2}", True),
    ("\\frac{\\sqrt{3}}{2}", "\\frac12\\sqrt3", True), ("\\pi/2", "\\frac{\\pi}{2}", True),
    ("(1, 2)", "(1,2)", True), ("[1,2)", "(1,2)", False), ("(1,2)", "(2,1)", False),
    ("10\\text{ cm}", "10", True), ("x = 5", "5", True), ("1,000", "1000", True), ("90^\\circ", "90", True),
    ("\\$18.90", "18.90", True), ("50\\%", "50", True), ("x^2+2x+1", "(x+1)^2", True),
    ("3", "4", False), ("\\frac{1}{3}", "0.33", False), (None, "1", False), ("", "1", False),
])
def test_math_answer_equivalence(predicted, gold, equal):
    assert answers_equal(predicted, gold) is equal


def test_last_boxed_extraction():
    assert last_boxed("first \\boxed{1}, finally \\boxed{\\frac{a}{b^{2}}}.") == "\\frac{a}{b^{2}}"
    assert last_boxed("so the answer is \\boxed 7$.") == "7"
    assert last_boxed("\\fbox{x}") == "x" and last_boxed("no box") is None and last_boxed("\\boxed{unclosed") is None


def test_math500_end_to_end_per_subject(tmp_path):
    data = write_jsonl(tmp_path / "test.jsonl", [
        {"problem": "Compute 1/2.", "solution": "...", "answer": "\\frac{1}{2}", "subject": "Algebra", "level": 1,
         "unique_id": "test/algebra/1.json"},
        {"problem": "Compute 2+2.", "solution": "...", "answer": "4", "subject": "Prealgebra", "level": 1,
         "unique_id": "test/prealgebra/2.json"},
    ])
    responses = {"Compute 1/2.": "It is one half: \\boxed{0.5}", "Compute 2+2.": "\\boxed{5}"}
    lm = ScriptedLM(PieceTokenizer(), lambda prompt: next(text for key, text in responses.items() if key in prompt))
    result = run_bench(lm, "math500", data, settings=QUIET)
    assert result["metrics"]["accuracy"] == 0.5
    assert result["groups"] == {"Algebra": {"n": 1, "accuracy": 1.0}, "Prealgebra": {"n": 1, "accuracy": 0.0}}
    assert result["items"][0]["extracted"] == "0.5" and "\\boxed{}" in lm.prompts[0]


# --------------------------------------------------------------------------------------------
# CrossNER
# --------------------------------------------------------------------------------------------
POLITICS_TEST = (
    "Barack\tB-politician\nObama\tI-politician\nled\tO\nthe\tO\nDemocratic\tB-politicalparty\nParty\tI-politicalparty\n"
    "in\tO\nU.S.\tB-country\n\n"
    "Paris\tB-location\nis\tO\nquiet\tO\n\n"
)
POLITICS_TRAIN = "Angela\tB-politician\nMerkel\tI-politician\nspoke\tO\nin\tO\nBerlin\tB-location\n\n"
MUSIC_TEST = "Abbey\tB-album\nRoad\tI-album\nby\tO\nThe\tB-band\nBeatles\tI-band\n\n"


def crossner_root(tmp_path):
    root = tmp_path / "ner_data"
    for domain, files in {"politics": {"test.txt": POLITICS_TEST, "train.txt": POLITICS_TRAIN},
                          "music": {"test.txt": MUSIC_TEST, "train.txt": "Help\tB-album\n\n"}}.items():
        (root / domain).mkdir(parents=True)
        for name, text in files.items():
            (root / domain / name).write_text(text, encoding="utf-8")
    return root


def test_conll_reader_builds_bio_spans(tmp_path):
    sentences = read_conll(crossner_root(tmp_path) / "politics" / "test.txt")
    assert sentences[0].entities == (("politician", "Barack Obama"), ("politicalparty", "Democratic Party"),
                                     ("country", "U.S."))
    assert sentences[1].where == "politics/test.txt:10"
    (tmp_path / "bad.txt").write_text("word\tX-thing\n", encoding="utf-8")
    with pytest.raises(UserError, match="bad.txt: line 1: tag 'X-thing'"):
        read_conll(tmp_path / "bad.txt")


def test_entity_parsing_tolerates_layout():
    types = ["person", "location"]
    assert parse_entities("Person: Ann Lee; Bo\n- location: None\nmisc: X\nlocation：Paris", types) == [
        ("person", "Ann Lee"), ("person", "Bo"), ("location", "Paris")]


def test_crossner_end_to_end_micro_f1_per_domain(tmp_path):
    root = crossner_root(tmp_path)
    answers = {
        "Barack Obama led": "politician: Barack Obama\npoliticalparty: None\ncountry: U.S.\nlocation: Washington",
        "Paris is quiet": "location: Paris",
        "Abbey Road": "album: Abbey Road\nband: The Beatles",
    }
    lm = ScriptedLM(PieceTokenizer(), lambda prompt: next(v for k, v in answers.items() if k in prompt.split("Sentence: ")[-1]))
    result = run_bench(lm, "crossner", root, shots=1, settings=QUIET)
    # politics: tp 3 (Obama, U.S., Paris), fp 1 (Washington), fn 1 (Democratic Party) → F1 0.75
    assert result["groups"]["politics"]["micro_f1"] == pytest.approx(0.75)
    assert result["groups"]["music"]["micro_f1"] == 1.0
    assert result["metrics"]["micro_f1"] == pytest.approx(2 * 5 / (2 * 5 + 1 + 1))
    assert result["metrics"]["domain_avg_f1"] == pytest.approx(0.875)
    # One shot from train.txt, and every type of the domain is listed (train types included).
    politics_prompt = next(prompt for prompt in lm.prompts if "Barack" in prompt)
    assert "Sentence: Angela Merkel spoke in Berlin\nEntities:\ncountry: None\nlocation: Berlin\n" in politics_prompt
    assert "Entity types: country, location, politicalparty, politician" in politics_prompt
    with pytest.raises(UserError, match="neither a CrossNER domain folder"):
        TASKS["crossner"].load(tmp_path, TaskOptions())


# --------------------------------------------------------------------------------------------
# CFLUE application tasks
# --------------------------------------------------------------------------------------------
def test_cflue_classification_rules_follow_the_authors():
    assert classification_correct("ESG情感分类", "正向", "正面")
    assert classification_correct("ESG情感分类", "负向", "Negative")
    assert not classification_correct("ESG情感分类", "负向", "中性")
    assert classification_correct("合规政策审核", "否", "该条款不合规")
    assert classification_correct("ESG分类", "物料", "['物料']")
    assert not classification_correct("ESG分类", "物料", "['物料', '能源']")
    assert not classification_correct("ESG分类", "物料", "物料，能源")
    assert classification_correct("ESG分类", "物料", " 物料")


def test_cflue_extraction_and_text_metrics():
    gold = [{"reason_type": "出口下降", "reason_product": "", "result_type": "产品利润下降"}]
    assert extraction_f1("金融事件因果关系抽取", gold, "原因类型：出口下降\n结果类型: 产品利润下降") == 1.0
    assert extraction_f1("金融事件因果关系抽取", gold, "原因类型: 出口下降\n结果类型: 供给减少") == pytest.approx(0.5)
    assert extraction_f1("金融事件主体抽取", "宝诚股份", "主体是宝诚股份") == 1.0
    # ROUGE-L by hand: hyp "the cat sat", ref "the cat sat down" → LCS 3, P 1, R 3/4, F1 6/7.
    assert rouge_l("the cat sat", "the cat sat down") == pytest.approx(6 / 7)
    assert rouge_l("", "x") == 0.0
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    # 1-4 gram precisions 5/6, 3/5, 2/4, 1/3, equal lengths (no brevity penalty) → 100 · (1/12)^(1/4).
    assert corpus_bleu(["the cat sat on a mat"], ["the cat sat on the mat"]) == pytest.approx(100 * (1 / 12) ** 0.25)
    # No 4-gram in common → 0 (no smoothing, as sacrebleu's default corpus BLEU); shorter → brevity penalty.
    assert corpus_bleu(["the cat sat"], ["the cat sat on the mat"]) == 0.0


def test_cflue_app_end_to_end(tmp_path):
    records = [
        {"task": "金融文本分类", "sub_task": "ESG情感分类", "instruction": "情绪？\n分类结果：", "input": "", "output": "正向", "history": []},
        {"task": "金融文本分类", "sub_task": "ESG情感分类", "instruction": "情绪2？\n分类结果：", "input": "", "output": "负向", "history": []},
        {"task": "金融文本生成", "sub_task": "资讯标题生成", "instruction": "标题？", "input": "", "output": "钢铁行业周报", "history": []},
        {"task": "金融翻译", "sub_task": "金融中英翻译", "instruction": "翻译：中国\n英文：", "input": "",
         "output": "China is a huge exporter of goods\n", "history": []},
        {"task": "金融文本抽取", "sub_task": "金融事件主体抽取", "instruction": "主体？", "input": "", "output": "宝诚股份", "history": []},
    ]
    (tmp_path / "application").mkdir()
    write_jsonl(tmp_path / "application" / "application.json", records)
    answers = {"情绪？": "正面", "情绪2？": "正面", "标题？": "钢铁行业周报", "翻译": "China is a huge exporter of goods",
               "主体？": "无"}
    lm = ScriptedLM(PieceTokenizer(), lambda prompt: next(v for k, v in answers.items() if prompt.startswith(k)))
    result = run_bench(lm, "cflue-app", tmp_path, settings=QUIET)
    metrics = result["metrics"]
    assert metrics["金融文本分类/accuracy"] == 0.5
    assert metrics["金融文本生成/rouge_l"] == 1.0
    assert metrics["金融中英翻译/bleu"] == pytest.approx(1.0)
    assert metrics["金融文本抽取/f1"] == 0.0
    assert metrics["score"] == pytest.approx((0.5 + 1.0 + 1.0 + 0.0) / 4)
    limited = TASKS["cflue-app"].load(tmp_path, TaskOptions(limit=1))
    assert [item.group for item in limited] == ["金融文本分类", "金融文本生成", "金融翻译", "金融文本抽取"]


def test_generation_tasks_batch_through_generate_batch(tmp_path):
    """With --batch-size > 1 prompts are decoded together; results equal one-at-a-time decoding."""
    data = write_jsonl(tmp_path / "test.jsonl", [
        {"problem": f"Compute {n}+{n}.", "answer": str(2 * n), "subject": "Algebra"} for n in range(5)])

    class BatchedLM(ScriptedLM):
        batches = []

        def generate_batch(self, prompts, max_new_tokens, stop_ids):
            self.batches.append(len(prompts))
            return [self.greedy_generate(ids, max_new_tokens, stop_ids) for ids in prompts]

    def respond(prompt):
        n = int(prompt.split("Compute ")[1].split("+")[0])
        return f"\\boxed{{{2 * n if n % 2 else n}}}"

    one_by_one = run_bench(ScriptedLM(PieceTokenizer(), respond), "math500", data, settings=QUIET)
    lm = BatchedLM(PieceTokenizer(), respond)
    batched = run_bench(lm, "math500", data, settings=BenchSettings(batch_size=2, progress=False))
    assert lm.batches == [5]  # one call with every prompt: the engine schedules them (chunks of 4 x batch)
    assert [row["response"] for row in batched["items"]] == [row["response"] for row in one_by_one["items"]]
    assert batched["metrics"]["accuracy"] == one_by_one["metrics"]["accuracy"] == 0.6
