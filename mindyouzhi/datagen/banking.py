"""``data banking``: mobile-banking dialogues with gold intent and slot labels.

Intents are two-level — L1 loan / wealth / transfer / other, each with L2 sub-intents — and the
slots are amount (Arabic, 万, everyday Chinese numerals or the uppercase RMB form), term, rate,
account, date and time.  A dialogue states some slots in the first user turn; the assistant asks for
the missing required ones and the user answers, so both single- and multi-turn slot filling occur.

Gold labels are normalised values (amount "5000.00", term ISO-8601 "P12M", rate "3.50" percent,
account "tail:1234" / "no:…" / "name:张三" / "type:工资卡", date "2024-05-20", time "15:00") plus the
character span of every slot mention, so the same file serves SFT (``messages``) and evaluation
(``data banking eval``).
"""
from __future__ import annotations

import datetime as dt
import json
import random
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

from .amounts import format_cents, integer_to_chinese, to_upper
from .llm_client import extract_json

SLOTS = ("amount", "term", "rate", "account", "date", "time")


@dataclass(frozen=True)
class SubIntent:
    l1: str
    l2: str
    required: tuple
    optional: tuple
    openers: tuple  # first-turn templates; {slot} placeholders are filled with surface forms


INTENTS = (
    SubIntent("loan", "loan_apply", ("amount", "term"), ("rate",),
              ("我想申请一笔{amount}的贷款，期限{term}", "能不能贷{amount}？", "我要借款{amount}，分{term}还",
               "想办个消费贷，额度{amount}左右", "我想申请贷款")),
    SubIntent("loan", "loan_repay", ("amount", "account"), ("date",),
              ("帮我用{account}还{amount}贷款", "我要还这个月的房贷{amount}", "从{account}扣款还贷", "我要还贷款")),
    SubIntent("loan", "loan_prepay", ("amount",), ("date",),
              ("我想提前还款{amount}", "{date}能提前还{amount}房贷吗？", "想提前还一部分贷款")),
    SubIntent("loan", "loan_rate_query", (), ("term",),
              ("{term}的贷款利率是多少？", "现在房贷利率多少", "查一下贷款利率")),
    SubIntent("loan", "loan_limit_query", (), (), ("我的贷款额度还有多少？", "查一下我能贷多少钱", "看看我的授信额度")),
    SubIntent("wealth", "wealth_buy", ("amount",), ("term", "rate"),
              ("我想买{amount}的理财", "有没有{term}、年化{rate}左右的理财产品？我想买{amount}", "帮我买点理财，{amount}",
               "推荐一款{term}的理财")),
    SubIntent("wealth", "wealth_redeem", ("amount",), ("account",),
              ("帮我赎回{amount}理财", "把理财赎回{amount}到{account}", "我要赎回理财")),
    SubIntent("wealth", "wealth_yield_query", (), ("term",), ("我的理财收益怎么样了？", "查一下{term}理财的收益", "理财赚了多少")),
    SubIntent("wealth", "deposit_open", ("amount", "term"), ("rate",),
              ("我想存{amount}定期，存{term}", "{term}定期利率是{rate}吗？我想存{amount}", "帮我办个定期存款")),
    SubIntent("transfer", "transfer_send", ("amount", "account"), ("date",),
              ("给{account}转{amount}", "帮我转{amount}到{account}", "我要给{account}汇款", "转账{amount}", "我要转账")),
    SubIntent("transfer", "transfer_scheduled", ("amount", "account", "date"), ("time",),
              ("{date}{time}给{account}转{amount}", "帮我预约一笔转账，{date}转给{account}", "设置一个定时转账，金额{amount}")),
    SubIntent("transfer", "transfer_record_query", (), ("date", "account"),
              ("查一下{date}的转账记录", "我{date}给{account}的转账到账了吗？", "看看最近的转账记录")),
    SubIntent("transfer", "transfer_limit_query", (), ("account",), ("{account}每天最多能转多少？", "手机银行转账限额是多少")),
    SubIntent("other", "balance_query", (), ("account",), ("查一下{account}的余额", "我卡里还有多少钱？", "看看余额")),
    SubIntent("other", "card_loss", ("account",), (), ("{account}丢了，帮我挂失", "卡丢了，要挂失", "怎么挂失银行卡")),
    SubIntent("other", "password_reset", (), (), ("我忘记登录密码了", "怎么重置交易密码", "密码输错被锁了怎么办")),
    SubIntent("other", "human_agent", (), (), ("转人工", "我要找人工客服", "能帮我接通人工服务吗")),
    SubIntent("other", "chitchat", (), (), ("你好", "谢谢你啊", "你是机器人吗？", "今天天气不错")),
)
L1_LABELS = ("loan", "wealth", "transfer", "other")

