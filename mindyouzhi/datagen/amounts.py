"""Chinese uppercase RMB amounts (大写金额) following the PBoC writing rules, both directions.

The rules are those of the People's Bank of China《正确填写票据和结算凭证的基本规定》:

* digits 壹贰叁肆伍陆柒捌玖, units 拾佰仟万亿, money units 元角分, 零 and 整 (or 正);
  the traditional forms 貳 陸 億 萬 圓 must also be accepted;
* an amount that stops at 元 ends with 整 (or 正); after 角 the 整 may be omitted; after 分 never;
* a zero inside the number is written 零, a run of zeros as a single 零;
* when the 万位 or the 元位 is 0 (possibly inside a longer run of zeros) but the 千位 / 角位 that
  follows is not, the 零 may be written or left out (``¥1,680.32`` → 壹仟陆佰捌拾元[零]叁角贰分);
* when the 角位 is 0 and the 分位 is not, 零 is written after 元 (``¥325.04`` → 叁佰贰拾伍元零肆分).

Canonical output (what :func:`to_upper` prints) makes one fixed choice at every optional point —
the same choice ``cn2an`` makes — and :func:`to_lower` accepts every spelling the rules allow and
nothing else.  ``docs/datagen.md`` lists the choices.  Amounts are handled as integer cents, so
there is no floating point anywhere.
"""
from __future__ import annotations

import datetime as _dt
import itertools
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from ..errors import UserError

DIGITS = "零壹贰叁肆伍陆柒捌玖"
SMALL_UNITS = ("", "拾", "佰", "仟")  # positions inside a four-digit section
MAX_CENTS = 9_999_999_999_999_99  # ¥9,999,999,999,999.99: 万亿 is the largest section we write

# The rules require these traditional forms to be accepted on cheques; we read them, never write them.
TRADITIONAL = str.maketrans({"貳": "贰", "陸": "陆", "億": "亿", "萬": "万", "圓": "元"})
# Characters the rules explicitly forbid on a cheque; named in the error so the user knows why.
FORBIDDEN = set("一二两三四五六七八九十百千念毛另〇0123456789")


@dataclass(frozen=True)
class Spelling:
    """One point where the rules allow a choice, fixed to a value.

    ``section_zeros``: the section boundaries ('万亿', '亿', '万') where the optional 零 is written;
    ``yuan_zero``: write the optional 零 between 元 and 角;
    ``leading_shi``: write a leading 壹拾 as plain 拾; ``zheng``: 整 or 正; ``jiao_zheng``: the
    optional word after a final 角 ('' = none).
    """

    section_zeros: frozenset = frozenset()
    yuan_zero: bool = False
    leading_shi: bool = False
    zheng: str = "整"
    jiao_zheng: str = ""


CANONICAL = Spelling()


# --------------------------------------------------------------------------------------------
# Arabic side
# --------------------------------------------------------------------------------------------
_ARABIC_RE = re.compile(r"^(?:[¥￥]|RMB|CNY)?\s*([0-9][0-9,]*)(?:\.([0-9]{1,2}))?\s*(?:元)?$", re.IGNORECASE)


def parse_arabic(text: str) -> int:
    """``'1,680.32'`` / ``'¥150'`` / ``'150.00元'`` → cents.  Raises ``UserError`` when malformed."""
    raw = str(text).strip()
    match = _ARABIC_RE.match(raw)
    if not match:
        raise UserError(f"amount {raw!r}: expected a number such as 1680.32 or ¥1,680.32 (at most two decimals)")
    whole, frac = match.group(1), match.group(2) or ""
    if "," in whole and not re.fullmatch(r"[0-9]{1,3}(,[0-9]{3})*", whole):
        raise UserError(f"amount {raw!r}: thousands separators must group three digits (1,680.32)")
    cents = int(whole.replace(",", "")) * 100 + int((frac + "00")[:2])
    if cents > MAX_CENTS:
        raise UserError(f"amount {raw!r}: larger than the supported maximum 9,999,999,999,999.99")
    return cents


def cents_from_decimal(value: Decimal | str | int) -> int:
    """Exact conversion of a Decimal with at most two decimals to cents."""
    try:
        dec = Decimal(str(value))
    except InvalidOperation:
        raise UserError(f"amount {value!r}: not a number") from None
    if dec < 0:
        raise UserError(f"amount {value!r}: negative amounts have no uppercase form")
    cents = dec * 100
    if cents != cents.to_integral_value():
        raise UserError(f"amount {value!r}: more than two decimals")
    if cents > MAX_CENTS:
        raise UserError(f"amount {value!r}: larger than the supported maximum 9,999,999,999,999.99")
    return int(cents)


def format_cents(cents: int, thousands: bool = False) -> str:
    """Cents → ``'1680.32'`` (or ``'1,680.32'``): always two decimals, the canonical lowercase form."""
    yuan, rest = divmod(int(cents), 100)
    whole = f"{yuan:,}" if thousands else str(yuan)
    return f"{whole}.{rest:02d}"


