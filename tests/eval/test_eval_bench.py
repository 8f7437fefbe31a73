"""End-to-end scoring on hand-computable cases, prompt construction, --limit and batching."""
import json
import math

import pytest

from eval_fakes import BigramLM, PieceTokenizer, PrefixHashLM, ScriptedLM, bigram_table
from mindyouzhi.errors import UserError
from mindyouzhi.eval.bench import BenchSettings, format_summary, run_bench
from mindyouzhi.eval.tasks.answers import extract_json_object, extract_letters, score_generation

QUIET = BenchSettings(progress=False)
HEADER = "id,question,A,B,C,D,answer,explanation\n"
PIECES = ["答案：", "A", "B", "C", "D", "\n", "ctx.", " ab", " abcdefgh"]


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def make_ceval(root):
    """Two subjects; gold answers law: B A B C, logic: D B B."""
    write(root / "dev" / "law_dev.csv", HEADER + "0,法一,甲,乙,丙,丁,A,因为\n1,法二,甲,乙,丙,丁,C,\n")
    write(root / "dev" / "logic_dev.csv", HEADER + "0,逻一,真,假,都,无,D,\n1,逻二,真,假,都,无,B,\n")
    rows = ["0,问1,a,b,c,d,B", "1,问2,a,b,c,d,A", "2,问3,a,b,c,d,B", "3,问4,a,b,c,d,C"]
    write(root / "val" / "law_val.csv", "id,question,A,B,C,D,answer\n" + "\n".join(rows) + "\n")
    rows = ["0,题1,a,b,c,d,D", "1,题2,a,b,c,d,B", "2,题3,a,b,c,d,B"]
    write(root / "val" / "logic_val.csv", "id,question,A,B,C,D,answer\n" + "\n".join(rows) + "\n")
    return root / "val"


def letter_model():
    tokenizer = PieceTokenizer(PIECES)
    table = bigram_table(tokenizer, {"答案：": {"A": 0.3, "B": 0.4, "C": 0.2, "D": 0.1}})
    return BigramLM(tokenizer, table)


def test_exam_accuracy_per_subject_and_average_are_exact(tmp_path):
    val = make_ceval(tmp_path / "ceval")
    result = run_bench(letter_model(), "ceval", val, shots=2, settings=QUIET)
    # The model always prefers B: law 2/4, logic 2/3.
    assert result["groups"]["law"] == {"n": 4, "accuracy": 0.5, "acc_norm": 0.5}
    assert result["groups"]["logic"]["accuracy"] == pytest.approx(2 / 3, abs=1e-6)
    assert result["metrics"]["accuracy"] == pytest.approx(4 / 7, abs=1e-6)
    assert result["metrics"]["macro_accuracy"] == pytest.approx((0.5 + 2 / 3) / 2, abs=1e-6)
    first = result["items"][0]
    assert first["pred"] == "B" and first["gold"] == "B" and first["correct"]
    assert first["logprobs"] == pytest.approx([math.log(p) for p in (0.3, 0.4, 0.2, 0.1)], abs=1e-4)
    assert result["n"] == 7 and result["shots"] == 2 and result["primary_metric"] == "accuracy"
    # One forward per question: the four letters share it.
    assert result["stats"]["forward_sequences"] == 7
    assert "law" in format_summary(result)


def test_exam_few_shot_prompt_is_the_ceval_layout(tmp_path):
    val = make_ceval(tmp_path / "ceval")
    lm = letter_model()
    run_bench(lm, "ceval", val / "law_val.csv", shots=2, limit=1, settings=BenchSettings(progress=False, pad_multiple=1))
    fed = lm.tokenizer.decode(lm.calls[0][0][1:])  # drop BOS
    assert fed == (
        "以下是中国关于法学考试的单项选择题，请选出其中的正确答案。\n\n"
        "法一\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案：A\n\n"
        "法二\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案：C\n\n"
        "问1\nA. a\nB. b\nC. c\nD. d\n答案："
    )


def test_too_many_shots_is_a_user_error(tmp_path):
    val = make_ceval(tmp_path / "ceval")
    with pytest.raises(UserError, match="--shots 3 but .*law_dev.csv has only 2"):
        run_bench(letter_model(), "ceval", val, shots=3, settings=QUIET)


