"""``data refusal``: finance word problems from logic trees — answerable ones and ones to refuse.

Each domain (loans, deposits, credit-card interest, installments, income tax, VAT, FX, transfer
fees) is a small library of quantities and formulas (:mod:`.logic_tree`).  An item grows a tree
from a target quantity, states the given leaves in a templated question (Chinese and/or English)
and either answers it with the worked steps the tree implies, or — with the edge at
``--cut-depth`` removed — refuses, naming the quantity the question does not give.  With an LLM
(``--paraphrase-url``, any OpenAI-compatible server) the language stage is TreeCut's: the LLM writes
the problem from the stated facts and the quantity asked, and its text is kept only when it states
exactly the facts' numbers (else the template question is kept and counted).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Optional, Sequence

from ..errors import UserError
from .llm_client import LLMClient, LLMError
from .logic_tree import Formula, Library, Node, Quantity, Tree, subtree, tree_json

Q = Quantity
F = Formula

# --------------------------------------------------------------------------------------------
# Quantities (values of rates are fractions; units decide how they are written)
# --------------------------------------------------------------------------------------------
QUANTITIES = [
    # loans
    Q("house_price", "房屋总价", "house price", "yuan", ("range", 800_000, 5_000_000, 10_000)),
    Q("down_payment_ratio", "首付比例", "down-payment ratio", "percent", ("choice", 0.15, 0.2, 0.25, 0.3, 0.35)),
    Q("down_payment", "首付款", "down payment", "yuan", ("range", 150_000, 1_500_000, 10_000)),
    Q("loan_principal", "贷款本金", "loan principal", "yuan", ("range", 100_000, 3_000_000, 10_000)),
    Q("lpr_5y", "5年期以上LPR", "5-year LPR", "percent", ("choice", 0.0350, 0.0360, 0.0385, 0.0395, 0.0420)),
    Q("rate_spread_bp", "LPR加点幅度", "spread over the LPR", "bp", ("range", -50, 60, 5),
      "贷款利率在LPR基础上{value}", "the loan rate is the LPR {value}"),
    Q("annual_rate", "贷款年利率", "annual loan rate", "percent", ("range", 0.0285, 0.0490, 0.0005)),
    Q("monthly_rate", "贷款月利率", "monthly loan rate", "percent", ("range", 0.0020, 0.0040, 0.00005)),
    Q("loan_years", "贷款年限", "loan term", "years", ("choice", 5, 10, 15, 20, 25, 30)),
    Q("loan_months", "还款月数", "number of monthly payments", "months", ("choice", 36, 60, 120, 180, 240, 360)),
    Q("monthly_payment", "每月还款额", "monthly payment", "yuan", ("range", 2_000, 20_000, 0.01)),
    Q("total_repayment", "还款总额", "total repayment", "yuan", ("range", 200_000, 5_000_000, 0.01)),
    Q("total_interest", "支付的总利息", "total interest paid", "yuan", ("range", 50_000, 2_000_000, 0.01)),
    # deposits
    Q("deposit_principal", "存款本金", "deposit principal", "yuan", ("range", 10_000, 1_000_000, 1_000)),
    Q("benchmark_rate", "挂牌利率", "posted rate", "percent", ("choice", 0.0110, 0.0130, 0.0150, 0.0175, 0.0200)),
    Q("rate_markup", "利率上浮比例", "rate markup", "percent", ("choice", 0.1, 0.2, 0.3, 0.4)),
    Q("deposit_rate", "存款年利率", "annual deposit rate", "percent", ("range", 0.0115, 0.0260, 0.0005)),
    Q("deposit_years", "存期（年）", "deposit term in years", "years", ("choice", 1, 2, 3, 5)),
    Q("deposit_months", "存期（月）", "deposit term in months", "months", ("choice", 12, 24, 36, 60)),
    Q("simple_interest", "到期利息", "interest at maturity", "yuan", ("range", 100, 50_000, 0.01)),
    Q("maturity_amount", "到期本息合计", "amount at maturity", "yuan", ("range", 10_000, 1_100_000, 0.01)),
    Q("compound_amount", "按年复利计算的到期本息合计", "compounded amount at maturity", "yuan",
      ("range", 10_000, 1_200_000, 0.01)),
    Q("compound_interest", "按年复利计算的利息", "compound interest earned", "yuan", ("range", 100, 200_000, 0.01)),
    # credit-card interest
    Q("statement_balance", "本期账单金额", "statement balance", "yuan", ("range", 1_000, 50_000, 0.01)),
    Q("paid_amount", "到期前已还金额", "amount repaid by the due date", "yuan", ("range", 100, 900, 10)),
    Q("unpaid_balance", "未还金额", "unpaid balance", "yuan", ("range", 500, 40_000, 0.01)),
    Q("daily_rate", "日利率", "daily interest rate", "percent", ("choice", 0.0003, 0.0004, 0.0005)),
    Q("due_day", "到期还款日", "payment due day", "day", ("range", 1, 10, 1)),
    Q("repay_day", "实际还款日", "actual repayment day", "day", ("range", 15, 28, 1)),
    Q("overdue_days", "计息天数", "days of interest", "days", ("range", 5, 25, 1)),
    Q("overdue_interest", "产生的利息", "interest charged", "yuan", ("range", 10, 5_000, 0.01)),
    # installments
    Q("list_price", "商品标价", "list price", "yuan", ("range", 3_000, 30_000, 100)),
    Q("discount", "折扣", "discount", "discount", ("choice", 0.8, 0.85, 0.9, 0.95),
      "商品按标价打{value}", "the price is {value}"),
    Q("goods_price", "商品成交价", "purchase price", "yuan", ("range", 2_000, 30_000, 100)),
    Q("down_cash", "首期自付金额", "upfront cash payment", "yuan", ("range", 0, 1_500, 100)),
    Q("installment_amount", "分期本金", "amount financed", "yuan", ("range", 1_000, 30_000, 100)),
    Q("installment_count", "分期期数", "number of installments", "installments", ("choice", 3, 6, 12, 24)),
    Q("period_fee_rate", "每期手续费率", "fee rate per installment", "percent", ("choice", 0.006, 0.0066, 0.007, 0.0075)),
    Q("per_period_payment", "每期应还金额", "payment per installment", "yuan", ("range", 100, 5_000, 0.01)),
    Q("total_fee", "分期手续费总额", "total installment fees", "yuan", ("range", 10, 5_000, 0.01)),
    # income tax
    Q("monthly_salary", "税前月工资", "monthly gross salary", "yuan", ("range", 8_000, 60_000, 500)),
    Q("monthly_social", "每月个人缴纳的社保和公积金", "monthly social insurance and housing fund", "yuan",
      ("range", 800, 6_000, 50)),
    Q("children", "子女人数", "number of children in education", "people", ("choice", 1, 2, 3),
      "有{value}名子女正在接受学历教育", "the number of children in full-time education is {value}"),
    Q("annual_salary", "全年工资收入", "annual gross salary", "yuan", ("range", 96_000, 720_000, 1_000)),
    Q("annual_social", "全年个人缴纳的社保和公积金", "annual social insurance and housing fund", "yuan",
      ("range", 9_600, 72_000, 100)),
    Q("special_deduction", "全年专项附加扣除", "annual special additional deduction", "yuan",
      ("choice", 0, 12_000, 24_000, 36_000, 48_000)),
    Q("taxable_income", "全年应纳税所得额", "annual taxable income", "yuan", ("range", 0, 600_000, 100)),
    Q("annual_iit", "全年应缴个人所得税", "annual individual income tax", "yuan", ("range", 0, 150_000, 0.01)),
    # VAT
    Q("unit_price_excl", "不含税单价", "unit price excluding tax", "yuan", ("range", 50, 5_000, 0.5)),
    Q("unit_price_incl", "含税单价", "unit price including tax", "yuan", ("range", 50, 5_000, 0.5)),
    Q("quantity", "数量", "quantity", "pieces", ("range", 10, 500, 10)),
    Q("vat_rate", "增值税税率", "VAT rate", "percent", ("choice", 0.13, 0.09, 0.06)),
    Q("price_excl_tax", "不含税金额", "amount excluding tax", "yuan", ("range", 1_000, 1_000_000, 0.01)),
    Q("price_incl_tax", "价税合计", "amount including tax", "yuan", ("range", 1_000, 1_000_000, 0.01)),
    Q("vat_amount", "增值税税额", "VAT amount", "yuan", ("range", 100, 130_000, 0.01)),
    # FX
    Q("tuition_usd", "学费", "tuition", "usd", ("range", 10_000, 60_000, 500)),
    Q("living_usd", "生活费", "living costs", "usd", ("range", 5_000, 30_000, 500)),
    Q("usd_amount", "需要购买的美元", "US dollars to buy", "usd", ("range", 1_000, 80_000, 100)),
    Q("usd_rate_100", "银行现汇卖出价", "bank's selling rate", "fx100", ("range", 705.0, 732.0, 0.01)),
    Q("usd_rate", "美元兑人民币汇率", "USD/CNY rate", "fx", ("range", 7.05, 7.32, 0.0001)),
    Q("fx_fee_rate", "购汇手续费率", "FX fee rate", "percent", ("choice", 0.001, 0.0015, 0.002)),
    Q("cny_needed", "购汇所需人民币", "yuan needed for the dollars", "yuan", ("range", 7_000, 600_000, 0.01)),
    Q("total_cny_cost", "含手续费的人民币总支出", "total cost in yuan including fees", "yuan",
      ("range", 7_000, 600_000, 0.01)),
    Q("cny_amount", "可用人民币", "yuan available", "yuan", ("range", 10_000, 500_000, 1_000)),
    Q("usd_obtained", "能购买到的美元", "US dollars obtained", "usd", ("range", 1_000, 70_000, 0.01)),
    # transfer fees
    Q("unit_price", "货物单价", "unit price of the goods", "yuan", ("range", 20, 2_000, 0.5)),
    Q("order_quantity", "采购数量", "quantity ordered", "pieces", ("range", 10, 2_000, 10)),
    Q("transfer_amount", "转账金额", "transfer amount", "yuan", ("range", 1_000, 2_000_000, 100)),
    Q("transfer_fee_rate", "跨行转账手续费率", "interbank transfer fee rate", "percent", ("choice", 0.0005, 0.001, 0.002)),
    Q("min_fee", "单笔最低手续费", "minimum fee per transfer", "yuan", ("choice", 1, 2, 5)),
    Q("max_fee", "单笔最高手续费", "maximum fee per transfer", "yuan", ("choice", 25, 50, 200)),
    Q("transfer_fee", "转账手续费", "transfer fee", "yuan", ("range", 1, 200, 0.01)),
    Q("total_debit", "账户共扣款", "total debited from the account", "yuan", ("range", 1_000, 2_000_200, 0.01)),
]

ANNUITY = "loan_principal * monthly_rate * (1 + monthly_rate) ** loan_months / ((1 + monthly_rate) ** loan_months - 1)"
FORMULAS = [
    F("loan_from_ratio", "loan_principal", "house_price * (1 - down_payment_ratio)",
      "贷款本金 = 房屋总价 ×（1 − 首付比例）", "loan principal = house price × (1 − down-payment ratio)"),
    F("loan_from_down", "loan_principal", "house_price - down_payment",
      "贷款本金 = 房屋总价 − 首付款", "loan principal = house price − down payment"),
    F("rate_from_lpr", "annual_rate", "lpr_5y + rate_spread_bp / 10000",
      "贷款年利率 = LPR + 加点（1个基点 = 0.01%）", "annual rate = LPR + spread (1 bp = 0.01%)"),
    F("monthly_from_annual", "monthly_rate", "annual_rate / 12", "月利率 = 年利率 ÷ 12", "monthly rate = annual rate ÷ 12"),
    F("months_from_years", "loan_months", "loan_years * 12", "还款月数 = 贷款年限 × 12", "payments = years × 12"),
    F("annuity_payment", "monthly_payment", ANNUITY,
      "等额本息月供 = 本金 × 月利率 ×（1 + 月利率）^月数 ÷ [（1 + 月利率）^月数 − 1]",
      "annuity payment = P × r × (1 + r)^n ÷ [(1 + r)^n − 1]"),
    F("repayment_from_payment", "total_repayment", "monthly_payment * loan_months",
      "还款总额 = 每月还款额 × 还款月数", "total repayment = monthly payment × number of payments"),
    F("annuity_interest", "total_interest", f"({ANNUITY}) * loan_months - loan_principal",
      "总利息 = 等额本息月供 × 还款月数 − 本金", "total interest = annuity payment × n − principal"),
    F("interest_from_totals", "total_interest", "total_repayment - loan_principal",
      "总利息 = 还款总额 − 贷款本金", "total interest = total repayment − principal"),
    # deposits
    F("rate_from_markup", "deposit_rate", "benchmark_rate * (1 + rate_markup)",
      "存款年利率 = 挂牌利率 ×（1 + 上浮比例）", "deposit rate = posted rate × (1 + markup)"),
    F("years_from_months", "deposit_years", "deposit_months / 12", "存期（年）= 存期（月）÷ 12", "years = months ÷ 12"),
    F("simple_interest", "simple_interest", "deposit_principal * deposit_rate * deposit_years",
      "利息 = 本金 × 年利率 × 存期（年）", "interest = principal × annual rate × years"),
    F("maturity_simple", "maturity_amount", "deposit_principal * (1 + deposit_rate * deposit_years)",
      "本息合计 = 本金 ×（1 + 年利率 × 存期）", "amount = principal × (1 + rate × years)"),
    F("compound", "compound_amount", "deposit_principal * (1 + deposit_rate) ** deposit_years",
      "复利本息合计 = 本金 ×（1 + 年利率）^存期", "compound amount = principal × (1 + rate)^years"),
    F("compound_gain", "compound_interest", "compound_amount - deposit_principal",
      "复利利息 = 复利本息合计 − 本金", "compound interest = compound amount − principal"),
    # credit-card interest
    F("unpaid", "unpaid_balance", "statement_balance - paid_amount", "未还金额 = 账单金额 − 已还金额",
      "unpaid = statement balance − amount repaid"),
    F("days_between", "overdue_days", "repay_day - due_day", "计息天数 = 实际还款日 − 到期还款日",
      "days = repayment day − due day"),
    F("card_interest", "overdue_interest", "unpaid_balance * daily_rate * overdue_days",
      "利息 = 未还金额 × 日利率 × 计息天数", "interest = unpaid balance × daily rate × days"),
    # installments
    F("discounted", "goods_price", "list_price * discount", "成交价 = 标价 × 折扣", "price = list price × discount"),
    F("financed", "installment_amount", "goods_price - down_cash", "分期本金 = 成交价 − 首期自付金额",
      "amount financed = price − upfront cash"),
    F("installment_payment", "per_period_payment", "installment_amount / installment_count + installment_amount * period_fee_rate",
      "每期应还 = 分期本金 ÷ 期数 + 分期本金 × 每期手续费率",
      "payment per installment = financed ÷ n + financed × fee rate"),
    F("installment_fees", "total_fee", "installment_amount * period_fee_rate * installment_count",
      "手续费总额 = 分期本金 × 每期手续费率 × 期数", "total fees = financed × fee rate × n"),
    # income tax
    F("annual_salary", "annual_salary", "monthly_salary * 12", "全年工资 = 月工资 × 12", "annual salary = monthly × 12"),
    F("annual_social", "annual_social", "monthly_social * 12", "全年社保公积金 = 每月缴纳额 × 12",
      "annual contributions = monthly × 12"),
    F("child_deduction", "special_deduction", "children * 24000",
      "子女教育专项附加扣除 = 子女人数 × 2000元 × 12", "child education deduction = children × 2,000 × 12"),
    F("taxable", "taxable_income", "max(annual_salary - 60000 - annual_social - special_deduction, 0)",
      "应纳税所得额 = 全年工资 − 60000元基本减除费用 − 社保公积金 − 专项附加扣除（不低于0）",
      "taxable income = salary − 60,000 basic deduction − contributions − special deductions (not below 0)"),
    F("iit", "annual_iit", "iit_annual(taxable_income)", "个税 = 应纳税所得额 × 适用税率 − 速算扣除数（综合所得年度税率表）",
      "tax = taxable income × bracket rate − quick deduction (annual comprehensive-income table)"),
    # VAT
    F("excl_from_units", "price_excl_tax", "unit_price_excl * quantity", "不含税金额 = 不含税单价 × 数量",
      "amount excl. tax = unit price × quantity"),
    F("incl_from_units", "price_incl_tax", "unit_price_incl * quantity", "价税合计 = 含税单价 × 数量",
      "amount incl. tax = unit price × quantity"),
    F("vat_from_excl", "vat_amount", "price_excl_tax * vat_rate", "税额 = 不含税金额 × 税率", "VAT = amount excl. tax × rate"),
    F("vat_from_incl", "vat_amount", "price_incl_tax / (1 + vat_rate) * vat_rate",
      "税额 = 价税合计 ÷（1 + 税率）× 税率", "VAT = amount incl. tax ÷ (1 + rate) × rate"),
    F("incl_from_excl", "price_incl_tax", "price_excl_tax * (1 + vat_rate)", "价税合计 = 不含税金额 ×（1 + 税率）",
      "amount incl. tax = amount excl. tax × (1 + rate)"),
    # FX
    F("usd_total", "usd_amount", "tuition_usd + living_usd", "所需美元 = 学费 + 生活费", "dollars needed = tuition + living costs"),
    F("rate_per_unit", "usd_rate", "usd_rate_100 / 100", "汇率 = 每100美元牌价 ÷ 100", "rate = quote per 100 USD ÷ 100"),
    F("cny_for_usd", "cny_needed", "usd_amount * usd_rate", "所需人民币 = 美元金额 × 汇率", "yuan needed = dollars × rate"),
    F("cost_with_fee", "total_cny_cost", "cny_needed * (1 + fx_fee_rate)", "总支出 = 购汇人民币 ×（1 + 手续费率）",
      "total cost = yuan needed × (1 + fee rate)"),
    F("usd_for_cny", "usd_obtained", "cny_amount / usd_rate", "可购美元 = 人民币金额 ÷ 汇率", "dollars = yuan ÷ rate"),
    # transfer fees
    F("order_value", "transfer_amount", "unit_price * order_quantity", "转账金额 = 单价 × 数量", "transfer = unit price × quantity"),
    F("capped_fee", "transfer_fee", "min(max(transfer_amount * transfer_fee_rate, min_fee), max_fee)",
      "手续费 = 转账金额 × 费率，但不低于最低收费、不高于最高收费",
      "fee = amount × rate, no less than the minimum and no more than the maximum"),
    F("debit", "total_debit", "transfer_amount + transfer_fee", "扣款总额 = 转账金额 + 手续费", "debit = amount + fee"),
]

LIBRARY = Library(QUANTITIES, FORMULAS)


@dataclass(frozen=True)
class Domain:
    key: str
    targets: tuple[str, ...]
    intros_zh: tuple[str, ...]
    intros_en: tuple[str, ...]


DOMAINS = {d.key: d for d in (
    Domain("loan", ("monthly_payment", "total_interest", "total_repayment", "loan_principal"),
           ("{person}打算申请一笔个人住房贷款，采用等额本息方式还款。", "{person}在银行办理了房贷，按等额本息按月还款。"),
           ("{person} is taking out a mortgage repaid in equal monthly installments (annuity).",
            "{person} has a home loan from a bank, repaid monthly as an annuity.")),
    Domain("deposit", ("simple_interest", "maturity_amount", "compound_interest"),
           ("{person}把一笔钱存入银行定期存款，到期一次还本付息。", "{person}在手机银行办理了一笔整存整取定期存款。"),
           ("{person} puts money into a fixed-term bank deposit.", "{person} opens a time deposit in a mobile banking app.")),
    Domain("card_interest", ("overdue_interest",),
           ("{person}的信用卡本期账单未能全额还款，银行对未还部分按日计息。", "{person}这个月的信用卡没有还清，未还部分需按日计收利息。"),
           ("{person} did not repay a credit-card statement in full; the bank charges daily interest on the rest.",)),
    Domain("installment", ("per_period_payment", "total_fee"),
           ("{person}用信用卡分期购买一台电脑，分期按每期固定手续费率收费。", "{person}在商场用信用卡分期付款买家电。"),
           ("{person} buys a laptop with a credit-card installment plan that charges a fixed fee per installment.",)),
    Domain("income_tax", ("annual_iit", "taxable_income"),
           ("{person}在上海一家公司工作，正在估算本年度的综合所得个人所得税。", "{person}想提前算一算今年要交多少个税。"),
           ("{person} is estimating this year's individual income tax on comprehensive income in China.",)),
    Domain("vat", ("vat_amount", "price_incl_tax"),
           ("{company}向供应商采购一批办公设备，需要开具增值税专用发票。", "{company}销售一批货物，财务正在核算发票金额。"),
           ("{company} buys office equipment and needs a special VAT invoice.",)),
    Domain("fx", ("total_cny_cost", "cny_needed", "usd_obtained"),
           ("{person}准备为出国留学购汇。", "{person}计划在银行购买美元用于境外旅行和学习。"),
           ("{person} is buying US dollars at a bank for studying abroad.",)),
    Domain("transfer_fee", ("transfer_fee", "total_debit"),
           ("{company}通过网上银行向外地供应商跨行转账支付货款。", "{person}用手机银行给外地亲戚跨行汇款。"),
           ("{company} pays a supplier by interbank transfer through online banking.",)),
)}

PEOPLE_ZH = ("小王", "李女士", "张先生", "陈阿姨", "刘经理", "赵同学", "孙先生", "周女士")
PEOPLE_EN = ("Mr. Wang", "Ms. Li", "Mr. Zhang", "Mrs. Chen", "Manager Liu", "Student Zhao", "Mr. Sun", "Ms. Zhou")
COMPANIES_ZH = ("某科技公司", "一家贸易公司", "某制造企业", "一家连锁超市")
COMPANIES_EN = ("a technology company", "a trading company", "a manufacturer", "a supermarket chain")


# --------------------------------------------------------------------------------------------
# Writing values
# --------------------------------------------------------------------------------------------
def _trim(number: float, decimals: int) -> str:
    text = f"{number:,.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def format_value(value: float, unit: str, language: str, computed: bool = False) -> str:
    """How a value is written; ``computed`` money always shows two decimals (the question asks so)."""
    zh = language == "zh"
    if unit in ("yuan", "usd"):
        whole = abs(value - round(value)) < 1e-9 and not computed
        amount = _trim(value, 2) if whole else f"{value:,.2f}"
        if unit == "yuan":
            return f"{amount}元" if zh else f"{amount} yuan"
        return f"{amount}美元" if zh else f"USD {amount}"
    if unit == "percent":
        return f"{_trim(value * 100, 4)}%"
    if unit == "bp":
        points = int(round(value))
        if zh:
            return f"加{points}个基点" if points >= 0 else f"减{-points}个基点"
        return f"plus {points} basis points" if points >= 0 else f"minus {-points} basis points"
    if unit == "discount":
        tenths = _trim(value * 10, 1)
        return f"{tenths}折" if zh else f"{_trim(value * 100, 1)}% of the list price"
    if unit == "fx":
        return f"1美元兑{value:.4f}元人民币" if zh else f"{value:.4f} yuan per US dollar"
    if unit == "fx100":
        return f"每100美元{value:.2f}元人民币" if zh else f"{value:.2f} yuan per 100 US dollars"
    count = int(round(value))
    zh_units = {"years": "年", "months": "个月", "installments": "期", "days": "天", "pieces": "件", "people": ""}
    en_units = {"years": "years", "months": "months", "installments": "installments", "days": "days",
                "pieces": "units", "people": ""}
    if unit == "day":
        return f"本月{count}日" if zh else f"day {count} of the month"
    if unit in zh_units:
        return f"{count}{zh_units[unit]}" if zh else f"{count} {en_units[unit]}".strip()
    raise ValueError(f"no writing rule for unit {unit!r}")


def rounded_answer(value: float, unit: str) -> float:
    decimals = {"percent": 6, "fx": 4, "fx100": 2}.get(unit, 2)
    return round(value + 0.0, decimals)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def _name(key: str, language: str) -> str:
    quantity = LIBRARY.quantities[key]
    return quantity.zh if language == "zh" else quantity.en


def _fact(node: Node, language: str) -> str:
    quantity = LIBRARY.quantities[node.quantity]
    value = format_value(node.value, quantity.unit, language)
    template = quantity.fact_zh if language == "zh" else quantity.fact_en
    return template.format(name=quantity.zh if language == "zh" else quantity.en, value=value)


def _join_en(parts: Sequence[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def render_question(tree: Tree, domain: Domain, givens: list[Node], language: str, rng: random.Random) -> str:
    if language == "zh":
        intro = rng.choice(domain.intros_zh).format(person=rng.choice(PEOPLE_ZH), company=rng.choice(COMPANIES_ZH))
        facts = "，".join(_fact(node, "zh") for node in givens)
        target = _name(tree.root.quantity, "zh")
        ask = rng.choice((f"请问{target}是多少？", f"请计算{target}（结果保留两位小数）。", f"{target}应为多少？"))
        return f"{intro}已知{facts}。{ask}"
    intro = rng.choice(domain.intros_en).format(person=rng.choice(PEOPLE_EN), company=rng.choice(COMPANIES_EN))
    facts = _join_en([_fact(node, "en") for node in givens])
    target = _name(tree.root.quantity, "en")
    ask = rng.choice((f"What is the {target}?", f"Calculate the {target} (round to two decimals).",
                      f"How much is the {target}?"))
    return f"{intro} Given that {facts}. {ask}"


def render_solution(tree: Tree, language: str) -> tuple[str, str]:
    """Worked steps bottom-up, then the final answer line."""
    steps = []

    def visit(node: Node) -> None:
        for child in node.children:
            visit(child)
        if node.formula is not None:
            formula = LIBRARY.formulas[node.formula]
            unit = LIBRARY.quantities[node.quantity].unit
            shown = format_value(rounded_answer(node.value, unit), unit, language, computed=True)
            steps.append(f"{formula.zh if language == 'zh' else formula.en} = {shown}")

    visit(tree.root)
    unit = LIBRARY.quantities[tree.root.quantity].unit
    final = format_value(rounded_answer(tree.root.value, unit), unit, language, computed=True)
    name = _name(tree.root.quantity, language)
    numbered = "\n".join(f"{i}. {step}" for i, step in enumerate(steps, start=1))
    if language == "zh":
        return numbered, f"{numbered}\n答：{name}为{final}。"
    return numbered, f"{numbered}\nAnswer: the {name} is {final}."


def render_refusal(tree: Tree, parent: Node, child: Node, language: str) -> str:
    target = _name(tree.root.quantity, language)
    missing = _name(child.quantity, language)
    needed_by = _name(parent.quantity, language)
    leaves = [_name(node.quantity, language) for node in subtree(child) if node.formula is None and node is not child]
    if language == "zh":
        via = f"计算{needed_by}需要{missing}，但" if parent is not tree.root else ""
        alternative = f"（或用于推算它的{'、'.join(leaves)}）" if leaves else ""
        return f"无法计算{target}：{via}题目没有给出{missing}{alternative}。请补充{missing}后，我再为您计算。"
    via = f"computing the {needed_by} requires the {missing}, but " if parent is not tree.root else ""
    alternative = f" (or the {_join_en(leaves)} needed to derive it)" if leaves else ""
    return (f"The {target} cannot be determined: {via}the question does not give the {missing}{alternative}. "
            f"Please provide the {missing} and I will calculate it.")


# --------------------------------------------------------------------------------------------
# Language stage
# --------------------------------------------------------------------------------------------
# TreeCut's language stage: an LLM writes the word problem from the tree's stated facts (never
# from the cut part) and the quantity asked.  The facts carry every number, so the text is checked
# to state exactly those numbers — an LLM that drops a given, invents a number or leaks the cut
# value is caught, and the template question is kept instead.
VERBALISE_PROMPT = {
    "zh": "请把下面的已知条件写成一道自然、口语化的金融应用题。场景：{scene}\n已知条件：\n{facts}\n所求：{target}\n"
          "要求：每个已知条件都必须出现，数字和单位保持原样；不得增加任何其他数字或条件；最后提出所求的问题，不要给出答案。"
          "只输出题目。",
    "en": "Write the facts below as a natural finance word problem. Setting: {scene}\nFacts:\n{facts}\nAsked: the {target}\n"
          "Requirements: state every fact with its number and unit unchanged; add no other number or condition; end with "
          "the question and do not answer it. Output only the problem.",
}
_NUMBER_RE = re.compile(r"\d[\d,]*(?:\.\d+)?")


def numbers_in(text: str) -> list[str]:
    return sorted(match.replace(",", "") for match in _NUMBER_RE.findall(text))


def verbalise(client: LLMClient, scene: str, facts: Sequence[str], target: str, language: str,
              seed: int) -> Optional[str]:
    """The LLM's word problem, or None when its reply was unusable or its numbers differ from the
    facts' (the template text stays).  An endpoint failure is not caught: it stops the command."""
    prompt = VERBALISE_PROMPT[language].format(scene=scene, facts="\n".join(f"- {fact}" for fact in facts),
                                              target=target)
    try:
        text = client.ask(prompt, temperature=0.7, seed=seed, max_tokens=512).strip()
    except LLMError:
        return None
    expected = numbers_in(" ".join(facts))
    if not text or numbers_in(text) != expected:
        return None
    return text