# --------------------------------------------------------------------------------------------
# Uppercase rendering
# --------------------------------------------------------------------------------------------
def _render_section(value: int) -> str:
    """0 < value < 10000, no leading zero handling: 1010 → 壹仟零壹拾, 7000 → 柒仟."""
    out = []
    pending_zero = False
    for position in range(3, -1, -1):
        digit = value // 10**position % 10
        if digit == 0:
            pending_zero = bool(out)  # a zero only matters once something was written before it
            continue
        if pending_zero:
            out.append("零")
            pending_zero = False
        out.append(DIGITS[digit] + SMALL_UNITS[position])
    return "".join(out)


def _render_integer(value: int, spelling: Spelling, level: str = "") -> str:
    """Integer yuan (> 0) → uppercase, sections 亿 / 万 / units, with the zero rules between sections.

    The part above 亿 may itself exceed 万 (万亿), so it is rendered recursively; ``level`` names
    the boundaries of that inner rendering ('万亿') apart from the outer ones ('亿', '万').
    """
    parts = []  # (section value, marker written after it, section is non-zero)
    if value >= 10**8:
        parts.append((value // 10**8, "亿", True))
    if value >= 10**4:
        parts.append((value // 10**4 % 10**4, "万", value // 10**4 % 10**4 != 0))
    parts.append((value % 10**4, "", value % 10**4 != 0))

    out = []
    above_ends_with_zero = False  # the digit just above the current section boundary is 0
    for index, (section, marker, written) in enumerate(parts):
        if index == 0:
            out.append(_render_integer(section, spelling, "亿") if section >= 10**4 else _render_section(section))
            out.append(marker)
            above_ends_with_zero = section % 10 == 0
            boundary = marker + level
            continue
        if written:
            if section < 1000:
                out.append("零")  # the 千位 of this section is 0: a zero in the middle, always written
            elif above_ends_with_zero and boundary in spelling.section_zeros:
                out.append("零")  # 万位 (or 亿位) is 0 but the 千位 is not: the rules let us choose
            out.append(_render_section(section) + marker)
        above_ends_with_zero = section % 10 == 0
        boundary = marker + level
    text = "".join(out)
    if spelling.leading_shi and text.startswith("壹拾"):
        text = text[1:]
    return text


def to_upper(cents: int, spelling: Spelling = CANONICAL) -> str:
    """Cents → uppercase amount.  ``to_upper(15000)`` == '壹佰伍拾元整'."""
    cents = int(cents)
    if not 0 <= cents <= MAX_CENTS:
        raise UserError(f"amount {format_cents(cents)}: outside 0 … 9,999,999,999,999.99")
    yuan, jiao, fen = cents // 100, cents // 10 % 10, cents % 10
    if yuan == 0:
        if jiao == 0 and fen == 0:
            return "零元" + spelling.zheng
        text = (DIGITS[jiao] + "角" if jiao else "") + (DIGITS[fen] + "分" if fen else "")
        return text + (spelling.jiao_zheng if jiao and not fen else "")
    text = _render_integer(yuan, spelling) + "元"
    if jiao == 0 and fen == 0:
        return text + spelling.zheng
    if jiao == 0:
        return text + "零" + DIGITS[fen] + "分"  # 角位 0, 分位 not: 零 after 元 is required
    if yuan % 10 == 0 and spelling.yuan_zero:
        text += "零"
    text += DIGITS[jiao] + "角"
    return text + (DIGITS[fen] + "分" if fen else spelling.jiao_zheng)


_LOWERCASE = str.maketrans("壹贰叁肆伍陆柒捌玖拾佰仟", "一二三四五六七八九十百千")


def integer_to_chinese(value: int) -> str:
    """Everyday lowercase numerals for dialogue text: 15000 → 一万五千, 12 → 十二 (not an RMB form)."""
    if value == 0:
        return "零"
    text = _render_integer(int(value), CANONICAL).translate(_LOWERCASE)
    return text[1:] if text.startswith("一十") else text


def accepted_spellings(cents: int) -> set[str]:
    """Every uppercase spelling of ``cents`` that the PBoC rules accept (prefix 人民币 aside)."""
    yuan, jiao, fen = cents // 100, cents // 10 % 10, cents % 10
    boundaries = [label for label, size in (("万亿", 10**12), ("亿", 10**8), ("万", 10**4)) if yuan >= size]
    zero_sets = [frozenset(chosen) for n in range(len(boundaries) + 1) for chosen in itertools.combinations(boundaries, n)]
    options = itertools.product(
        zero_sets,
        (False, True) if yuan % 10 == 0 and jiao else (False,),
        (False, True),
        ("整", "正"),
        ("", "整", "正") if jiao and not fen else ("",),
    )
    return {to_upper(cents, Spelling(*option)) for option in options}


# --------------------------------------------------------------------------------------------
# Uppercase parsing
# --------------------------------------------------------------------------------------------
_UNIT_VALUE = {"拾": 10, "佰": 100, "仟": 1000}


def _parse_section(text: str, source: str) -> int:
    """Parse 壹仟零壹拾 style text (no 万/亿) into an integer; structure only, zeros are checked later."""
    value, digit = 0, None
    for char in text:
        if char == "零":
            if digit is not None:
                raise UserError(f"{source!r}: 零 cannot follow a digit directly")
            continue
        if char in DIGITS:
            if digit is not None:
                raise UserError(f"{source!r}: two digits in a row ({DIGITS[digit]}{char})")
            digit = DIGITS.index(char)
        elif char in _UNIT_VALUE:
            value += (1 if digit is None else digit) * _UNIT_VALUE[char]
            digit = None
        else:
            raise UserError(f"{source!r}: unexpected character {char!r}")
    return value + (digit or 0)


def _parse_integer(text: str, source: str) -> int:
    if "亿" in text:
        high, _, low = text.partition("亿")
        if "亿" in low:
            raise UserError(f"{source!r}: 亿 appears twice")
        return _parse_integer(high, source) * 10**8 + (_parse_integer(low, source) if low else 0)
    if "万" in text:
        high, _, low = text.partition("万")
        if "万" in low:
            raise UserError(f"{source!r}: 万 appears twice below 亿")
        return _parse_section(high, source) * 10**4 + (_parse_section(low, source) if low else 0)
    return _parse_section(text, source)


def normalize_upper(text: str) -> str:
    """Strip blanks and the 人民币 prefix, map the accepted traditional characters to simplified."""
    text = re.sub(r"\s+", "", str(text)).translate(TRADITIONAL)
    for prefix in ("人民币（大写）", "人民币(大写)", "人民币：", "人民币:", "人民币"):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


def to_lower(text: str) -> int:
    """Uppercase amount → cents.  Accepts every form the rules allow, rejects everything else."""
    source = str(text).strip()
    upper = normalize_upper(source)
    if not upper:
        raise UserError(f"{source!r}: empty amount")
    bad = sorted(set(upper) & FORBIDDEN)
    if bad:
        raise UserError(f"{source!r}: {''.join(bad)} is not allowed in an uppercase amount (use 壹贰叁…拾佰仟, 零, 元角分)")
    if "零零" in upper:
        raise UserError(f"{source!r}: a run of zeros is written as a single 零")
    match = re.fullmatch(r"(?:(.+?)元)?(?:零?([壹贰叁肆伍陆柒捌玖])角)?(?:零?([壹贰叁肆伍陆柒捌玖])分)?([整正]?)", upper)
    if not match or not any(match.groups()[:3]):
        raise UserError(f"{source!r}: expected an amount such as 壹仟陆佰捌拾元叁角贰分 or 壹佰伍拾元整")
    integer_text, jiao_text, fen_text, _ = match.groups()
    yuan = 0
    if integer_text is not None and integer_text != "零":
        yuan = _parse_integer(integer_text, source)
    cents = yuan * 100 + (DIGITS.index(jiao_text) * 10 if jiao_text else 0) + (DIGITS.index(fen_text) if fen_text else 0)
    if cents > MAX_CENTS:
        raise UserError(f"{source!r}: larger than the supported maximum 9,999,999,999,999.99")
    if upper != to_upper(cents) and upper not in accepted_spellings(cents):
        raise UserError(f"{source!r}: not a valid PBoC spelling of {format_cents(cents)}; write {to_upper(cents)}")
    return cents


# --------------------------------------------------------------------------------------------
# Cheque dates (出票日期): the same regulation's rule against altered dates
# --------------------------------------------------------------------------------------------
def date_to_upper(date: _dt.date) -> str:
    """2024-01-15 → 贰零贰肆年零壹月壹拾伍日.

    Months 1, 2 and 10 and days 1–10, 20 and 30 take a leading 零; days 11–19 take 壹 — so nobody
    can prepend a digit to the written date.
    """
    year = "".join(DIGITS[int(ch)] for ch in f"{date.year:04d}")
    return f"{year}年{_date_part(date.month, is_month=True)}月{_date_part(date.day, is_month=False)}日"


def _date_part(number: int, is_month: bool) -> str:
    tens, units = divmod(number, 10)
    text = (DIGITS[tens] + "拾" if tens else "") + (DIGITS[units] if units else "")
    needs_zero = number in (1, 2, 10) if is_month else (number <= 10 or number in (20, 30))
    return ("零" + text) if needs_zero else text


def date_from_upper(text: str) -> _dt.date:
    match = re.fullmatch(r"([零壹贰叁肆伍陆柒捌玖]{4})年(.+)月(.+)日", normalize_upper(text))
    if not match:
        raise UserError(f"{text!r}: expected a date such as 贰零贰肆年零壹月壹拾伍日")
    year = int("".join(str(DIGITS.index(ch)) for ch in match.group(1)))
    month, day = (_parse_section(part.lstrip("零"), text) for part in match.group(2, 3))
    try:
        date = _dt.date(year, month, day)
    except ValueError:
        raise UserError(f"{text!r}: not a calendar date") from None
    if date_to_upper(date) != normalize_upper(text):
        raise UserError(f"{text!r}: not the regulation's spelling; write {date_to_upper(date)}")
    return date