def test_limit_and_batching_give_the_same_accuracy_as_unbatched(tmp_path):
    val = make_ceval(tmp_path / "ceval")
    tokenizer = PieceTokenizer(PIECES)
    full = run_bench(PrefixHashLM(tokenizer), "ceval", val, shots=1, settings=QUIET)
    for batch_size in (2, 5, 64):
        batched = run_bench(PrefixHashLM(tokenizer), "ceval", val, shots=1, settings=BenchSettings(batch_size=batch_size, progress=False))
        assert [row["pred"] for row in batched["items"]] == [row["pred"] for row in full["items"]]
        assert batched["metrics"] == full["metrics"]
    limited = run_bench(PrefixHashLM(tokenizer), "ceval", val, shots=1, limit=2, settings=BenchSettings(batch_size=3, progress=False))
    expected = [row for row in full["items"] if row["id"].split(":")[1] in {"2", "3"}]  # first two rows of each file
    assert limited["n"] == 4 and [row["pred"] for row in limited["items"]] == [row["pred"] for row in expected]
    assert limited["metrics"]["accuracy"] == pytest.approx(sum(row["correct"] for row in expected) / 4)


def test_acc_norm_divides_by_characters(tmp_path):
    tokenizer = PieceTokenizer(PIECES)
    # After "ctx." the short ending " ab" (3 chars) has p=0.1, the long " abcdefgh" (9 chars) 0.05:
    # acc picks the short one (log .1 > log .05), acc_norm the long one (log .1/3 < log .05/9).
    lm = BigramLM(tokenizer, bigram_table(tokenizer, {"ctx.": {" ab": 0.1, " abcdefgh": 0.05}}))
    data = write(tmp_path / "h.txt", "ctx.\n1\nab\nabcdefgh\nq1\nq2\n")
    result = run_bench(lm, "hellaswag", data, settings=QUIET)
    row = result["items"][0]
    assert (row["pred"], row["pred_norm"]) == ("0", "1")
    assert result["metrics"]["accuracy"] == 0.0 and result["metrics"]["acc_norm"] == 1.0
    assert result["primary_metric"] == "acc_norm"


def test_multi_answer_loglik_is_exact_set_over_prefix_free_candidates(tmp_path):
    tokenizer = PieceTokenizer(PIECES)
    table = bigram_table(tokenizer, {
        "答案：": {"A": 0.5},
        "A": {"B": 0.5, "\n": 0.2},
        "B": {"D": 0.6, "\n": 0.1},
        "D": {"\n": 0.9},
    })
    record = {"名称": "银行", "task": "多项选择题", "question": "选哪些？",
              "choices": "{'A': '一', 'B': '二', 'C': '三', 'D': '四'}", "answer": "ABD"}
    data = write(tmp_path / "k.json", json.dumps([record, {**record, "answer": "AB"}], ensure_ascii=False))
    result = run_bench(BigramLM(tokenizer, table), "cflue", data, settings=QUIET)
    # "ABD\n" = .5*.5*.6*.9 = .135 beats "A\n" = .1 and "AB\n" = .025.
    assert [row["pred"] for row in result["items"]] == ["ABD", "ABD"]
    assert [row["correct"] for row in result["items"]] == [True, False]
    labels = ["A", "B", "C", "D", "AB", "AC", "AD", "BC", "BD", "CD", "ABC", "ABD", "ACD", "BCD", "ABCD"]
    logprobs = dict(zip(labels, result["items"][0]["logprobs"]))
    assert logprobs["ABD"] == pytest.approx(math.log(0.135), abs=1e-4)
    assert logprobs["A"] == pytest.approx(math.log(0.1), abs=1e-4)
    assert result["groups"]["多项选择题"]["accuracy"] == 0.5