# --------------------------------------------------------------------------------------------
# Items
# --------------------------------------------------------------------------------------------
def domain_depths() -> dict[str, int]:
    return {key: max(LIBRARY.max_depth(target) for target in domain.targets) for key, domain in DOMAINS.items()}


@dataclass
class RefusalSettings:
    count: int
    seed: int = 0
    cut_depth: Optional[int] = None
    unanswerable_ratio: float = 0.5
    languages: tuple[str, ...] = ("zh",)
    domains: tuple[str, ...] = tuple(DOMAINS)
    max_depth: int = 3


def check_settings(settings: RefusalSettings) -> dict[str, int]:
    unknown = [d for d in settings.domains if d not in DOMAINS]
    if unknown:
        raise UserError(f"--domains {','.join(unknown)}: unknown; choose from {','.join(DOMAINS)}")
    bad_languages = [lang for lang in settings.languages if lang not in ("zh", "en")]
    if bad_languages or not settings.languages:
        raise UserError(f"--languages {','.join(settings.languages)}: expected zh, en or zh,en")
    if not 0 <= settings.unanswerable_ratio <= 1:
        raise UserError(f"--unanswerable-ratio {settings.unanswerable_ratio}: expected a value in [0, 1]")
    if settings.count <= 0:
        raise UserError(f"--count {settings.count}: expected a positive number")
    depths = {d: depth for d, depth in domain_depths().items() if d in settings.domains}
    if settings.cut_depth is not None:
        if settings.cut_depth < 1:
            raise UserError(f"--cut-depth {settings.cut_depth}: depth 1 is the target's direct inputs; use 1 or more")
        deepest = max(depths.values())
        if settings.cut_depth > deepest:
            raise UserError(f"--cut-depth {settings.cut_depth}: the deepest trees of these domains reach depth {deepest}")
    return depths


