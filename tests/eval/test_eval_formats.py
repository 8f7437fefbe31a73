"""Every format's parser, including its odd corners, and its data errors (naming file and row)."""
import bz2
import json

import pytest

from mindyouzhi.errors import UserError
from mindyouzhi.eval.tasks import TASKS, TaskOptions
from mindyouzhi.eval.tasks.cflue import read_cflue
from mindyouzhi.eval.tasks.classification import FPB, SST5, read_sentences
from mindyouzhi.eval.tasks.exam_csv import read_exam_csv, subject_key
from mindyouzhi.eval.tasks.hellaswag import read_hellaswag
from mindyouzhi.eval.tasks.jsonl import read_generation, read_mcq

HEADER = "id,question,A,B,C,D,answer\n"


def write(path, text, encoding="utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


# --- exam CSV (C-Eval / FinEval / FinanceIQ) ---------------------------------------------------

def test_exam_csv_bom_quoted_commas_multiline_and_explanation(tmp_path):
    csv_text = (
        "\ufeffid,question,A,B,C,D,answer,explanation\n"
        '0,"甲, 乙 和 丙",一,"二,三",四,五,B,"解释, 有逗号"\n'
        '1,"第一行\n第二行",a,b,c,d,D ,\n'
    )
    questions = read_exam_csv(write(tmp_path / "accounting_dev.csv", csv_text))
    assert [q.question for q in questions] == ["甲, 乙 和 丙", "第一行\n第二行"]
    assert questions[0].options[1] == ("B", "二,三")
    assert questions[0].answer == frozenset("B")
    assert questions[1].answer == frozenset("D")  # FinEval writes one answer as "D "
    assert questions[1].where == "accounting_dev.csv:3"
    assert questions[0].group == "accounting"


def test_financeiq_header_with_unnamed_index_column(tmp_path):
    text = ",Question,A,B,C,D,Answer\n0,问题一,甲,乙,丙,丁,C\n1,问题二,甲,乙,丙,丁,a\n"
    questions = read_exam_csv(write(tmp_path / "银行从业资格.csv", text))
    assert [sorted(q.answer) for q in questions] == [["C"], ["A"]]
    assert questions[0].group == "银行从业资格"


def test_financeiq_pairs_dev_and_test_files_by_name(tmp_path):
    header = ",Question,A,B,C,D,Answer\n"
    write(tmp_path / "FinanceIQ" / "dev" / "银行从业资格.csv", header + "0,示例题,甲,乙,丙,丁,B\n")
    test = write(tmp_path / "FinanceIQ" / "test" / "银行从业资格.csv", header + "0,考题,甲,乙,丙,丁,D\n")
    (item,) = TASKS["financeiq"].load(test.parent, TaskOptions(shots=1))
    assert item.context.startswith("以下是中国关于银行从业资格考试的单项选择题，请选出其中的正确答案。\n\n示例题\n")
    assert "答案：B\n\n考题\n" in item.context and item.labels[item.gold] == "D"


def test_subject_keys_strip_split_suffixes():
    assert subject_key("x/accountant_val.csv") == "accountant"
    assert subject_key("x/tax_law_test_selected.csv") == "tax_law"
    assert subject_key("x/注册会计师（CPA）.csv") == "注册会计师（CPA）"


@pytest.mark.parametrize("text, message", [
    ("id,question,A,B,C,D\n0,q,a,b,c,d\n", "no 'answer' column"),
    ("id,text,A,B,C,D,answer\n0,q,a,b,c,d,A\n", "no 'question' column"),
    ("id,question,answer\n0,q,A\n", "no option columns"),
    (HEADER + "0,q,a,b,c,d,A\n1,q,a,b,c,d,E\n", r"line 3 \(id 1\): answer 'E' is not one of A, B, C, D"),
    (HEADER + "0,q,a,b,c,A\n", "line 2: 6 fields where the header has 7"),
    (HEADER + "0,q,a,b,c,d,A,extra\n", "line 2: 8 fields"),
    (HEADER + "0,,a,b,c,d,A\n", r"line 2 \(id 0\): empty question"),
    (HEADER, "no questions after the header"),
    ("", "empty file"),
])
def test_exam_csv_errors_name_file_and_row(tmp_path, text, message):
    path = write(tmp_path / "law_val.csv", text)
    with pytest.raises(UserError, match=message) as error:
        read_exam_csv(path)
    assert str(path) in str(error.value)


def test_exam_csv_rejects_non_utf8(tmp_path):
    path = write(tmp_path / "law_val.csv", HEADER + "0,caf\xe9,a,b,c,d,A\n", encoding="latin-1")
    with pytest.raises(UserError, match="not UTF-8"):
        read_exam_csv(path)


def test_exam_root_folder_resolves_to_the_split_with_answers(tmp_path, capsys):
    write(tmp_path / "ceval" / "val" / "law_val.csv", HEADER + "0,q,a,b,c,d,A\n")
    write(tmp_path / "ceval" / "dev" / "law_dev.csv", HEADER + "0,shot,a,b,c,d,B\n")
    write(tmp_path / "ceval" / "test" / "law_test.csv", "id,question,A,B,C,D\n0,hidden,a,b,c,d\n")
    items = TASKS["ceval"].load(tmp_path / "ceval", TaskOptions(shots=1))
    assert [item.item_id for item in items] == ["law_val.csv:2"]
    assert "shot" in items[0].context  # few-shot still comes from the sibling dev split
    assert "using the 'val' split" in capsys.readouterr().err
    # FinanceIQ publishes its answers in test/.
    write(tmp_path / "fiq" / "test" / "银行.csv", ",Question,A,B,C,D,Answer\n0,q,a,b,c,d,C\n")
    write(tmp_path / "fiq" / "dev" / "银行.csv", ",Question,A,B,C,D,Answer\n0,s,a,b,c,d,A\n")
    assert [item.group for item in TASKS["financeiq"].load(tmp_path / "fiq", TaskOptions(shots=0))] == ["银行"]
    assert "'test' split" in capsys.readouterr().err


def test_exam_root_without_the_answer_split_asks_for_one(tmp_path):
    write(tmp_path / "ceval" / "test" / "law_test.csv", HEADER + "0,q,a,b,c,d,A\n")
    with pytest.raises(UserError, match="no 'val' split with answers; pass one, e.g."):
        TASKS["ceval"].load(tmp_path / "ceval", TaskOptions(shots=0))


def test_cflue_accepts_its_knowledge_folder(tmp_path):
    write(tmp_path / "cflue" / "data" / "knowledge" / "knowledge.json", json.dumps([_cflue_record()], ensure_ascii=False))
    for data in (tmp_path / "cflue" / "data", tmp_path / "cflue" / "data" / "knowledge"):
        assert len(TASKS["cflue"].load(data, TaskOptions())) == 1


def test_missing_dev_split_for_few_shot_is_reported(tmp_path):
    write(tmp_path / "ceval" / "val" / "law_val.csv", HEADER + "0,q,a,b,c,d,A\n")
    with pytest.raises(UserError, match="dev"):
        TASKS["ceval"].load(tmp_path / "ceval" / "val", TaskOptions(shots=1))
    write(tmp_path / "ceval" / "dev" / "logic_dev.csv", HEADER + "0,q,a,b,c,d,A\n")
    with pytest.raises(UserError, match="subject 'law'"):
        TASKS["ceval"].load(tmp_path / "ceval" / "val", TaskOptions(shots=1))


# --- CFLUE ---------------------------------------------------------------------------------------

def _cflue_record(**overrides):
    record = {
        "名称": "证券从业资格", "task": "多项选择题", "question": "我国金融市场体系包括（）。",
        "choices": "{'A': '货币市场', 'B': '债券市场', 'C': '商品市场', 'D': '金融衍生品市场'}",
        "answer": "ABD", "analysis": None,
    }
    record.update(overrides)
    return record


def test_cflue_parses_dict_strings_multi_answers_and_true_false(tmp_path):
    records = [
        _cflue_record(),
        _cflue_record(task="判断题", question="对吗？", choices="{'A': '对', 'B': '错'}", answer="B"),
        _cflue_record(task="单项选择题", choices={"B": "二", "A": "一"}, answer=" A "),
    ]
    path = write(tmp_path / "knowledge.json", json.dumps(records, ensure_ascii=False))
    (multi, _), (judge, _), (single, exam) = read_cflue(path)
    assert multi.multiple and multi.answer == frozenset("ABD") and multi.letters == ("A", "B", "C", "D")
    assert judge.options == (("A", "对"), ("B", "错")) and judge.group == "判断题"
    assert single.options == (("A", "一"), ("B", "二")) and not single.multiple
    assert exam == "证券从业资格" and multi.where == "knowledge.json:record 1"


def test_cflue_jsonl_is_accepted(tmp_path):
    path = write(tmp_path / "k.jsonl", json.dumps(_cflue_record(), ensure_ascii=False) + "\n\n")
    assert len(read_cflue(path)) == 1


@pytest.mark.parametrize("overrides, message", [
    ({"answer": "ABE"}, "record 1: answer 'ABE' is not a set of the options A, B, C, D"),
    ({"task": "单项选择题", "answer": "AB"}, "needs exactly one answer letter"),
    ({"task": "问答题"}, "'task' is '问答题'"),
    ({"choices": "{'A': '一', 'B': }"}, "not a dict literal"),
    ({"choices": "__import__('os').system('true')"}, "not a dict literal"),
    ({"choices": "{'AA': 'x', 'B': 'y'}"}, "distinct letters"),
    ({"question": ""}, "empty 'question'"),
])
def test_cflue_errors(tmp_path, overrides, message):
    path = write(tmp_path / "k.json", json.dumps([_cflue_record(**overrides)], ensure_ascii=False))
    with pytest.raises(UserError, match=message):
        read_cflue(path)


def test_cflue_multi_answer_candidates_are_all_letter_subsets(tmp_path):
    path = write(tmp_path / "k.json", json.dumps([_cflue_record()], ensure_ascii=False))
    (item,) = TASKS["cflue"].load(path, TaskOptions())
    assert len(item.labels) == 15 and item.labels[:5] == ("A", "B", "C", "D", "AB")
    assert item.labels[item.gold] == "ABD"
    assert item.context.endswith("D. 金融衍生品市场\n答案：")
    assert "多项选择题，请选出其中所有正确的答案。" in item.context


# --- FPB / SST-5 -----------------------------------------------------------------------------------

def test_fpb_latin1_and_utf8_copies_and_at_signs(tmp_path):
    text = "Sepp\xe4l\xe4 's sales rose .@positive\nContact: ir@company.fi for details .@neutral\n\n"
    latin = read_sentences(write(tmp_path / "fpb_latin1.txt", text, "latin-1"), FPB)
    utf8 = read_sentences(write(tmp_path / "fpb_utf8.txt", text, "utf-8"), FPB)
    assert latin[0].sentence == utf8[0].sentence == "Seppälä 's sales rose ."
    assert latin[1].sentence == "Contact: ir@company.fi for details ." and latin[1].label == "neutral"
    assert latin[1].item_id == "fpb_latin1.txt:2"


@pytest.mark.parametrize("text, message", [
    ("no label here\n", "line 1: expected 'sentence@label'"),
    ("ok .@positive\nbad .@bullish\n", "line 2: label 'bullish' is not one of negative, neutral, positive"),
    ("\n\n", "empty file"),
])
def test_fpb_errors(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        read_sentences(write(tmp_path / "fpb.txt", text), FPB)


def test_sst5_labels_and_errors(tmp_path):
    sentences = read_sentences(write(tmp_path / "stsa.fine.test", "4 a gem .\n0 awful .\n"), SST5)
    assert [s.label for s in sentences] == ["very positive", "very negative"]
    with pytest.raises(UserError, match="line 2: expected 'label text' with label 0-4, got '5'"):
        read_sentences(write(tmp_path / "bad", "1 fine .\n5 great .\n"), SST5)


def test_classification_few_shot_is_label_balanced_and_excludes_the_item(tmp_path):
    train = write(tmp_path / "train.txt", "n1 .@negative\nn2 .@negative\nn3 .@negative\nu1 .@neutral\np1 .@positive\n")
    test = write(tmp_path / "test.txt", "u1 .@neutral\n")
    (item,) = TASKS["fpb"].load(test, TaskOptions(shots=3, fewshot_data=train))
    assert item.context == (
        "Classify the sentiment of each financial news sentence as negative, neutral or positive.\n\n"
        "Sentence: n1 .\nSentiment: negative\n\n"
        "Sentence: p1 .\nSentiment: positive\n\n"
        "Sentence: n2 .\nSentiment: negative\n\n"
        "Sentence: u1 .\nSentiment:"
    )
    assert item.choices == (" negative", " neutral", " positive") and item.gold == 1


# --- HellaSwag -----------------------------------------------------------------------------------

HELLASWAG = (
    "Roof shingle removal: A man is sitting on a roof. he\n3\n"
    "is using wrap.\nis ripping tiles.\nis holding a cube.\nstarts pulling up roofing.\n"
    "Clean and jerk: A lady walks to a barbell. the lady\n0\n"
    "lifts it.\npulls it.\npushes it.\nstands.\n"
)


def test_hellaswag_plain_and_bz2(tmp_path):
    plain = read_hellaswag(write(tmp_path / "h.txt", HELLASWAG))
    packed = tmp_path / "h.txt.bz2"
    packed.write_bytes(bz2.compress(HELLASWAG.encode()))
    assert read_hellaswag(packed) == [(f"h.txt.bz2:{n}", *rest) for (_, *rest), n in zip(plain, (1, 7))]
    item = TASKS["hellaswag"].load(packed, TaskOptions())[0]
    assert item.choices[3] == " starts pulling up roofing." and item.gold == 3


@pytest.mark.parametrize("text, message", [
    (HELLASWAG + "ctx\n1\n", "line 13: incomplete item"),
    (HELLASWAG.replace("\n0\n", "\n4\n"), "line 8: gold index '4' is not 0-3"),
    (HELLASWAG.replace("pulls it.", ""), "line 10: empty ending"),
])
def test_hellaswag_errors(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        read_hellaswag(write(tmp_path / "h.txt", text))


# --- generic JSONL ---------------------------------------------------------------------------------

def test_mcq_jsonl_answer_forms(tmp_path):
    lines = [
        {"question": "2+2?", "choices": ["3", "4"], "answer": 1},
        {"question": "pick", "choices": {"b": "y", "a": "x"}, "answer": "a"},
        {"question": "all odd", "choices": ["1", "2", "3"], "answer": ["A", "C"], "subject": "math"},
        {"question": "one of many", "choices": ["1", "2", "3"], "answer": "B", "multiple": True},
    ]
    path = write(tmp_path / "m.jsonl", "\n".join(json.dumps(line) for line in lines))
    questions = [q for q, _ in read_mcq(path)]
    assert [sorted(q.answer) for q in questions] == [["B"], ["A"], ["A", "C"], ["B"]]
    assert [q.multiple for q in questions] == [False, False, True, True]
    assert questions[2].group == "math"
    items = TASKS["mcq-jsonl"].load(path, TaskOptions())
    assert items[0].context == "2+2?\nA. 3\nB. 4\nAnswer:" and items[0].choices == (" A", " B")
    assert items[3].labels[items[3].gold] == "B" and len(items[3].labels) == 7


@pytest.mark.parametrize("line, message", [
    ('{"question": "q", "choices": ["a", "b"], "answer": 2}', "line 1: answer index 2 is outside 0..1"),
    ('{"question": "q", "choices": ["a", "b"], "answer": "C"}', "answer 'C' is not among the options A, B"),
    ('{"question": "q", "choices": ["a"], "answer": 0}', "at least two options"),
    ('{"question": "q", "answer": 0}', "missing 'choices'"),
    ('{"question": "q", "choices": ["a", "b"], "answer": true}', "not an index"),
    ('{"question": "q", "choices": ["a", "b"], "answer": "AB", "multiple": false}', "'multiple' is false"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 0', "line 1: invalid JSON"),
    ('["not", "an", "object"]', "expected a JSON object"),
])
def test_mcq_jsonl_errors(tmp_path, line, message):
    with pytest.raises(UserError, match=message):
        read_mcq(write(tmp_path / "m.jsonl", line + "\n"))


def test_generation_jsonl_fields_and_json_gold(tmp_path):
    records = [
        {"prompt": "Q: capital of France?\nA:", "answer": "Paris"},
        {"input": "意图？", "gold_answer": "{\"intent\": \"transfer\"}", "id": "x1", "stop": ["\n"]},
        {"prompt": "slots", "gold": {"intent": "pay", "slots": {"amount": "5"}}, "group": "banking"},
    ]
    path = write(tmp_path / "g.json", json.dumps(records, ensure_ascii=False))  # a JSON array also works
    first, second, third = read_generation(path)
    assert first.gold == "Paris" and first.stop == ("\n\n",)
    assert second.gold == {"intent": "transfer"} and second.item_id == "x1" and second.stop == ("\n",)
    assert third.group == "banking"
    with pytest.raises(UserError, match="record 1: no gold answer"):
        read_generation(write(tmp_path / "bad.json", '[{"prompt": "p"}]'))
    with pytest.raises(UserError, match="line 2: no prompt"):
        read_generation(write(tmp_path / "bad.jsonl", '{"prompt": "p", "answer": "a"}\n{"answer": "a"}\n'))