def test_generation_scoring_of_lettered_questions(tmp_path):
    val = make_ceval(tmp_path / "ceval")
    answers = iter(["答案：B。因为……", "According to the law, A", "I think it is C.", "", "D", "正确答案是 B", "b"])
    lm = ScriptedLM(PieceTokenizer(PIECES), lambda prompt: next(answers))
    result = run_bench(lm, "ceval", val, shots=0, settings=BenchSettings(scoring="generate", progress=False))
    assert [row["pred"] for row in result["items"]] == ["B", "A", "C", "", "D", "B", ""]
    assert [row["correct"] for row in result["items"]] == [True, True, False, False, True, True, False]
    assert result["scoring"] == "generate" and result["primary_metric"] == "accuracy"


def test_generate_scoring_is_refused_for_non_letter_tasks(tmp_path):
    data = write(tmp_path / "fpb.txt", "up .@positive\n")
    with pytest.raises(UserError, match="needs lettered answers"):
        run_bench(letter_model(), "fpb", data, settings=BenchSettings(scoring="generate", progress=False))


def test_chat_template_wraps_the_prompt(tmp_path):
    data = write(tmp_path / "g.jsonl", json.dumps({"prompt": "Say hi", "answer": "hi"}) + "\n")
    lm = ScriptedLM(PieceTokenizer(PIECES), lambda prompt: "hi")
    result = run_bench(lm, "gen-jsonl", data, settings=BenchSettings(chat=True, progress=False))
    assert lm.prompts == ["<|user|>Say hi\n<|assistant|>"]
    assert result["metrics"]["exact_match"] == 1.0 and result["chat"] is True


def test_generation_exact_match_and_json_field_accuracy(tmp_path):
    records = [
        {"prompt": "p1", "answer": "Paris"},
        {"prompt": "p2", "answer": "Rome"},
        {"prompt": "p3", "answer": {"intent": "transfer", "slots": {"amount": "500", "payee": "mom"}}},
        {"prompt": "p4", "answer": "{\"intent\": \"balance\", \"slots\": {\"account\": \"savings\"}}"},
        {"prompt": "p5", "answer": {"intent": "pay"}},
    ]
    responses = {
        "p1": " Paris \n\nignored",
        "p2": "Milan",
        "p3": "```json\n{\"intent\": \"transfer\", \"slots\": {\"amount\": \"500\", \"payee\": \"dad\"}}\n```",
        "p4": "{\"intent\": \"balance\", \"slots\": {\"account\": \" savings \"}}",
        "p5": "no json here {oops",
    }
    data = write(tmp_path / "g.jsonl", "\n".join(json.dumps(r) for r in records))
    lm = ScriptedLM(PieceTokenizer(PIECES), lambda prompt: responses[prompt])
    result = run_bench(lm, "gen-jsonl", data, settings=QUIET)
    assert [row["exact"] for row in result["items"]] == [True, False, False, True, False]
    metrics = result["metrics"]
    assert metrics["exact_match"] == pytest.approx(2 / 5)
    assert metrics["json_valid"] == pytest.approx(2 / 3)
    # Fields: p3 intent ✓ amount ✓ payee ✗; p4 intent ✓ account ✓; p5 intent ✗ → 4 of 6.
    assert metrics["field_accuracy"] == pytest.approx(4 / 6)
    assert result["fields"]["slots.payee"] == {"n": 1, "accuracy": 0.0}
    assert result["fields"]["intent"] == {"n": 3, "accuracy": pytest.approx(2 / 3)}
    assert result["items"][0]["response"] == " Paris "


@pytest.mark.parametrize("response, multiple, expected", [
    ("答案：A、B、D", True, "ABD"),
    ("答案是ACD，理由如下", True, "ACD"),
    ("BD", True, "BD"),
    ("Answer: (B)", False, "B"),
    ("After reading, D", False, "D"),
    ("According to rules", True, ""),
    ("Because of this", False, ""),
])
def test_extract_letters(response, multiple, expected):
    assert extract_letters(response, ("A", "B", "C", "D"), multiple) == expected


def test_json_extraction_and_non_string_golds():
    assert extract_json_object('text {"a": 1} more {"b": 2}') == {"a": 1}
    assert extract_json_object("{not json} then {\"ok\": true}") == {"ok": True}
    assert score_generation(" 42 ", 42).exact
    assert not score_generation("forty-two", 42).exact
    assert score_generation("[1, 2]", [1, 2]).exact
