"""The paper's tables from a pipeline run, each score with its n and a 95 % bootstrap interval.

* Quality: WikiText-2 perplexity (window bootstrap) and KL / top-1 agreement to the original.
* General and finance benchmarks (the recipe's ``eval.tasks``, grouped by their ``group``), and the
  finance tasks SFT teaches on their held-out splits.
* Table 4: KV bytes per token and max concurrent sequences at equal memory.
* The acceptance figures the text claims, each computed with the interval that supports it:
  the share of the conversion's drop GKD closes (perplexity; mean score over the benchmarks whose
  original is above chance beyond its interval) and, per held-out finance task, the paired
  interval of SFT's gain; per general benchmark, the paired interval of SFT's change.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from mindyouzhi.eval.bootstrap import (DEFAULT_REPLICATES, Interval, bootstrap_metric, bootstrap_perplexity,
                                       paired_difference, perplexity_gap_closure, score_gap_closure, task_metric)

# Chance level of the choice benchmarks (uniform guessing); generation tasks have 0.
CHANCE = {"ceval": 0.25, "fineval": 0.25, "financeiq": 0.25, "hellaswag": 0.25, "fpb": 1 / 3, "sst5": 0.2}


def _load_suite(path: str) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _pct(interval: Interval) -> str:
    return f"{100 * interval.value:.1f} [{100 * interval.low:.1f}, {100 * interval.high:.1f}]"


def _closure(original: float, converted: float, trained: float) -> Optional[float]:
    drop = original - converted
    return (trained - converted) / drop if drop else None


def finished_rows(run) -> list[str]:
    """The rows whose evaluation has finished (all of them once the run reaches ``tables``)."""
    return [row for row in run.rows() if run.state["stages"].get(f"eval-{row}", {}).get("status") == "done"]


def build_tables(run, rows: Optional[list[str]] = None) -> dict:
    """The tables of ``rows`` (default: every row); a run still in progress can be tabled with
    ``finished_rows(run)`` (Table 4 once ``capacity`` has run)."""
    rows = list(rows or run.rows())
    replicates = int(run.recipe["eval"].get("bootstrap", DEFAULT_REPLICATES))
    groups = json.loads(run.path("eval", "groups.json").read_text(encoding="utf-8"))
    evals = {row: run.result(f"eval-{row}") for row in rows}
    suites = {row: _load_suite(evals[row]["suite"]) for row in rows}
    capacity = run.state["stages"].get("capacity", {}).get("result") or {}

    # -- benchmarks -------------------------------------------------------------------------------
    tasks, items = [], {}
    for index, task in enumerate(suites[rows[0]]["tasks"]):
        metric = task_metric(task["task"], task["metric"])
        per_row = {row: suites[row]["tasks"][index]["results"][row]["items"] for row in rows}
        items[task["name"]] = (per_row, metric)
        intervals = {row: bootstrap_metric(per_row[row], metric, replicates) for row in rows}
        record = {"name": task["name"], "task": task["task"], "metric": task["metric"],
                  "group": groups.get(task["name"], "general"), "n": intervals[rows[0]].n,
                  "chance": CHANCE.get(task["task"], 0.0),
                  "scores": {row: interval.to_dict() for row, interval in intervals.items()}}
        if "gkd" in rows and "gkd+sft" in rows:
            record["sft_minus_gkd"] = paired_difference(per_row["gkd"], per_row["gkd+sft"], metric, replicates).to_dict()
        record["above_chance"] = intervals["original"].low > record["chance"]
        tasks.append(record)

    # -- perplexity and KL ------------------------------------------------------------------------
    quality = {}
    for row in rows:
        entry: dict = {}
        ppl = evals[row].get("ppl")
        if ppl:
            if ppl.get("window_nll"):
                entry["ppl"] = bootstrap_perplexity(ppl["window_nll"], ppl["seq_len"] - 1, replicates).to_dict()
            else:
                entry["ppl"] = {"value": ppl["ppl"], "low": None, "high": None, "n": ppl["windows"]}
        kl = evals[row].get("kl")
        if kl:
            entry["kl_mean"] = kl["kl_mean"]
            entry["top1_agreement"] = kl["top1_agreement"]
            entry["kl_tokens"] = kl["tokens"]
        quality[row] = entry

    acceptance = _acceptance(rows, tasks, quality, items, evals, replicates)
    cache = {row: capacity[row] for row in rows if row in capacity}
    tables = {"rows": rows, "bootstrap_replicates": replicates, "quality": quality, "tasks": tasks,
              "capacity": cache, "acceptance": acceptance}
    tables["markdown"] = render(tables)
    return tables


def _acceptance(rows: list[str], tasks: list[dict], quality: dict, items: dict, evals: dict, replicates: int) -> dict:
    """The figures the text claims; each share GKD closes with its interval (``*_interval``: original,
    ours and + GKD resampled together on the same windows, or on the same items of each counted
    benchmark, benchmarks drawn independently)."""
    out: dict = {}
    trio = ("original", "ours", "gkd")
    if not set(trio) <= set(rows):
        return out
    ppl = {row: quality[row].get("ppl", {}).get("value") for row in rows}
    if None not in (ppl["original"], ppl["ours"], ppl["gkd"]):
        out["gkd_ppl_gap_closed"] = _closure(-ppl["original"], -ppl["ours"], -ppl["gkd"])
        windows = [evals[row]["ppl"] for row in trio]
        if all(w.get("window_nll") for w in windows) and len({w["seq_len"] for w in windows}) == 1:
            try:
                out["gkd_ppl_gap_closed_interval"] = perplexity_gap_closure(
                    *(w["window_nll"] for w in windows), windows[0]["seq_len"] - 1, replicates).to_dict()
            except ValueError:  # other windows per row, or no drop to close
                pass
    counted = [task for task in tasks if task["above_chance"] and task["group"] != "finance-heldout"]
    out["benchmarks_above_chance"] = [task["name"] for task in counted]
    if counted:
        mean = {row: sum(task["scores"][row]["value"] for task in counted) / len(counted) for row in rows}
        out["mean_score"] = mean
        out["gkd_score_gap_closed"] = _closure(mean["original"], mean["ours"], mean["gkd"])
        try:
            out["gkd_score_gap_closed_interval"] = score_gap_closure(
                [(*(items[task["name"]][0][row] for row in trio), items[task["name"]][1]) for task in counted],
                replicates).to_dict()
        except ValueError:  # other items per row, or no drop to close
            pass
    if "gkd+sft" in rows:
        out["sft_gain_heldout"] = {task["name"]: task["sft_minus_gkd"] for task in tasks
                                   if task["group"] == "finance-heldout"}
        out["sft_gains_beyond_interval"] = all(gain["low"] > 0 for gain in out["sft_gain_heldout"].values()) \
            if out["sft_gain_heldout"] else None
        general = [task for task in tasks if task["group"] != "finance-heldout"]
        out["general_drops_beyond_interval"] = [task["name"] for task in general if task["sft_minus_gkd"]["high"] < 0]
    return out


def render(tables: dict) -> str:
    rows = tables["rows"]
    lines = [f"Intervals: 95 % percentile bootstrap ({tables['bootstrap_replicates']} resamples of items/windows).", ""]
    lines += ["**Quality**", "", "| model | WikiText-2 ppl [95 % CI] | windows | KL to original | top-1 agreement |",
              "|---|---:|---:|---:|---:|"]
    for row in rows:
        entry = tables["quality"][row]
        ppl = entry.get("ppl")
        ppl_text = "—" if not ppl else (f"{ppl['value']:.3f}" + (f" [{ppl['low']:.3f}, {ppl['high']:.3f}]"
                                                                 if ppl.get("low") is not None else ""))
        kl = f"{entry['kl_mean']:.4f}" if "kl_mean" in entry else "—"
        top1 = f"{entry['top1_agreement']:.4f}" if "top1_agreement" in entry else "—"
        lines.append(f"| {row} | {ppl_text} | {ppl['n'] if ppl else '—'} | {kl} | {top1} |")
    for group, title in (("general", "General benchmarks"), ("finance", "Finance benchmarks"),
                         ("finance-heldout", "Finance tasks SFT teaches (held-out items)")):
        members = [task for task in tables["tasks"] if task["group"] == group]
        if not members:
            continue
        lines += ["", f"**{title}** (% [95 % CI])", "",
                  "| model | " + " | ".join(f"{t['name']} (n={t['n']})" for t in members) + " |",
                  "|---|" + "---:|" * len(members)]
        for row in rows:
            lines.append(f"| {row} | " + " | ".join(_pct(Interval(**t["scores"][row])) for t in members) + " |")
        if "gkd" in rows and "gkd+sft" in rows:
            lines.append("| SFT − GKD (paired) | " + " | ".join(
                f"{100 * t['sft_minus_gkd']['value']:+.1f} [{100 * t['sft_minus_gkd']['low']:+.1f}, "
                f"{100 * t['sft_minus_gkd']['high']:+.1f}]" for t in members) + " |")
    if tables["capacity"]:
        first = next(iter(tables["capacity"].values()))
        lines += ["", f"**Table 4: KV cache** ({first['dtype']}, {first['memory_bytes'] / 2 ** 30:.0f} GiB, "
                      f"context {first['context']})", "", "| model | KV bytes / token | max concurrent sequences |",
                  "|---|---:|---:|"]
        for row in rows:
            if row in tables["capacity"]:
                cell = tables["capacity"][row]
                lines.append(f"| {row} | {cell['kv_bytes_per_token']:,} | {cell['max_sequences']:,} |")
    acceptance = tables["acceptance"]
    if acceptance:
        lines += ["", "**Acceptance figures**", ""]
        for key, value in acceptance.items():
            lines.append(f"- {key}: {json.dumps(value, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"
