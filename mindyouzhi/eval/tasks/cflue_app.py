"""CFLUE application assessment (CFLUE-A): finance NLP tasks posed as instructions.

``data/application/application.json`` (a JSON array, or JSONL) of records::

    {"task": "金融文本分类", "sub_task": "ESG情感分类", "instruction": "...\\n分类结果：",
     "input": "", "output": "正向", "history": []}

The instruction is the whole prompt (``input``, when not empty, is appended on a new line).
Scoring follows the CFLUE authors' scorer, per task:

* 金融文本分类 (text classification) — accuracy: ESG情感分类 is right when the label's first character
  (正/中/负) appears in the response (or the response is exactly Positive/Negative for 正向/负向);
  合规政策审核 reads 不合规/不符合 as "否", anything else as "是"; other sub-tasks take the single
  quoted category (``'物料'``) when the response quotes one, count a response listing several
  categories (it contains ``,``, ``，`` or ``、``) as wrong, and otherwise need the label inside the
  response.
* 金融文本抽取 (extraction) — F1: 金融事件主体抽取 is right when the gold subject appears in the
  response; structured sub-tasks (gold a list of objects, e.g. cause/effect with ``reason_type``…)
  compare the set of non-empty ``key|value`` pairs parsed from ``key: value`` lines of the response
  (Chinese field names such as 原因类型 map to the gold keys) with the gold pairs.
* 金融咨询 (QA) and 金融文本生成 (text generation) — ROUGE-L over jieba words.
* 金融翻译 (translation, 金融中英翻译 / 金融英中翻译) — corpus BLEU-4 per direction.

COMET and BERTScore, which the authors also report, need large neural models and are not computed.
Each task's metric is reported under ``<task>/<metric>``; the headline ``score`` is their mean (0-1,
BLEU divided by 100).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from .base import GenerationItem, TaskOptions, data_error, json_objects, require_file, required_text
from .textmetrics import corpus_bleu, rouge_l

CLASSIFICATION, EXTRACTION, QA, GENERATION, TRANSLATION = "金融文本分类", "金融文本抽取", "金融咨询", "金融文本生成", "金融翻译"
TASK_METRICS = {CLASSIFICATION: "accuracy", EXTRACTION: "f1", QA: "rouge_l", GENERATION: "rouge_l", TRANSLATION: "bleu"}
FIELD_NAMES = {
    "原因类型": "reason_type", "原因产品": "reason_product", "原因行业": "reason_industry", "原因地区": "reason_region",
    "结果类型": "result_type", "结果产品": "result_product", "结果行业": "result_industry", "结果地区": "result_region",
}


def _application_file(data: Path) -> Path:
    data = Path(data)
    if data.is_dir() and (data / "application.json").is_file():
        return data / "application.json"
    if data.is_dir() and (data / "application" / "application.json").is_file():
        return data / "application" / "application.json"
    return require_file(data)


def load_cflue_app(data: Path, options: TaskOptions) -> list[GenerationItem]:
    if options.shots:
        raise data_error(data, "", "CFLUE application tasks are zero-shot instructions: use --shots 0")
    path = _application_file(data)
    items = []
    counts: dict[str, int] = {}
    for where, record in json_objects(path):
        task = record.get("task")
        if task not in TASK_METRICS:
            raise data_error(path, where, f"'task' is {task!r}, expected one of {', '.join(TASK_METRICS)}")
        instruction = required_text(path, where, record, "instruction")
        if "output" not in record or record["output"] in (None, ""):
            raise data_error(path, where, "missing 'output' (the reference answer)")
        # --limit applies per task, so a small run still covers every task of the table.
        counts[task] = counts.get(task, 0) + 1
        if options.limit is not None and counts[task] > options.limit:
            continue
        extra = str(record.get("input") or "").strip()
        prompt = instruction if not extra else f"{instruction}\n{extra}"
        gold = {"sub_task": str(record.get("sub_task") or task), "output": record["output"]}
        items.append(GenerationItem(f"{path.name}:{where}", task, prompt, gold, stop=()))
    if not items:
        raise data_error(path, "", "no records")
    return items


def classification_correct(sub_task: str, label: str, response: str) -> bool:
    if sub_task == "ESG情感分类":
        return label[:1] in response or (label, response) in {("负向", "Negative"), ("正向", "Positive")}
    if sub_task == "合规政策审核":
        predicted = "否" if any(word in response for word in ("不合规", "不符合")) else "是"
        return predicted == label
    answer = response.strip("\n")
    quoted = re.findall(r"'([^']*)'", answer)
    if quoted:
        return len(quoted) == 1 and quoted[0] == label
    if any(mark in answer for mark in (",", "，", "、")):
        return False
    return label in answer


def _pairs_f1(gold: set, predicted: set) -> float:
    common = len(gold & predicted)
    if not common:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def parse_key_values(response: str) -> set:
    text = response.replace("：", ":").replace("，", ",").replace("；", ";")
    pairs = set()
    for line in text.splitlines():
        key, separator, value = line.partition(":")
        key, value = key.strip().strip("-* "), value.strip().strip(",;。.")
        if separator and key and value:
            pairs.add(f"{FIELD_NAMES.get(key, key)}|{value}")
    return pairs


def extraction_f1(sub_task: str, gold: Any, response: str) -> float:
    if isinstance(gold, str):
        return 1.0 if gold.strip() and gold.strip() in response else 0.0
    records = gold if isinstance(gold, list) else [gold]
    gold_pairs = {f"{key}|{value}" for record in records if isinstance(record, dict)
                  for key, value in record.items() if str(value).strip()}
    if not gold_pairs:
        return 1.0 if not parse_key_values(response) else 0.0
    return _pairs_f1(gold_pairs, parse_key_values(response))


def score_cflue_app(response: str, item: GenerationItem) -> dict:
    sub_task, gold = item.gold["sub_task"], item.gold["output"]
    row: dict = {"sub_task": sub_task, "gold": gold}
    if item.group == CLASSIFICATION:
        row["score"] = float(classification_correct(sub_task, str(gold), response))
    elif item.group == EXTRACTION:
        row["score"] = extraction_f1(sub_task, gold, response)
    elif item.group in (QA, GENERATION):
        row["score"] = rouge_l(response, str(gold))
    # Translation is scored at corpus level in aggregate_cflue_app (BLEU is not a mean of sentences).
    return row


def aggregate_cflue_app(rows: Sequence[dict]):
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        by_task.setdefault(row["group"], []).append(row)
    metrics, groups = {}, {}
    for task, members in sorted(by_task.items()):
        metric = TASK_METRICS[task]
        if task == TRANSLATION:
            per_direction = {}
            for row in members:
                per_direction.setdefault(row["sub_task"], []).append(row)
            bleus = {direction: corpus_bleu([r["response"] for r in rs], [str(r["gold"]) for r in rs])
                     for direction, rs in sorted(per_direction.items())}
            value = sum(bleus.values()) / len(bleus) / 100
            for direction, bleu in bleus.items():
                metrics[f"{direction}/bleu"] = round(bleu / 100, 6)
        else:
            value = sum(row["score"] for row in members) / len(members)
        metrics[f"{task}/{metric}"] = round(value, 6)
        groups[task] = {"n": len(members), "score": round(value, 6), "metric": metric}
    metrics = {"score": round(sum(group["score"] for group in groups.values()) / len(groups), 6), **metrics}
    return metrics, groups, {}