def make_item(index: int, settings: RefusalSettings, depths: dict[str, int],
              paraphraser: Optional[LLMClient] = None) -> dict:
    rng = random.Random(f"refusal:{settings.seed}:{index}")  # one stream per item: resumable, order-free
    language = settings.languages[index % len(settings.languages)]
    answerable = rng.random() >= settings.unanswerable_ratio
    cut_depth = None
    if not answerable:
        cut_depth = settings.cut_depth or rng.randint(1, max(1, min(settings.max_depth, max(depths.values()))))
    eligible = [d for d in settings.domains if cut_depth is None or depths[d] >= cut_depth]
    domain = DOMAINS[eligible[rng.randrange(len(eligible))]]
    targets = [t for t in domain.targets if cut_depth is None or LIBRARY.max_depth(t) >= cut_depth]
    target = targets[rng.randrange(len(targets))]
    tree = LIBRARY.grow(target, rng, max_depth=max(settings.max_depth, cut_depth or 0),
                        min_depth=cut_depth or 1)
    item = {"id": f"refusal-{index:07d}", "domain": domain.key, "language": language, "answerable": answerable,
            "target": target, "target_name": _name(target, language), "cut_depth": cut_depth}
    if answerable:
        givens = tree.givens()
        reasoning, answer = render_solution(tree, language)
        unit = LIBRARY.quantities[target].unit
        item.update({"answer_value": rounded_answer(tree.root.value, unit), "missing": None,
                     "tree": tree_json(tree, LIBRARY)})
    else:
        edges = tree.cuttable_edges(cut_depth)
        parent, child = edges[rng.randrange(len(edges))]
        removed = {node.quantity for node in subtree(child)}
        givens = [node for node in tree.givens() if node.quantity not in removed]
        reasoning, answer = "", render_refusal(tree, parent, child, language)
        item.update({"answer_value": None,
                     "missing": {"quantity": child.quantity, "name": _name(child.quantity, language),
                                 "depth": child.depth, "needed_by": parent.quantity},
                     "tree": tree_json(tree, LIBRARY, (parent, child))})
    # Stating the givens in a shuffled order keeps the template from leaking the tree's shape.
    givens = sorted(givens, key=lambda node: rng.random())
    question = render_question(tree, domain, givens, language, rng)
    item["paraphrased"] = False
    if paraphraser is not None:
        scene = question.split("已知")[0] if language == "zh" else question.split(" Given that")[0]
        written = verbalise(paraphraser, scene, [_fact(node, language) for node in givens], _name(target, language),
                            language, seed=settings.seed * 1_000_003 + index)
        if written is not None:
            item["template_question"] = question
            question = written
            item["paraphrased"] = True
    item.update({"question": question, "answer": answer, "reasoning": reasoning})
    return item