ASKS = {
    "amount": ("请问金额是多少？", "您想办理多少钱？"),
    "term": ("请问期限是多久？", "您打算选多长的期限？"),
    "rate": ("您期望的利率大概是多少？",),
    "account": ("请问使用哪个账户，或者收款人是谁？", "请提供账户信息（如卡号尾号或收款人姓名）。"),
    "date": ("请问在哪一天办理？", "您希望哪天执行？"),
    "time": ("请问具体几点？",),
}
REPLIES = ("{value}", "{value}。", "就{value}吧", "嗯，{value}")

SURNAMES = "张王李赵陈刘杨黄周吴"
GIVEN_NAMES = ("伟", "芳", "娜", "敏", "静", "磊", "洋", "艳", "军", "杰", "晓明", "丽华")
ACCOUNT_TYPES = ("工资卡", "储蓄卡", "信用卡", "借记卡")
WEEKDAYS = "一二三四五六日"


@dataclass
class Mention:
    surface: str
    value: str


# --------------------------------------------------------------------------------------------
# Slot surfaces: what a user types, and the normalised gold value
# --------------------------------------------------------------------------------------------
def sample_amount(rng: random.Random, intent: SubIntent) -> Mention:
    scale = {"loan": (10_000, 1_000_000), "wealth": (1_000, 500_000)}.get(intent.l1, (100, 50_000))
    yuan = rng.randint(*scale)
    yuan = yuan // 100 * 100 if yuan >= 1000 else yuan
    cents = yuan * 100 + (rng.randint(0, 99) if rng.random() < 0.15 else 0)
    value = format_cents(cents)
    form = rng.choices(("arabic", "comma", "kuai", "chinese", "wan", "upper", "yen"), weights=(3, 2, 2, 2, 2, 1, 1))[0]
    whole = cents % 100 == 0
    if form == "wan" and whole and yuan % 1000 == 0 and yuan >= 10_000:
        wan = f"{yuan / 10_000:g}"
        return Mention(f"{wan}万" + rng.choice(("", "元", "块")), value)
    if form == "chinese" and whole:
        return Mention(integer_to_chinese(yuan) + rng.choice(("元", "块")), value)
    if form == "kuai" and whole:
        return Mention(f"{yuan}块", value)
    if form == "upper":
        return Mention(to_upper(cents), value)
    if form == "yen":
        return Mention(f"¥{format_cents(cents, True)}", value)
    if form == "comma":
        return Mention(f"{format_cents(cents, True) if not whole else f'{yuan:,}'}元", value)
    return Mention(f"{value if not whole else yuan}元", value)


def sample_term(rng: random.Random, intent: SubIntent) -> Mention:
    if intent.l1 == "wealth" and intent.l2 != "deposit_open" and rng.random() < 0.6:
        days = rng.choice((7, 14, 30, 60, 90, 180, 365))
        return Mention(rng.choice((f"{days}天", f"{integer_to_chinese(days)}天")), f"P{days}D")
    months = rng.choice((3, 6, 12, 24, 36, 60, 120, 240, 360) if intent.l1 == "loan" else (3, 6, 12, 24, 36, 60))
    options = [f"{months}个月"]
    if months % 12 == 0:
        years = months // 12
        options += [f"{years}年", f"{integer_to_chinese(years)}年", f"{years}年期"]
    if months == 6:
        options.append("半年")
    if intent.l1 == "loan":
        options.append(f"{months}期")
    return Mention(rng.choice(options), f"P{months}M")


