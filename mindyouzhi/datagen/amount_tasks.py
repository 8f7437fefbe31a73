"""``data amounts generate``: amplify a few dozen seed samples into varied, verified amount tasks.

A seed is an ordinary instruction/output pair with one amount in the instruction (lowercase for
"write it in uppercase", uppercase for "write it in figures").  The generator finds that amount,
checks the seed's answer with the converter, and turns the seed into a template.  Items are then

* **amplified** seeds: the template re-filled with a fresh amount, drawn so that the hard cases of
  the rules (zeros inside, 万/亿 boundaries, 角 = 0 with 分 ≠ 0, whole yuan, only 角/分) are frequent,
  and written in varied lowercase styles (¥1,680.32 / 1680.32元 / 人民币…); uppercase inputs
  sometimes use an alternative spelling the rules allow;
* **evolved** variants (in the spirit of Evol-Instruct's deepening): sum an invoice's lines, add
  VAT, write a cheque's date and amount, check a written amount for errors, compare two uppercase
  amounts, convert from 万元.

With an LLM (``--llm-url``, any OpenAI-compatible server) the seed set itself is amplified first:
**Self-Instruct** (the LLM is shown a few seed instructions of one direction and writes a new one
for another business scene) and **Evol-Instruct** deepening (the LLM rewrites one seed with a
concrete context or a format requirement).  The LLM writes only the instruction, with the
``{amount}`` placeholder where the amount goes; answers always come from the converter.  A reply is
kept as a new template only if it holds the placeholder exactly once and no other digit or
uppercase amount (so the amount asked is unambiguous) and is not a duplicate; rejections are
counted by reason.

Every uppercase or lowercase amount in an answer is parsed back and compared with the value it
must have before the item is written; duplicates (same normalised instruction) are dropped and
counted.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import random
import re
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from importlib import resources
from pathlib import Path
from typing import Optional

import yaml

from ..errors import UserError
from .amounts import (DIGITS, MAX_CENTS, accepted_spellings, date_to_upper, format_cents, normalize_upper,
                      parse_arabic, to_lower, to_upper)
from .jsonl import BadLines, read_jsonl
from .llm_client import LLMClient, LLMError

UPPER_RE = re.compile(r"(?:人民币)?[零壹贰叁肆伍陆柒捌玖拾佰仟万亿元角分整正]{2,}")
ARABIC_RE = re.compile(r"(?:[¥￥]|人民币|RMB ?)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d{1,2})?(?:元)?")
SCENARIOS = (("cheque", ("支票", "汇票", "票据")), ("invoice", ("发票", "价税合计", "开票", "报销")),
             ("transfer", ("转账", "汇款", "电汇", "进账单", "凭证")), ("receipt", ("收据", "借条", "工资条")),
             ("contract", ("合同",)))


# --------------------------------------------------------------------------------------------
# Lowercase styles
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArabicStyle:
    prefix: str = "¥"  # '¥', '￥', '人民币', 'RMB ' or ''
    thousands: bool = True
    always_cents: bool = True
    suffix: str = ""  # '' or '元'

    @classmethod
    def of(cls, text: str) -> "ArabicStyle":
        prefix = next((p for p in ("¥", "￥", "人民币", "RMB ", "RMB") if text.startswith(p)), "")
        body = text[len(prefix):].rstrip("元")
        return cls("RMB " if prefix.startswith("RMB") else prefix, "," in body, "." in body,
                   "元" if text.endswith("元") else "")

    def render(self, cents: int) -> str:
        body = format_cents(cents, self.thousands)
        if not self.always_cents and body.endswith(".00"):
            body = body[:-3]
        return f"{self.prefix}{body}{self.suffix}"


STYLES = (ArabicStyle("¥", True, True, ""), ArabicStyle("", False, True, "元"), ArabicStyle("", True, False, "元"),
          ArabicStyle("人民币", True, True, "元"), ArabicStyle("RMB ", True, True, ""), ArabicStyle("", False, False, "元"))


# --------------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SeedTemplate:
    seed_id: str
    direction: str  # 'to_upper' or 'to_lower'
    scenario: str
    instruction: str  # with {amount}
    output: str  # with {answer}
    style: ArabicStyle  # of the lowercase amount (in the instruction or in the answer)
    upper_prefix: bool  # the uppercase amount carries 人民币


def _scenario(text: str) -> str:
    return next((name for name, words in SCENARIOS if any(word in text for word in words)), "general")


def _upper_spans(text: str) -> list[tuple[re.Match, int]]:
    spans = []
    for match in UPPER_RE.finditer(text):
        try:
            spans.append((match, to_lower(match.group())))
        except UserError:
            continue
    return spans


def _arabic_spans(text: str) -> list[tuple[re.Match, int]]:
    spans = []
    for match in ARABIC_RE.finditer(text):
        try:
            spans.append((match, parse_arabic(match.group().replace("人民币", "").replace("RMB ", "RMB"))))
        except UserError:
            continue
    return spans


def template_from_seed(seed_id: str, instruction: str, output: str) -> SeedTemplate:
    """Raise ValueError naming what is wrong with the seed (the reader reports it with file:line)."""
    uppers = _upper_spans(instruction)
    if len(uppers) == 1:
        match, cents = uppers[0]
        answers = [(m, v) for m, v in _arabic_spans(output) if v == cents]
        if not answers:
            raise ValueError(f"output {output!r} does not contain {format_cents(cents)}, the value of {match.group()!r}")
        answer = answers[0][0]
        return SeedTemplate(seed_id, "to_lower", _scenario(instruction),
                            instruction[:match.start()] + "{amount}" + instruction[match.end():],
                            output[:answer.start()] + "{answer}" + output[answer.end():],
                            ArabicStyle.of(answer.group()), match.group().startswith("人民币"))
    if uppers:
        raise ValueError("the instruction holds more than one uppercase amount")
    arabic = _arabic_spans(instruction)
    if len(arabic) != 1:
        raise ValueError(f"expected exactly one amount in the instruction, found {len(arabic)}")
    match, cents = arabic[0]
    answers = [(m, v) for m, v in _upper_spans(output) if v == cents]
    if not answers:
        raise ValueError(f"output {output!r} is not a valid uppercase spelling of {format_cents(cents)} "
                         f"(expected {to_upper(cents)})")
    answer = answers[0][0]
    return SeedTemplate(seed_id, "to_upper", _scenario(instruction),
                        instruction[:match.start()] + "{amount}" + instruction[match.end():],
                        output[:answer.start()] + "{answer}" + output[answer.end():],
                        ArabicStyle.of(match.group()), answer.group().startswith("人民币"))


def _validate_seed(data: dict) -> tuple[str, str]:
    instruction, output = data.get("instruction"), data.get("output")
    if not isinstance(instruction, str) or not isinstance(output, str):
        raise ValueError("a seed needs string fields 'instruction' and 'output'")
    return instruction, output


def load_seeds(path: Optional[str], bad_lines: BadLines, skip_bad: bool) -> list[SeedTemplate]:
    if path is None:
        text = resources.files("mindyouzhi.datagen").joinpath("amount_seeds.yaml").read_text(encoding="utf-8")
        entries = yaml.safe_load(text)["seeds"]
        return [template_from_seed(f"builtin-{i:02d}", e["instruction"], e["output"]) for i, e in enumerate(entries)]
    templates = []
    for record in read_jsonl(path, bad_lines, skip_bad, _validate_seed):
        instruction, output = record.parsed
        try:
            templates.append(template_from_seed(f"{Path(path).name}:{record.line_no}", instruction, output))
        except ValueError as exc:
            if not skip_bad:
                raise UserError(f"{path}:{record.line_no}: bad seed: {exc} (pass --skip-bad to skip such seeds)") from None
            bad_lines.add(Path(path), record.line_no, f"bad seed: {exc}")
    if not templates:
        raise UserError(f"--seeds {path}: no usable seed")
    return templates


# --------------------------------------------------------------------------------------------
# Amounts that exercise the rules
# --------------------------------------------------------------------------------------------
def sample_amount(rng: random.Random, max_yuan_digits: int = 13) -> int:
    kind = rng.choices(("uniform", "sparse", "boundary", "jiao_zero", "whole", "cents_only", "round"),
                       weights=(3, 3, 2, 2, 2, 1, 1))[0]
    # Everyday amounts (up to 8 digits) dominate; the 亿 and 万亿 ranges still appear regularly.
    digits = rng.choices(range(1, max_yuan_digits + 1), weights=[3 if d <= 8 else 1 for d in range(1, max_yuan_digits + 1)])[0]
    if kind == "cents_only":
        return rng.randint(1, 99)
    if kind == "sparse":  # many zeros inside the number
        yuan = int(str(rng.randint(1, 9)) + "".join(rng.choice("0000123456789") for _ in range(digits - 1)))
    elif kind == "boundary":  # 万位 or 亿位 is 0 and the 千位 below is not: the optional 零
        high = rng.randint(1, 999) * 10
        yuan = high * 10**4 + rng.randint(1, 9) * 1000 + rng.choice((0, rng.randint(0, 999)))
        if rng.random() < 0.3 and yuan < 10**9:
            yuan = yuan * 10**4 + rng.randint(1, 9) * 1000
    elif kind == "round":
        yuan = rng.randint(1, 9999) * 10 ** rng.randint(2, 8)
    else:
        yuan = rng.randint(10 ** (digits - 1), 10**digits - 1)
    cents = {"jiao_zero": rng.randint(1, 9), "whole": 0}.get(kind, rng.randint(0, 99))
    if kind == "boundary" and rng.random() < 0.5:
        yuan = yuan // 10 * 10  # 元位 0 too: the optional 零 before 角
        cents = rng.randint(1, 9) * 10 + rng.randint(0, 9)
    return min(yuan * 100 + cents, MAX_CENTS)


def _money(cents: int) -> Decimal:
    return Decimal(cents) / 100


def _cents(value: Decimal) -> int:
    return int((value * 100).quantize(Decimal(1), rounding=ROUND_HALF_UP))


# --------------------------------------------------------------------------------------------
# Items
# --------------------------------------------------------------------------------------------
@dataclass
class Item:
    instruction: str
    output: str
    kind: str
    direction: str
    scenario: str
    amount: int
    checks: list  # (text, cents, 'upper'|'arabic'): every amount the answer states, with its true value


def amplify(template: SeedTemplate, rng: random.Random) -> Item:
    cents = sample_amount(rng)
    style = template.style if rng.random() < 0.7 else STYLES[rng.randrange(len(STYLES))]
    prefix = "人民币" if template.upper_prefix else ""
    if template.direction == "to_upper":
        shown, answer = style.render(cents), prefix + to_upper(cents)
        checks = [(answer, cents, "upper")]
    else:
        spellings = sorted(accepted_spellings(cents))
        upper = to_upper(cents) if rng.random() < 0.75 else spellings[rng.randrange(len(spellings))]
        shown, answer = prefix + upper, style.render(cents)
        checks = [(answer, cents, "arabic")]
    return Item(template.instruction.replace("{amount}", shown), template.output.replace("{answer}", answer),
                "amplified", template.direction, template.scenario, cents, checks)


LINE_ITEMS = ("办公用品", "打印纸", "会议服务费", "运输费", "技术咨询费", "设备维修费", "软件授权费", "差旅住宿费")


def evolve_invoice_total(rng: random.Random) -> Item:
    count = rng.randint(2, 4)
    names = rng.sample(LINE_ITEMS, count)
    lines = [rng.randint(100, 5_000_000) for _ in names]
    total = _cents(sum((_money(c) for c in lines), Decimal(0)))
    listing = "；".join(f"{name}¥{format_cents(c, True)}" for name, c in zip(names, lines))
    upper = to_upper(total)
    return Item(f"报销单包含以下几项费用：{listing}。请计算合计金额，并写出合计金额的中文大写。",
                f"合计金额：¥{format_cents(total, True)}\n合计金额（大写）：人民币{upper}",
                "evolved:invoice_total", "to_upper", "invoice", total,
                [(upper, total, "upper"), (f"¥{format_cents(total, True)}", total, "arabic")])


def evolve_vat(rng: random.Random) -> Item:
    net = rng.randint(10_000, 50_000_000)
    rate = rng.choice((13, 9, 6))
    tax = _cents(_money(net) * rate / 100)
    gross = net + tax
    upper = to_upper(gross)
    return Item(f"一批货物的不含税金额为¥{format_cents(net, True)}，适用增值税税率{rate}%。请计算税额和价税合计"
                f"（四舍五入保留两位小数），并写出价税合计的中文大写金额。",
                f"税额：¥{format_cents(net, True)} × {rate}% = ¥{format_cents(tax, True)}\n"
                f"价税合计：¥{format_cents(gross, True)}\n价税合计（大写）：{upper}",
                "evolved:vat_total", "to_upper", "invoice", gross,
                [(upper, gross, "upper"), (f"¥{format_cents(gross, True)}", gross, "arabic")])


def evolve_cheque(rng: random.Random) -> Item:
    cents = sample_amount(rng, max_yuan_digits=9)
    date = dt.date(2020, 1, 1) + dt.timedelta(days=rng.randint(0, 2555))
    upper = to_upper(cents)
    return Item(f"请按照票据填写规范，写出转账支票的出票日期{date.year}年{date.month}月{date.day}日"
                f"和金额¥{format_cents(cents, True)}的中文大写。",
                f"出票日期：{date_to_upper(date)}\n金额：人民币{upper}",
                "evolved:cheque_date", "to_upper", "cheque", cents, [(upper, cents, "upper")])


def _mutations(upper: str, cents: int) -> list[tuple[str, str]]:
    """Wrong spellings of ``upper`` with the reason a checker would give."""
    found = []
    if "零" in upper:
        index = upper.index("零")
        found.append((upper[:index] + upper[index + 1:], "缺少必须书写的“零”字"))
        found.append((upper[:index] + "零零" + upper[index + 1:], "连续的“0”只能写一个“零”字"))
    if upper.endswith("分"):
        found.append((upper + "整", "金额有“分”的，“分”后面不写“整”字"))
    if upper.endswith("元整"):
        found.append((upper[:-1], "金额到“元”为止的，“元”后必须写“整”（或“正”）字"))
    lowercase = dict(zip("壹贰叁肆伍陆柒捌玖", "一二三四五六七八九"))
    digit_positions = [i for i, ch in enumerate(upper) if ch in lowercase]
    if digit_positions:
        i = digit_positions[0]
        found.append((upper[:i] + lowercase[upper[i]] + upper[i + 1:], "大写金额不得使用“一、二、三”等小写数字"))
        j = digit_positions[-1]
        wrong_digit = DIGITS[(DIGITS.index(upper[j]) % 9) + 1]
        found.append((upper[:j] + wrong_digit + upper[j + 1:], "大写金额与小写金额不一致"))
    return found


def evolve_error_check(rng: random.Random) -> Item:
    cents = sample_amount(rng, max_yuan_digits=10)
    canonical = to_upper(cents)
    shown_arabic = f"¥{format_cents(cents, True)}"
    choice = rng.random()
    mutations = [(text, reason) for text, reason in _mutations(canonical, cents) if not _is_valid_for(text, cents)]
    if choice < 0.6 and mutations:
        written, reason = mutations[rng.randrange(len(mutations))]
        output = f"不正确。{reason}。正确写法应为：人民币{canonical}"
    else:
        spellings = sorted(accepted_spellings(cents))
        written = spellings[rng.randrange(len(spellings))]
        if written == canonical:
            output = f"正确。大写金额“{written}”与小写金额{shown_arabic}一致，书写规范。"
        else:
            output = (f"正确。“{written}”是《正确填写票据和结算凭证的基本规定》允许的写法，与小写金额{shown_arabic}一致；"
                      f"更常用的写法是：人民币{canonical}")
    return Item(f"请核对：支票小写金额为{shown_arabic}，大写金额写作“{written}”。大写是否正确、规范？如有问题请说明原因并给出正确写法。",
                output, "evolved:error_check", "check", "cheque", cents, [(canonical, cents, "upper")])


def _is_valid_for(text: str, cents: int) -> bool:
    try:
        return to_lower(text) == cents
    except UserError:
        return False


def evolve_compare(rng: random.Random) -> Item:
    first, second = sample_amount(rng, 9), sample_amount(rng, 9)
    while second == first:
        second = sample_amount(rng, 9)
    larger, difference = ("第一张", first - second) if first > second else ("第二张", second - first)
    big = max(first, second)
    upper = to_upper(difference)
    return Item(f"两张转账凭证的大写金额分别为“{to_upper(first)}”和“{to_upper(second)}”。哪一张金额更大？"
                f"两者相差多少？请分别用小写和大写写出差额。",
                f"{larger}金额更大（¥{format_cents(big, True)}）。\n第一张：¥{format_cents(first, True)}；"
                f"第二张：¥{format_cents(second, True)}\n差额：¥{format_cents(difference, True)}，大写为{upper}",
                "evolved:compare", "to_lower", "transfer", difference,
                [(upper, difference, "upper"), (f"¥{format_cents(first, True)}", first, "arabic"),
                 (f"¥{format_cents(second, True)}", second, "arabic")])


def evolve_wan(rng: random.Random) -> Item:
    # Whole thousands (3.5万元), whole yuan (12.3456万元) or cents (0.012345万元).
    cents = rng.choice((rng.randint(1, 99_999) * 100_000, rng.randint(1, 9_999_999) * 100, rng.randint(1, 999_999_999)))
    wan = (_money(cents) / 10_000).normalize()
    text = f"{wan:f}"
    upper = to_upper(cents)
    return Item(f"合同约定的金额为{text}万元，请写出对应的中文大写金额。", f"人民币{upper}",
                "evolved:wan_units", "to_upper", "contract", cents, [(upper, cents, "upper")])


EVOLUTIONS = {"invoice_total": evolve_invoice_total, "vat_total": evolve_vat, "cheque_date": evolve_cheque,
              "error_check": evolve_error_check, "compare": evolve_compare, "wan_units": evolve_wan}


def verify(item: Item) -> Optional[str]:
    """None when every amount the answer states has the value it must have, else the reason."""
    for text, cents, kind in item.checks:
        if text not in item.output:
            return f"answer does not contain {text!r}"
        try:
            value = to_lower(text) if kind == "upper" else parse_arabic(text.replace("人民币", ""))
        except UserError as exc:
            return str(exc)
        if value != cents:
            return f"{text!r} reads as {format_cents(value)}, expected {format_cents(cents)}"
    if item.kind == "evolved:wan_units":
        wan = re.search(r"为([\d.]+)万元", item.instruction).group(1)
        if _cents(Decimal(wan) * 10_000) != item.amount:
            return "万元 figure does not match the amount"
    return None


def normalized_key(text: str) -> str:
    return hashlib.sha1(re.sub(r"[\s\W_]+", "", normalize_upper(text)).encode("utf-8")).hexdigest()


@dataclass
class AmountTaskSettings:
    count: int
    seed: int = 0
    evolve_ratio: float = 0.3
    max_attempts_factor: int = 5


def generate_items(templates: list[SeedTemplate], settings: AmountTaskSettings, stats: dict):
    """Yield up to ``count`` verified, deduplicated items (as dicts)."""
    if not 0 <= settings.evolve_ratio <= 1:
        raise UserError(f"--evolve-ratio {settings.evolve_ratio}: expected a value in [0, 1]")
    seen: set[str] = set()
    made = 0
    for attempt in range(settings.count * settings.max_attempts_factor):
        if made >= settings.count:
            break
        rng = random.Random(f"amounts:{settings.seed}:{attempt}")
        if rng.random() < settings.evolve_ratio:
            name = sorted(EVOLUTIONS)[rng.randrange(len(EVOLUTIONS))]
            item = EVOLUTIONS[name](rng)
            seed_id = None
        else:
            template = templates[rng.randrange(len(templates))]
            item = amplify(template, rng)
            seed_id = template.seed_id
        problem = verify(item)
        if problem is not None:
            stats["verification_failed"].append({"attempt": attempt, "kind": item.kind, "reason": problem})
            continue
        key = normalized_key(item.instruction)
        if key in seen:
            stats["duplicates_dropped"] += 1
            continue
        seen.add(key)
        made += 1
        yield {"id": f"amount-{made:07d}", "instruction": item.instruction, "output": item.output, "kind": item.kind,
               "direction": item.direction, "scenario": item.scenario, "amount": format_cents(item.amount),
               "seed_id": seed_id}


# --------------------------------------------------------------------------------------------
# LLM amplification of the seed instructions (Self-Instruct, Evol-Instruct)
# --------------------------------------------------------------------------------------------
TASK_WORDS = {"to_upper": "写成中文大写金额", "to_lower": "写成阿拉伯数字金额"}
SELF_INSTRUCT_PROMPT = (
    "下面几条指令都要求把金额{task}，金额处用占位符 {{amount}} 表示：\n{examples}\n"
    "请仿照它们写一条新的指令，换一个真实的业务场景（如{scene}），要求不变。金额处只写 {{amount}}，"
    "不要出现任何其他数字。只输出这条指令。"
)
EVOL_PROMPT = (
    "请把下面这条指令改写得更具体、更贴近真实业务：加入一个业务背景或一项格式要求，但任务不变——仍然只要求把 "
    "{{amount}} 处的金额{task}。金额处只写 {{amount}}，不要出现任何其他数字。只输出改写后的指令。\n\n指令：{instruction}"
)
EVOL_SCENES = ("报销单", "工程合同", "银行进账单", "工资发放", "货款结算", "租赁押金", "保险理赔", "借款协议")


def check_llm_instruction(text: str, known: set) -> Optional[str]:
    """None when an LLM-written instruction template is usable, else the reason it is not."""
    text = text.strip().strip('"“”')
    if text.count("{amount}") != 1:
        return "placeholder {amount} not exactly once"
    rest = text.replace("{amount}", "")
    if re.search(r"\d", rest) or _upper_spans(rest):
        return "another amount or number in the instruction"
    if not 8 <= len(text) <= 300:
        return "length outside 8-300 characters"
    if normalized_key(text) in known:
        return "duplicate of an existing template"
    return None


def llm_templates(client: LLMClient, templates: list[SeedTemplate], rounds: int, seed: int, stats: dict) -> list:
    """Up to ``rounds`` new templates, alternating Self-Instruct and Evol-Instruct requests."""
    known = {normalized_key(template.instruction) for template in templates}
    made = []
    for index in range(rounds):
        rng = random.Random(f"amounts-llm:{seed}:{index}")
        pool = templates + made
        base = pool[rng.randrange(len(pool))]
        same = [template for template in pool if template.direction == base.direction]
        if index % 2 == 0:
            method = "self-instruct"
            examples = rng.sample(same, min(3, len(same)))
            prompt = SELF_INSTRUCT_PROMPT.format(task=TASK_WORDS[base.direction], scene=rng.choice(EVOL_SCENES),
                                                 examples="\n".join(f"- {example.instruction}" for example in examples))
        else:
            method = "evol-instruct"
            prompt = EVOL_PROMPT.format(task=TASK_WORDS[base.direction], instruction=base.instruction)
        try:
            reply = client.ask(prompt, temperature=0.8, seed=seed * 1_000_003 + index, max_tokens=256)
        except LLMError as exc:
            stats["llm_rejected"][f"{method}: {exc}"[:80]] += 1
            continue
        text = reply.strip().splitlines()[0].strip().strip('"“”') if reply.strip() else ""
        problem = check_llm_instruction(text, known)
        if problem is not None:
            stats["llm_rejected"][f"{method}: {problem}"] += 1
            continue
        known.add(normalized_key(text))
        made.append(SeedTemplate(f"llm-{method}-{index:04d}", base.direction, _scenario(text), text, base.output,
                                 base.style, base.upper_prefix))
        stats["llm_templates"][method] += 1
    return made
