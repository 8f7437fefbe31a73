"""Uppercase RMB amounts: PBoC worked examples, 10k round trips, agreement with cn2an, the generator."""
from __future__ import annotations

import datetime as dt
import json
import random

import cn2an
import pytest
from click.testing import CliRunner

from mindyouzhi.datagen.amount_tasks import AmountTaskSettings, generate_items, load_seeds, template_from_seed
from mindyouzhi.datagen.amounts import (MAX_CENTS, accepted_spellings, date_from_upper, date_to_upper, format_cents,
                                        parse_arabic, to_lower, to_upper)
from mindyouzhi.datagen.cli import data
from mindyouzhi.datagen.jsonl import BadLines
from mindyouzhi.errors import UserError

# The regulation's worked examples (《正确填写票据和结算凭证的基本规定》) and the brief's cases.
WORKED = [
    ("1,409.50", "壹仟肆佰零玖元伍角"),
    ("6,007.14", "陆仟零柒元壹角肆分"),
    ("1,680.32", "壹仟陆佰捌拾元叁角贰分"),
    ("107,000.53", "壹拾万柒仟元伍角叁分"),
    ("16,409.02", "壹万陆仟肆佰零玖元零贰分"),
    ("325.04", "叁佰贰拾伍元零肆分"),
    ("150.00", "壹佰伍拾元整"),
    ("0.05", "伍分"),
    ("0.50", "伍角"),
    ("100,000,000", "壹亿元整"),
    ("100,010,000", "壹亿零壹万元整"),
    ("1,000,000,001", "壹拾亿零壹元整"),
    ("1,000,000,000,000", "壹万亿元整"),
    ("9,999,999,999,999.99", "玖万玖仟玖佰玖拾玖亿玖仟玖佰玖拾玖万玖仟玖佰玖拾玖元玖角玖分"),
]
# Spellings the rules also allow (optional 零, 拾 for a leading 壹拾, 正 for 整, 整 after 角, traditional forms).
ALTERNATIVES = [
    ("人民币壹仟陆佰捌拾元零叁角贰分", "1680.32"),
    ("壹拾万柒仟元零伍角叁分", "107000.53"),
    ("壹拾万零柒仟元伍角叁分", "107000.53"),
    ("拾万柒仟元伍角叁分", "107000.53"),
    ("壹仟肆佰零玖元伍角整", "1409.50"),
    ("壹佰伍拾元正", "150.00"),
    ("貳萬元整", "20000.00"),
    ("壹億圓整", "100000000.00"),
    ("陸佰元整", "600.00"),
]
REJECTED = ["一百元", "壹佰伍拾元", "壹仟陆佰捌拾元叁角贰分整", "陆仟零零柒元整", "壹佰拾元整", "零伍分", "伍角贰",
            "壹佰伍拾", "壹拾元零角伍分", "元整", ""]


def random_cents(rng: random.Random) -> int:
    """Log-uniform magnitudes over the whole range, with zero-rich digit patterns mixed in."""
    if rng.random() < 0.4:
        digits = rng.randint(1, 15)
        value = int("".join(rng.choice("0000123456789") for _ in range(digits)))
    else:
        value = int(10 ** rng.uniform(0, 15))
    return min(max(value, 1), MAX_CENTS)


@pytest.mark.parametrize("arabic,upper", WORKED)
def test_worked_examples(arabic, upper):
    cents = parse_arabic(arabic)
    assert to_upper(cents) == upper
    assert to_lower(upper) == cents
    assert to_lower("人民币" + upper) == cents


@pytest.mark.parametrize("upper,arabic", ALTERNATIVES)
def test_alternative_forms_are_accepted(upper, arabic):
    assert format_cents(to_lower(upper)) == arabic


@pytest.mark.parametrize("text", REJECTED)
def test_invalid_forms_are_rejected(text):
    with pytest.raises(UserError):
        to_lower(text)


def test_round_trip_10k_and_cn2an_agreement():
    rng = random.Random(20240601)
    amounts = [1, MAX_CENTS] + [random_cents(rng) for _ in range(10_000)]
    no_choice = 0
    for cents in amounts:
        upper = to_upper(cents)
        assert to_lower(upper) == cents, (cents, upper)
        reference = cn2an.an2cn(format_cents(cents), "rmb")
        spellings = accepted_spellings(cents)
        assert reference in spellings, (format_cents(cents), reference)
        # Where the rules leave no choice (正/整 and 整 after 角 aside), the spelling must be cn2an's.
        choices = {s for s in spellings if "正" not in s and not s.endswith("角整")}
        if len(choices) == 1:
            no_choice += 1
            assert upper == reference, (format_cents(cents), upper, reference)
    assert no_choice > 3000  # the comparison really covered many amounts