def sample_rate(rng: random.Random, intent: SubIntent) -> Mention:
    hundredths = rng.randint(150, 480) if intent.l1 != "loan" else rng.randint(280, 600)
    hundredths = hundredths // 5 * 5
    value = f"{hundredths / 100:.2f}"
    shown = f"{hundredths / 100:g}"
    options = [f"{shown}%", f"{shown}个点"]
    if hundredths % 100 == 0:
        options.append(f"百分之{integer_to_chinese(hundredths // 100)}")
    return Mention(rng.choice(options), value)


def sample_account(rng: random.Random, intent: SubIntent) -> Mention:
    kind = rng.choice(("name", "tail", "number") if intent.l1 == "transfer" else ("tail", "type", "tail"))
    if kind == "name":
        name = rng.choice(SURNAMES) + rng.choice(GIVEN_NAMES)
        return Mention(rng.choice((name, f"{name}的账户", f"{name}的卡")), f"name:{name}")
    if kind == "number":
        digits = "62" + "".join(str(rng.randint(0, 9)) for _ in range(14))
        spaced = " ".join(digits[i:i + 4] for i in range(0, 16, 4))
        return Mention(rng.choice((f"卡号{digits}", f"账号{spaced}")), f"no:{digits}")
    if kind == "type":
        card = rng.choice(ACCOUNT_TYPES)
        return Mention(f"我的{card}", f"type:{card}")
    tail = f"{rng.randint(0, 9999):04d}"
    card = rng.choice(ACCOUNT_TYPES)
    return Mention(rng.choice((f"尾号{tail}的{card}", f"尾号{tail}的卡", f"{tail}结尾的账户")), f"tail:{tail}")


def sample_date(rng: random.Random, reference: dt.date) -> Mention:
    kind = rng.choice(("today", "tomorrow", "after", "weekday", "month_day", "full"))
    if kind == "today":
        return Mention("今天", reference.isoformat())
    if kind == "tomorrow":
        return Mention("明天", (reference + dt.timedelta(days=1)).isoformat())
    if kind == "after":
        return Mention("后天", (reference + dt.timedelta(days=2)).isoformat())
    if kind == "weekday":
        weekday = rng.randrange(7)
        next_monday = reference + dt.timedelta(days=7 - reference.weekday())
        return Mention(f"下周{WEEKDAYS[weekday]}", (next_monday + dt.timedelta(days=weekday)).isoformat())
    target = reference + dt.timedelta(days=rng.randint(1, 60))
    if kind == "month_day":
        return Mention(rng.choice((f"{target.month}月{target.day}日", f"{target.month}月{target.day}号")), target.isoformat())
    return Mention(f"{target.year}年{target.month}月{target.day}日", target.isoformat())


def sample_time(rng: random.Random) -> Mention:
    hour = rng.randint(8, 21)
    minute = rng.choice((0, 0, 30))
    value = f"{hour:02d}:{minute:02d}"
    if rng.random() < 0.3:
        return Mention(value, value)
    period, shown = ("上午", hour) if hour < 12 else (("中午", hour) if hour == 12 else
                                                    (("下午", hour - 12) if hour < 18 else ("晚上", hour - 12)))
    number = integer_to_chinese(shown) if rng.random() < 0.5 else str(shown)
    return Mention(f"{period}{number}点" + ("半" if minute == 30 else ""), value)


def sample_slot(slot: str, rng: random.Random, intent: SubIntent, reference: dt.date) -> Mention:
    samplers: dict[str, Callable[[], Mention]] = {
        "amount": lambda: sample_amount(rng, intent), "term": lambda: sample_term(rng, intent),
        "rate": lambda: sample_rate(rng, intent), "account": lambda: sample_account(rng, intent),
        "date": lambda: sample_date(rng, reference), "time": lambda: sample_time(rng)}
    return samplers[slot]()


