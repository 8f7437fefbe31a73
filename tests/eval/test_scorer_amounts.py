"""rmb-amounts: the value of the first amount of the asked kind, whatever the gold's format.

The cases come from the pipeline's held-out split and the responses SmolLM2 gave after SFT
(docs/BENCHMARKS.md, "pipeline"): golds in four Arabic styles and with a 价税合计 prefix, answers
that echo the prompt's amount."""
import json

import pytest

from eval_fakes import PieceTokenizer, ScriptedLM
from mindyouzhi.errors import UserError
from mindyouzhi.eval.bench import BenchSettings, run_bench
from mindyouzhi.eval.bootstrap import task_metric
from mindyouzhi.eval.tasks.amounts import gold_amount, score_amount
from mindyouzhi.eval.tasks.base import GenerationItem

QUIET = BenchSettings(progress=False)


def item(gold: str) -> GenerationItem:
    return GenerationItem("x", "g", "prompt", gold)


@pytest.mark.parametrize("gold, response, correct", [
    # to_lower: the gold's style is not asked for; the value is.
    ("RMB 82,108,000.70", "82108000.70元", True),
    ("RMB 82,108,000.70", "¥82,108,000.70", True),
    ("0.26", "0.26元", True),
    ("¥3348.14", "小写金额为¥3,348.14。", True),
    ("88706000.79元", "88706000.97元", False),
    ("¥3348.14", "\"叁仟叁佰肆拾捌元壹角肆分\"", False),        # echoes the uppercase prompt
    ("¥3348.14", "3,34,8.14", False),                            # malformed grouping: first number is wrong
    # to_upper: any spelling the PBoC rules accept, the gold's prefix not required.
    ("人民币柒仟捌佰叁拾贰元零陆分", "人民币柒仟捌佰叁拾贰元零陆分", True),
    ("人民币柒仟捌佰叁拾贰元零陆分", "柒仟捌佰叁拾贰元零陆分", True),
    ("人民币柒仟捌佰叁拾贰元零陆分", "柒仟捌佰叁拾贰元陆分", False),  # 零 after 元 is required before 分
    ("价税合计（大写）：捌佰伍拾贰万玖仟贰佰贰拾柒元贰角", "捌佰伍拾贰万玖仟贰佰贰拾柒元贰角整", True),
    ("壹仟陆佰捌拾元叁角贰分", "壹仟陆佰捌拾元零叁角贰分", True),   # the optional 零
    ("人民币柒仟捌佰叁拾贰元零陆分", "支票金额为¥7,832.06,请按照票据填写规范写出大写金额。", False),  # echo
    ("人民币肆仟零捌拾亿伍仟万壹仟元捌角柒分", "人民币肆仟零捌拾亿伍仟万壹仟元捌角", False),
    # The first uppercase run decides: a wrong one is not rescued by a right one later.
    ("壹佰元整", "壹佰零元整，即壹佰元整", False),
    # ... but a restated unit without a digit is not an amount.
    ("伍仟元整", "5000元整的大写是伍仟元整", True),
    # Traditional forms are accepted, and read whole: 萬/億 are part of the amount.
    ("陆元整", "陸元整", True),
    ("壹元整", "壹圓整", True),
    ("伍仟元整", "壹萬伍仟元整", False),
    ("伍佰元整", "叁億伍佰元整", False),
    # A number is read whole: more digits, a third decimal or a sign make it another (or no) amount.
    ("¥3348.14", "3348.149", False),
    ("0.26", "0.260", False),
    ("0.26", "-0.26", False),
    ("0.26", "0.26.", True),
])
def test_amount_value_scoring(gold, response, correct):
    assert score_amount(response, item(gold))["correct"] is correct


def test_exact_match_is_reported_beside_the_value():
    assert score_amount(" 0.26 ", item("0.26"))["exact"] is True
    row = score_amount("0.26元", item("0.26"))
    assert row["exact"] is False and row["correct"] is True


def test_gold_direction_and_value():
    assert gold_amount("价税合计（大写）：捌佰伍拾贰万玖仟贰佰贰拾柒元贰角") == (True, 852922720)
    assert gold_amount("RMB 82,108,000.70") == (False, 8210800070)
    with pytest.raises(ValueError, match="no Arabic amount"):
        gold_amount("不知道")


def test_rmb_amounts_task_end_to_end(tmp_path):
    records = [
        {"id": "a", "prompt": "把大写金额\"贰角陆分\"转换成小写数字。", "answer": "0.26", "group": "to_lower"},
        {"id": "b", "prompt": "支票金额为¥7,832.06，请写出大写金额。", "answer": "人民币柒仟捌佰叁拾贰元零陆分",
         "group": "to_upper"},
        {"id": "c", "prompt": "请把\"捌仟捌佰柒拾万零陆仟元柒角玖分\"换算成小写金额。", "answer": "88706000.79元",
         "group": "to_lower"},
    ]
    data = tmp_path / "amounts.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    answers = {"贰角陆分": "0.26", "7,832.06": "人民币柒仟捌佰叁拾贰元零陆分", "捌仟捌佰": "捌仟捌佰柒拾万零陆仟元柒角玖分"}
    lm = ScriptedLM(PieceTokenizer(), lambda prompt: next(v for k, v in answers.items() if k in prompt))
    result = run_bench(lm, "rmb-amounts", data, settings=QUIET)
    assert result["primary_metric"] == "amount_correct"
    assert result["metrics"]["amount_correct"] == pytest.approx(2 / 3)
    assert result["metrics"]["exact_match"] == pytest.approx(2 / 3)
    assert result["groups"]["to_lower"] == {"n": 2, "amount_correct": 0.5, "exact_match": 0.5}
    # The bootstrap resamples rows with the same aggregate.
    assert task_metric("rmb-amounts", "amount_correct")(result["items"]) == pytest.approx(2 / 3)


def test_a_gold_without_an_amount_is_refused_naming_the_record(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"id": "q7", "prompt": "p", "answer": "不知道"}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.jsonl: q7: rmb-amounts: no Arabic amount"):
        run_bench(ScriptedLM(PieceTokenizer(), lambda _: ""), "rmb-amounts", data, settings=QUIET)