def test_every_accepted_spelling_reads_back():
    rng = random.Random(7)
    for cents in [random_cents(rng) for _ in range(300)]:
        for spelling in accepted_spellings(cents):
            assert to_lower(spelling) == cents


def test_arabic_parsing_errors():
    for bad in ("1.234", "-5", "abc", "1,23.00", "10000000000000.00"):
        with pytest.raises(UserError):
            parse_arabic(bad)
    assert parse_arabic("¥1,680.32") == parse_arabic("1680.32元") == 168032


def test_cheque_dates():
    assert date_to_upper(dt.date(2024, 1, 15)) == "贰零贰肆年零壹月壹拾伍日"
    assert date_to_upper(dt.date(2024, 10, 20)) == "贰零贰肆年零壹拾月零贰拾日"
    assert date_to_upper(dt.date(2023, 12, 31)) == "贰零贰叁年壹拾贰月叁拾壹日"
    assert date_from_upper("贰零贰肆年零壹月壹拾伍日") == dt.date(2024, 1, 15)
    with pytest.raises(UserError):
        date_from_upper("贰零贰肆年壹月壹拾伍日")  # month 1 needs the protective 零


def test_cli_conversions():
    runner = CliRunner()
    assert runner.invoke(data, ["amounts", "to-upper", "150.00"]).output == "壹佰伍拾元整\n"
    assert runner.invoke(data, ["amounts", "to-lower", "壹佰伍拾元整"]).output == "150.00\n"
    assert runner.invoke(data, ["amounts", "to-lower", "人民币壹拾万零柒仟元伍角叁分"]).output == "107000.53\n"
    result = runner.invoke(data, ["amounts", "to-lower", "--json", "拾万柒仟元伍角叁分"])
    assert json.loads(result.stdout) == {"upper": "拾万柒仟元伍角叁分", "amount": "107000.53",
                                         "canonical": "壹拾万柒仟元伍角叁分"}
    bad = runner.invoke(data, ["amounts", "to-lower", "一百元"])
    assert bad.exit_code == 2 and bad.output.startswith("error: ") and "Traceback" not in bad.output


def test_generator_is_verified_deduplicated_and_deterministic(tmp_path):
    templates = load_seeds(None, BadLines(), skip_bad=False)
    assert len(templates) >= 30 and {t.direction for t in templates} == {"to_upper", "to_lower"}
    stats = {"verification_failed": [], "duplicates_dropped": 0}
    items = list(generate_items(templates, AmountTaskSettings(count=600, seed=5, evolve_ratio=0.4), stats))
    assert len(items) == 600 and not stats["verification_failed"]
    assert len({item["instruction"] for item in items}) == 600
    kinds = {item["kind"] for item in items}
    assert {"amplified", "evolved:invoice_total", "evolved:vat_total", "evolved:cheque_date", "evolved:error_check",
            "evolved:compare", "evolved:wan_units"} <= kinds
    for item in items:
        cents = parse_arabic(item["amount"])
        if item["kind"] == "amplified" and item["direction"] == "to_upper":
            assert to_upper(cents) in item["output"]
        if item["kind"] == "amplified" and item["direction"] == "to_lower":
            assert to_upper(cents) in item["instruction"] or any(s in item["instruction"] for s in accepted_spellings(cents))
    again = list(generate_items(templates, AmountTaskSettings(count=600, seed=5, evolve_ratio=0.4),
                                {"verification_failed": [], "duplicates_dropped": 0}))
    assert again == items


def test_wrong_seed_is_reported(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps({"instruction": "把¥150.00写成大写", "output": "壹佰伍拾元整"}, ensure_ascii=False) + "\n"
                     + json.dumps({"instruction": "把¥150.00写成大写", "output": "壹佰伍拾伍元整"}, ensure_ascii=False) + "\n"
                     + "{not json\n", encoding="utf-8")
    runner = CliRunner()
    failed = runner.invoke(data, ["amounts", "generate", "--seeds", str(seeds), "--out", str(tmp_path / "o.jsonl"),
                                  "--count", "5"])
    assert failed.exit_code == 2 and f"{seeds}:2" in failed.output
    ok = runner.invoke(data, ["amounts", "generate", "--seeds", str(seeds), "--out", str(tmp_path / "o.jsonl"),
                              "--count", "5", "--skip-bad", "--json", "--evolve-ratio", "0"])
    assert ok.exit_code == 0, ok.output
    summary = json.loads(ok.stdout)
    assert summary["items"] == 5 and summary["skipped_lines"]["count"] == 2
    assert [entry["line"] for entry in summary["skipped_lines"]["lines"]] == [2, 3]
    with pytest.raises(ValueError):
        template_from_seed("x", "两笔金额¥1.00和¥2.00", "壹元整")