# --------------------------------------------------------------------------------------------
# Dialogues
# --------------------------------------------------------------------------------------------
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def fill(template: str, mentions: dict[str, Mention]) -> tuple[str, list[dict]]:
    """Fill placeholders and record where each slot landed in the text."""
    out, spans, position = [], [], 0
    for match in _PLACEHOLDER.finditer(template):
        literal = template[position:match.start()]
        out.append(literal)
        start = sum(len(part) for part in out)
        mention = mentions[match.group(1)]
        out.append(mention.surface)
        spans.append({"slot": match.group(1), "start": start, "end": start + len(mention.surface),
                      "text": mention.surface, "value": mention.value})
        position = match.end()
    out.append(template[position:])
    return "".join(out), spans


SYSTEM_PROMPT = ("你是手机银行的意图识别与槽位填充模块。阅读用户与助手的对话，输出JSON："
                 "{\"intent\": {\"l1\": 一级意图, \"l2\": 二级意图}, \"slots\": {槽位: 规范化取值}}。"
                 "一级意图为 loan、wealth、transfer、other 之一；槽位包括 amount（两位小数）、term（ISO 8601 时长，如P12M）、"
                 "rate（百分数，两位小数）、account、date（YYYY-MM-DD）、time（HH:MM），未提及的槽位不要输出。")


@dataclass
class BankingSettings:
    count: int
    seed: int = 0
    multi_turn_ratio: float = 0.5
    intents: Optional[tuple] = None  # restrict to these L1 or L2 names


def _pick_intent(rng: random.Random, allowed: list[SubIntent]) -> SubIntent:
    l1 = rng.choice(sorted({intent.l1 for intent in allowed}))  # balanced over L1 first
    options = [intent for intent in allowed if intent.l1 == l1]
    return options[rng.randrange(len(options))]


def make_dialogue(index: int, settings: BankingSettings, allowed: list[SubIntent]) -> dict:
    rng = random.Random(f"banking:{settings.seed}:{index}")
    intent = _pick_intent(rng, allowed)
    reference = dt.date(2024, 1, 1) + dt.timedelta(days=rng.randint(0, 730))
    wanted = set(intent.required) | {slot for slot in intent.optional if rng.random() < 0.5}
    mentions = {slot: sample_slot(slot, rng, intent, reference) for slot in SLOTS if slot in wanted}
    # Openers that mention nothing we do not have; multi-turn prefers openers that leave slots out.
    usable = [t for t in intent.openers if set(_PLACEHOLDER.findall(t)) <= wanted]
    multi_turn = rng.random() < settings.multi_turn_ratio
    if multi_turn:
        partial = [t for t in usable if set(intent.required) - set(_PLACEHOLDER.findall(t))]
        usable = partial or usable
    opener = usable[rng.randrange(len(usable))]
    stated = set(_PLACEHOLDER.findall(opener))
    extras = [slot for slot in SLOTS if slot in wanted - stated and (not multi_turn or slot not in intent.required)]
    for slot in extras:  # optional details users add in the same breath
        opener += rng.choice({"amount": ("，金额{amount}",), "term": ("，期限{term}", "，{term}的"),
                              "rate": ("，利率{rate}左右", "，年化{rate}"), "account": ("，用{account}",),
                              "date": ("，{date}办理", "，时间定在{date}"), "time": ("，{time}",)}[slot])
        stated.add(slot)
    text, spans = fill(opener, mentions)
    turns = [{"role": "user", "text": text}]
    for span in spans:
        span["turn"] = 0
    all_spans = list(spans)
    for slot in SLOTS:
        if slot in wanted and slot not in stated:
            turns.append({"role": "assistant", "text": rng.choice(ASKS[slot])})
            reply, reply_spans = fill(rng.choice(REPLIES).replace("{value}", "{" + slot + "}"), mentions)
            for span in reply_spans:
                span["turn"] = len(turns)
            turns.append({"role": "user", "text": reply})
            all_spans.extend(reply_spans)
    labels = {"intent": {"l1": intent.l1, "l2": intent.l2},
              "slots": {slot: mentions[slot].value for slot in SLOTS if slot in mentions}}
    transcript = "\n".join(f"{'用户' if t['role'] == 'user' else '助手'}：{t['text']}" for t in turns)
    return {"id": f"banking-{index:07d}", "reference_date": reference.isoformat(), "dialogue": turns,
            "labels": labels, "spans": all_spans,
            "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                         {"role": "user", "content": f"今天是{reference.isoformat()}。\n{transcript}"},
                         {"role": "assistant", "content": json.dumps(labels, ensure_ascii=False)}]}


