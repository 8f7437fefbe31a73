"""Sample tags for ``data compress``: categories (InsTag-style list), quality 1–6, complexity 1–6.

Three sources, in this order of precedence:

1. tags the sample already carries (``"tags": {...}`` or top-level ``categories``/``quality``/
   ``complexity``) — used as they are;
2. an LLM tagger behind an OpenAI-compatible URL, prompted in the style of InsTag (open intent
   tags, here anchored to one primary category of our taxonomy) and of the DEITA complexity and
   quality scorers (a 1–6 score);
3. the built-in **heuristic** tagger: keyword matching against the finance taxonomy below and
   surface features (length, structure, numbers, refusals, repetition).  It needs no model and is
   deterministic, but it is a heuristic — it approximates what a scorer model would say and is
   documented as such in docs/datagen.md.

The first category of a sample is its *primary* category, the one ``data compress`` clusters on;
the rest are fine-grained tags kept for the report and the output.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Optional

from .llm_client import LLMClient, LLMError
from .samples import SampleText

# Finance-first taxonomy: slug → keywords (Chinese and English, lower-case for English).
TAXONOMY: dict[str, tuple[str, ...]] = {
    "loan": ("贷款", "房贷", "车贷", "按揭", "等额本息", "等额本金", "月供", "授信", "借款", "信用贷", "提前还款", "lpr",
             "loan", "mortgage", "borrow", "repayment"),
    "deposit": ("存款", "定期", "活期", "大额存单", "存单", "储蓄", "deposit", "savings"),
    "wealth_management": ("理财", "基金", "净值", "收益率", "年化", "赎回", "申购", "资产配置", "wealth", "fund", "portfolio"),
    "payment_transfer": ("转账", "汇款", "支付", "收款", "手续费", "扫码", "跨行", "结算", "支票", "transfer", "payment", "remit"),
    "tax": ("税", "个税", "增值税", "发票", "专项附加扣除", "应纳税", "tax", "vat", "invoice"),
    "fx": ("外汇", "汇率", "美元", "欧元", "日元", "购汇", "结汇", "跨境", "exchange rate", "currency", "usd", "forex"),
    "insurance": ("保险", "保费", "理赔", "保单", "投保", "寿险", "医疗险", "insurance", "premium", "claim"),
    "securities": ("股票", "证券", "债券", "市盈率", "股息", "期货", "期权", "a股", "stock", "bond", "dividend", "equity"),
    "accounting": ("会计", "资产负债表", "利润表", "现金流量表", "折旧", "分录", "审计", "accounting", "balance sheet", "depreciation"),
    "risk_compliance": ("风险", "合规", "反洗钱", "征信", "监管", "欺诈", "风控", "risk", "compliance", "fraud", "aml"),
    "credit_card": ("信用卡", "账单", "最低还款", "分期", "免息期", "额度", "credit card", "installment", "statement"),
    "macro_economy": ("通胀", "通货膨胀", "gdp", "货币政策", "降准", "降息", "央行", "利率政策", "inflation", "monetary policy"),
    "math_calc": ("计算", "多少", "求", "百分之", "比例", "方程", "calculate", "how much", "percent", "compute"),
    "coding": ("代码", "python", "sql", "函数", "编程", "java", "def ", "select ", "code", "program"),
    "writing": ("写一篇", "撰写", "文案", "总结", "改写", "润色", "邮件", "write", "essay", "summarize", "rewrite", "email"),
}
GENERAL = "general"
CATEGORIES = tuple(TAXONOMY) + (GENERAL,)

_KEYWORD_RES = {name: re.compile("|".join(re.escape(word) for word in words)) for name, words in TAXONOMY.items()}
_REFUSAL_RE = re.compile(r"作为一个?(?:AI|人工智能)|我无法|我不能|抱歉，我|as an ai|i cannot|i can't|i'm sorry", re.IGNORECASE)
_STRUCTURE_RE = re.compile(r"(?m)^\s*(?:\d+[.、)]|[-*•]|第[一二三四五六七八九十]+[步点]|[一二三四五六七八九十]+、)")
_CONCLUSION_RE = re.compile(r"因此|所以|综上|答[:：]|结论|总之|therefore|in summary|the answer is", re.IGNORECASE)
_CONSTRAINT_RE = re.compile(r"并且|同时|分别|如果|假设|要求|步骤|比较|至少|不超过|请列出|respectively|assume|compare|at least|step by step|must")
_HARD_FINANCE_RE = re.compile(r"复利|等额本息|等额本金|年化|折现|净现值|irr|内部收益率|久期|实际利率|现值|npv|annuity|compound", re.IGNORECASE)
_NUMBER_RE = re.compile(r"\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Tags:
    categories: tuple[str, ...]
    quality: int
    complexity: int

    @property
    def primary(self) -> str:
        return self.categories[0]

    def to_json(self, tagger: Optional[str] = None) -> dict:
        data = {"categories": list(self.categories), "quality": self.quality, "complexity": self.complexity}
        if tagger:
            data["tagger"] = tagger
        return data


def difficulty(complexity: int) -> str:
    """Complexity 1–2 easy, 3–4 medium, 5–6 hard."""
    return ("easy", "easy", "medium", "medium", "hard", "hard")[complexity - 1]


DIFFICULTIES = ("easy", "medium", "hard")


def _score(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or not 1 <= value <= 6:
        raise ValueError(f"tag {name!r} must be an integer 1–6, got {value!r}")
    return int(value)


def carried_tags(data: dict) -> Optional[Tags]:
    """Tags the sample brings along, or None; half-present or out-of-range tags are a bad line."""
    source = data.get("tags") if isinstance(data.get("tags"), dict) else data
    present = [key for key in ("categories", "quality", "complexity") if key in source]
    if not present:
        return None
    if len(present) < 3:
        missing = sorted({"categories", "quality", "complexity"} - set(present))
        raise ValueError(f"partial tags: missing {', '.join(missing)}")
    categories = source["categories"]
    if isinstance(categories, str):
        categories = [categories]
    if not isinstance(categories, list) or not categories or not all(isinstance(c, str) and c.strip() for c in categories):
        raise ValueError("tag 'categories' must be a non-empty list of strings")
    return Tags(tuple(c.strip() for c in categories), _score(source["quality"], "quality"),
                _score(source["complexity"], "complexity"))


class HeuristicTagger:
    """Keyword and surface-feature tagger — a documented heuristic, not a trained scorer."""

    name = "heuristic"

    def tag(self, sample: SampleText) -> Tags:
        return Tags(self.categories(sample), self.quality(sample), self.complexity(sample))

    def categories(self, sample: SampleText) -> tuple[str, ...]:
        # The instruction decides the intent; the response only breaks ties and adds detail tags.
        instruction = sample.instruction.lower()
        response = sample.response[:2000].lower()
        scored = []
        for order, (name, pattern) in enumerate(_KEYWORD_RES.items()):
            hits_instruction = len(pattern.findall(instruction))
            hits_response = len(pattern.findall(response))
            if hits_instruction or hits_response:
                # Generic task categories (math, writing, coding) yield to a finance domain on ties.
                generic = name in ("math_calc", "writing", "coding")
                scored.append((-(3 * hits_instruction + hits_response), generic, order, name))
        if not scored:
            return (GENERAL,)
        scored.sort()
        return tuple(name for *_, name in scored[:4])

    def quality(self, sample: SampleText) -> int:
        response = sample.response.strip()
        if not response:
            return 1
        score = 3
        length = len(response)
        if length < 8:
            score -= 2
        elif 40 <= length <= 6000:
            score += 1
        if _STRUCTURE_RE.search(response) or sample.reasoning:
            score += 1
        if _CONCLUSION_RE.search(response) or (_NUMBER_RE.search(sample.instruction) and _NUMBER_RE.search(response)):
            score += 1
        if _REFUSAL_RE.search(response[:200]):
            score -= 2
        if length > 200 and len(zlib.compress(response.encode("utf-8"))) / len(response.encode("utf-8")) < 0.12:
            score -= 2  # compresses to almost nothing: loops and copy-paste
        if length > 20 and response in sample.instruction:
            score -= 2  # echoes the question
        return max(1, min(6, score))

    def complexity(self, sample: SampleText) -> int:
        instruction = sample.instruction
        score = 1
        if len(instruction) > 60:
            score += 1
        if len(instruction) > 240:
            score += 1
        if len(_NUMBER_RE.findall(instruction)) >= 3:
            score += 1
        if len(_CONSTRAINT_RE.findall(instruction)) >= 2:
            score += 1
        if _HARD_FINANCE_RE.search(instruction) or instruction.count("？") + instruction.count("?") >= 2:
            score += 1
        return max(1, min(6, score))


# Prompts after InsTag (Lu et al., 2023) and the DEITA complexity/quality scorers (Liu et al., 2023),
# adapted to a general chat model: the tag list is anchored to our taxonomy so clusters stay finite.
INSTAG_PROMPT = (
    "You are a helpful assistant. Please identify tags of user intentions in the following user query "
    "and provide an explanation for each tag. Also choose the single best-fitting domain for the query "
    "from this list: {domains}.\n"
    'Respond only in JSON: {{"domain": "<one of the list>", "tags": [{{"tag": str, "explanation": str}}]}}\n'
    "Query: {instruction}"
)
DEITA_COMPLEXITY_PROMPT = (
    "You are a helpful assistant. Please identify the complexity score of the following user query. "
    "Answer with a single integer from 1 (trivial) to 6 (very complex).\n"
    "##Query: {instruction}\n##Complexity: "
)
DEITA_QUALITY_PROMPT = (
    "You are a helpful assistant. Please identify the quality score of the Response corresponding to the "
    "Question. Answer with a single integer from 1 (useless) to 6 (excellent).\n"
    "#Question#:\n{instruction}\n#Response#:\n{response}\n##Quality: "
)
_SCORE_RE = re.compile(r"[1-6]")


class LLMTagger:
    """InsTag/DEITA-style tagging through an OpenAI-compatible endpoint (three requests per sample)."""

    name = "llm"

    def __init__(self, client: LLMClient, max_chars: int = 4000):
        self.client = client
        self.max_chars = max_chars  # long samples are cut: scorers judge from the opening

    def tag(self, sample: SampleText) -> Tags:
        instruction = sample.instruction[: self.max_chars]
        response = sample.response[: self.max_chars]
        reply = self.client.ask_json(INSTAG_PROMPT.format(domains=", ".join(CATEGORIES), instruction=instruction))
        categories = self._categories(reply)
        complexity = self._score(self.client.ask(DEITA_COMPLEXITY_PROMPT.format(instruction=instruction), max_tokens=8))
        quality = self._score(self.client.ask(
            DEITA_QUALITY_PROMPT.format(instruction=instruction, response=response), max_tokens=8))
        return Tags(categories, quality, complexity)

    @staticmethod
    def _categories(reply) -> tuple[str, ...]:
        if not isinstance(reply, dict):
            raise LLMError(f"InsTag reply is not a JSON object: {str(reply)[:80]!r}")
        domain = str(reply.get("domain", "")).strip().lower()
        primary = domain if domain in CATEGORIES else GENERAL
        tags = []
        for item in reply.get("tags") or []:
            tag = item.get("tag") if isinstance(item, dict) else item
            if isinstance(tag, str) and tag.strip() and tag.strip().lower() != primary:
                tags.append(tag.strip().lower())
        return (primary, *dict.fromkeys(tags))

    @staticmethod
    def _score(text: str) -> int:
        match = _SCORE_RE.search(text)
        if not match:
            raise LLMError(f"scorer reply has no score 1–6: {text[:80]!r}")
        return int(match.group())