def allowed_intents(names: Optional[tuple]) -> list[SubIntent]:
    if not names:
        return list(INTENTS)
    chosen = [i for i in INTENTS if i.l1 in names or i.l2 in names]
    return chosen


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
@dataclass
class BankingScores:
    total: int = 0
    missing_predictions: int = 0
    l1_correct: int = 0
    l2_correct: int = 0
    joint_correct: int = 0
    slot_tp: dict = field(default_factory=dict)
    slot_fp: dict = field(default_factory=dict)
    slot_fn: dict = field(default_factory=dict)

    def add(self, gold: dict, predicted: Optional[dict]) -> None:
        self.total += 1
        if predicted is None:
            self.missing_predictions += 1
            predicted = {"intent": {}, "slots": {}}
        gold_intent, pred_intent = gold["intent"], predicted.get("intent") or {}
        l1_ok = pred_intent.get("l1") == gold_intent["l1"]
        l2_ok = pred_intent.get("l2") == gold_intent["l2"]
        self.l1_correct += l1_ok
        self.l2_correct += l2_ok
        gold_slots = gold.get("slots") or {}
        pred_slots = predicted.get("slots") or {}
        if not isinstance(pred_slots, dict):
            pred_slots = {}
        for slot in set(gold_slots) | set(pred_slots):
            g, p = gold_slots.get(slot), pred_slots.get(slot)
            if g is not None and p is not None and str(p) == str(g):
                self.slot_tp[slot] = self.slot_tp.get(slot, 0) + 1
            else:
                if p is not None:
                    self.slot_fp[slot] = self.slot_fp.get(slot, 0) + 1
                if g is not None:
                    self.slot_fn[slot] = self.slot_fn.get(slot, 0) + 1
        self.joint_correct += l1_ok and l2_ok and {k: str(v) for k, v in pred_slots.items()} == \
            {k: str(v) for k, v in gold_slots.items()}

    @staticmethod
    def _f1(tp: int, fp: int, fn: int) -> dict:
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4)}

    def summary(self) -> dict:
        slots = sorted(set(self.slot_tp) | set(self.slot_fp) | set(self.slot_fn))
        tp, fp, fn = (sum(d.values()) for d in (self.slot_tp, self.slot_fp, self.slot_fn))
        share = (lambda n: round(n / self.total, 4) if self.total else 0.0)
        return {"dialogues": self.total, "missing_predictions": self.missing_predictions,
                "l1_accuracy": share(self.l1_correct), "l2_accuracy": share(self.l2_correct),
                "joint_accuracy": share(self.joint_correct), "slots_micro": self._f1(tp, fp, fn),
                "per_slot": {s: self._f1(self.slot_tp.get(s, 0), self.slot_fp.get(s, 0), self.slot_fn.get(s, 0))
                             for s in slots}}


def prediction_labels(record: dict) -> Optional[dict]:
    """A prediction line carries ``labels`` (object) or ``prediction`` (object or JSON text)."""
    value = record.get("labels", record.get("prediction"))
    if isinstance(value, str):
        try:
            value = extract_json(value)
        except ValueError:
            return {"intent": {}, "slots": {}}
    return value if isinstance(value, dict) else {"intent": {}, "slots": {}}
