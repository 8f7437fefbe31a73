"""``mindyouzhi data``: finance training-data construction commands.

Every command reads and writes JSONL, streams its input, is deterministic under ``--seed``, shows a
tqdm bar on stderr (the shared ``--progress/--no-progress`` rule), writes its output atomically
(refusing to overwrite without ``--overwrite``) and ends with a summary: a few lines for people, or
exactly one JSON object on stdout with ``--json``; ``--report PATH`` also saves it.
"""
from __future__ import annotations

import functools
import inspect
from collections import Counter
from typing import Optional

import click

from ..cli_support import (UserErrorGroup, emit, forward_precision_option, json_option, overwrite_option,
                           progress_option, renamed_option)
from ..errors import UserError
from ..io_utils import write_json_atomic
from ..progress import progress_enabled


DataGroup = UserErrorGroup  # ``mindyouzhi data`` also works as a standalone group (tests invoke it directly)


def _split_list(value: Optional[str]) -> Optional[list]:
    return [part.strip() for part in value.split(",") if part.strip()] if value else None


# The parameters of ``data`` commands that name files they read, and how the user spells them.
INPUT_PARAMS = {"input_path": "INPUT", "gold_path": "GOLD", "pred_path": "PRED", "seeds_path": "--seeds",
                "templates": "--templates", "tokenizer": "--tokenizer", "llm_cache": "--llm-cache",
                "model_dir": "--model", "records_path": "--input"}


def summary_options(function):
    """--report, --json and --progress, shared by every command that ends with a summary; the
    command receives the progress decision as ``show_progress`` for the library calls that take it.

    Before the command runs, its outputs (--out, --report) are checked against its inputs and each
    other (:func:`mindyouzhi.paths.check_outputs`); a command without its own --overwrite gets one
    for --report."""
    from ..paths import check_outputs

    takes_overwrite = "overwrite" in inspect.signature(function).parameters

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        overwrite = kwargs["overwrite"] if takes_overwrite else kwargs.pop("overwrite")
        inputs = {flag: kwargs.get(name) for name, flag in INPUT_PARAMS.items()}
        check_outputs({"--out": kwargs.get("out"), "--report": kwargs.get("report")}, inputs, overwrite)
        return function(*args, show_progress=progress_enabled(), **kwargs)

    report = click.option("--report", type=click.Path(dir_okay=False), help="Also write the summary JSON to this file.")
    command = report(progress_option(json_option(wrapper)))
    return command if takes_overwrite else overwrite_option(command)


def _apply(function, options):
    for option in reversed(options):
        function = option(function)
    return function


def output_options(function):
    return _apply(function, [
        click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output JSONL file."),
        overwrite_option,
        click.option("--seed", type=int, default=0, show_default=True, help="Seed: same seed, same output."),
    ])


def llm_options(prefix: str, what: str):
    """--<prefix>-url/-model plus the shared client knobs (timeout, retries, cache)."""
    return lambda function: _apply(function, [
        click.option(f"--{prefix}-url", "llm_url",
                     help=f"OpenAI-compatible endpoint for {what} (e.g. http://127.0.0.1:8000/v1)."),
        click.option(f"--{prefix}-model", "llm_model", default="default", show_default=True,
                     help="Model name sent to the endpoint."),
        click.option("--llm-timeout", type=float, default=60.0, show_default=True, help="Seconds per request."),
        click.option("--llm-retries", type=int, default=3, show_default=True, help="Retries on errors, 429 and 5xx."),
        click.option("--llm-cache", type=click.Path(dir_okay=False), help="JSONL request cache (reused across runs)."),
    ])


def make_client(url: Optional[str], model: str, timeout: float, retries: int, cache: Optional[str], flag: str):
    if not url:
        return None
    from .llm_client import LLMClient

    return LLMClient(url, model=model, timeout=timeout, retries=retries, cache_path=cache, flag=flag)


def finish(summary: dict, as_json: bool, report: Optional[str], lines: list[str]) -> None:
    if report:
        write_json_atomic(report, summary)
    emit(summary, as_json, "\n".join(lines + ([f"report: {report}"] if report else [])))


def skipped_line(summary: dict) -> list[str]:
    skipped = summary.get("skipped_lines", {}).get("count", 0)
    return [f"skipped {skipped} malformed line(s) (listed in the report)"] if skipped else []


@click.group(name="data", cls=DataGroup)
def data():
    """Finance training-data construction: compress, refusal, amounts, ifeval, augment, banking."""


# --------------------------------------------------------------------------------------------
# compress
# --------------------------------------------------------------------------------------------
@data.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=False))
@output_options
@click.option("--budget", required=True, help="Samples or tokens to keep: a number, or a share such as 10%.")
@click.option("--budget-unit", type=click.Choice(["samples", "tokens"]), default="samples", show_default=True)
@click.option("--min-quality", type=click.IntRange(1, 6), default=4, show_default=True,
              help="Quality threshold: samples at or above it are selected first.")
@click.option("--allocation", type=click.Choice(["balanced", "proportional"]), default="balanced", show_default=True,
              help="How the budget is split across categories (water-filling with equal or size weights).")
@click.option("--round-size", type=click.IntRange(1, 4096), default=32, show_default=True,
              help="Samples accepted per re-scoring round of the information-gain greedy (formerly --batch-size, "
                   "still accepted until the next release).")
@renamed_option("--batch-size", "--round-size", "round_size", type=click.IntRange(1, 4096))
@click.option("--tokenizer", type=click.Path(dir_okay=False), help="tokenizer.json for exact token counts.")
@click.option("--skip-bad", is_flag=True, help="Skip and report malformed lines instead of failing.")
@llm_options("tagger", "InsTag/DEITA-style tagging (default: the built-in heuristic tagger)")
@click.option("--tagger-workers", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Concurrent tagging requests.")
@summary_options
def compress(input_path, out, overwrite, seed, budget, budget_unit, min_quality, allocation, round_size, tokenizer,
             skip_bad, llm_url, llm_model, llm_timeout, llm_retries, llm_cache, tagger_workers, report, as_json,
             show_progress):
    """Compress a JSONL pool to a budget: quality, category coverage, difficulty balance, then zlib information gain."""
    from .compress import CompressSettings, compress_file, parse_budget, token_counter
    from .tagging import HeuristicTagger, LLMTagger

    settings = CompressSettings(parse_budget(budget, budget_unit), min_quality, allocation, round_size, seed)
    client = make_client(llm_url, llm_model, llm_timeout, llm_retries, llm_cache, "--tagger-url")
    tagger = LLMTagger(client) if client else HeuristicTagger()
    summary = compress_file(input_path, out, settings, tagger, token_counter(tokenizer) if budget_unit == "tokens" else None,
                            skip_bad, overwrite, show_progress, tagger_workers if client else 1)
    if client:
        summary["llm"] = client.stats()
    lines = [f"kept {summary['kept']} of {summary['pool']} samples "
             f"({summary['budget']['spent']}/{summary['budget']['resolved']} {budget_unit}) → {out}",
             f"categories kept {summary['categories_kept']}/{summary['categories_in_pool']}; "
             f"tags carried {summary['tags']['carried']}, tagged by {summary['tagger']} {summary['tags']['tagged']}"]
    finish(summary, as_json, report, lines + skipped_line(summary))


# --------------------------------------------------------------------------------------------
# refusal
# --------------------------------------------------------------------------------------------
@data.command()
@output_options
@click.option("--count", type=int, required=True, help="Number of items.")
@click.option("--cut-depth", type=int, help="Depth of the removed edge in unanswerable items (1 = the target's inputs).")
@click.option("--unanswerable-ratio", type=float, default=0.5, show_default=True)
@click.option("--languages", default="zh", show_default=True, help="zh, en or zh,en (alternating).")
@click.option("--domains", help="Comma-separated subset of: loan, deposit, card_interest, installment, income_tax, vat, fx, transfer_fee.")
@click.option("--max-depth", type=click.IntRange(1, 6), default=3, show_default=True, help="Deepest tree grown.")
@llm_options("paraphrase", "paraphrasing the questions (optional)")
@summary_options
def refusal(out, overwrite, seed, count, cut_depth, unanswerable_ratio, languages, domains, max_depth, llm_url,
            llm_model, llm_timeout, llm_retries, llm_cache, report, as_json, show_progress):
    """Finance word problems from logic trees: answerable items and unanswerable ones with a refusal."""
    from .jsonl import JsonlWriter, progress
    from .refusal import DOMAINS, RefusalSettings, check_settings, make_item

    settings = RefusalSettings(count, seed, cut_depth, unanswerable_ratio, tuple(_split_list(languages) or ()),
                               tuple(_split_list(domains) or DOMAINS), max_depth)
    depths = check_settings(settings)
    client = make_client(llm_url, llm_model, llm_timeout, llm_retries, llm_cache, "--paraphrase-url")
    counts = {key: Counter() for key in ("domain", "language", "answerable", "cut_depth", "missing", "target")}
    paraphrased = 0
    with JsonlWriter(out, overwrite) as writer, progress(count, "refusal", show_progress) as bar:
        for index in range(count):
            item = make_item(index, settings, depths, client)
            writer.write(item)
            counts["domain"][item["domain"]] += 1
            counts["language"][item["language"]] += 1
            counts["answerable"]["answerable" if item["answerable"] else "unanswerable"] += 1
            counts["target"][item["target"]] += 1
            if not item["answerable"]:
                counts["cut_depth"][str(item["cut_depth"])] += 1
                counts["missing"][item["missing"]["quantity"]] += 1
            paraphrased += item["paraphrased"]
            bar.update(1)
    summary = {"output": out, "items": count, "seed": seed, "domain_max_depth": depths,
               **{f"per_{key}": dict(sorted(value.items())) for key, value in counts.items()},
               "paraphrased": paraphrased, "paraphrase_kept_template": count - paraphrased if client else 0}
    if client:
        summary["llm"] = client.stats()
    finish(summary, as_json, report, [
        f"wrote {count} items → {out}: {counts['answerable']['answerable']} answerable, "
        f"{counts['answerable']['unanswerable']} unanswerable", f"domains: {dict(counts['domain'])}"])


# --------------------------------------------------------------------------------------------
# amounts
# --------------------------------------------------------------------------------------------
@data.group(cls=DataGroup)
def amounts():
    """Chinese uppercase RMB amounts (PBoC rules): convert both ways, generate training tasks."""


@amounts.command("to-upper")
@click.argument("amount")
@json_option
def amounts_to_upper(amount, as_json):
    """150.00 → 壹佰伍拾元整 (accepts 1,680.32, ¥150, 150元)."""
    from .amounts import format_cents, parse_arabic, to_upper

    cents = parse_arabic(amount)
    emit({"amount": format_cents(cents), "upper": to_upper(cents)}, as_json, to_upper(cents))


@amounts.command("to-lower")
@click.argument("text")
@json_option
def amounts_to_lower(text, as_json):
    """壹佰伍拾元整 → 150.00 (every spelling the rules allow; prints the canonical amount)."""
    from .amounts import format_cents, to_lower, to_upper

    cents = to_lower(text)
    emit({"upper": text, "amount": format_cents(cents), "canonical": to_upper(cents)}, as_json, format_cents(cents))


@amounts.command("generate")
@output_options
@click.option("--count", type=int, required=True, help="Number of items.")
@click.option("--seeds", "seeds_path", type=click.Path(dir_okay=False),
              help="Seed JSONL (instruction/output pairs); default: the built-in seeds.")
@click.option("--evolve-ratio", type=float, default=0.3, show_default=True, help="Share of evolved (harder) items.")
@click.option("--skip-bad", is_flag=True, help="Skip and report malformed or wrong seeds instead of failing.")
@llm_options("llm", "Self-Instruct/Evol-Instruct instruction templates (optional; `mindyouzhi serve` works)")
@click.option("--llm-templates", type=click.IntRange(0), default=20, show_default=True,
              help="With --llm-url: LLM requests for new instruction templates (alternating Self-/Evol-Instruct).")
@summary_options
def amounts_generate(out, overwrite, seed, count, seeds_path, evolve_ratio, skip_bad, llm_url, llm_model, llm_timeout,
                     llm_retries, llm_cache, llm_templates, report, as_json, show_progress):
    """Amplify seed samples into varied, verified amount-conversion instructions."""
    from .amount_tasks import AmountTaskSettings, generate_items, llm_templates as make_llm_templates, load_seeds
    from .jsonl import BadLines, JsonlWriter, progress

    if count <= 0:
        raise UserError(f"--count {count}: expected a positive number")
    writer = JsonlWriter(out, overwrite)
    bad_lines = BadLines()
    templates = load_seeds(seeds_path, bad_lines, skip_bad)
    stats = {"verification_failed": [], "duplicates_dropped": 0, "llm_templates": Counter(), "llm_rejected": Counter()}
    client = make_client(llm_url, llm_model, llm_timeout, llm_retries, llm_cache, "--llm-url")
    if client is not None:
        templates = templates + make_llm_templates(client, templates, llm_templates, seed, stats)
    per = {key: Counter() for key in ("kind", "direction", "scenario")}
    with writer, progress(count, "amounts", show_progress) as bar:
        for item in generate_items(templates, AmountTaskSettings(count, seed, evolve_ratio), stats):
            writer.write(item)
            for key in per:
                per[key][item[key]] += 1
            bar.update(1)
    summary = {"output": out, "items": writer.count, "requested": count, "seed": seed, "seeds": len(templates),
               **{f"per_{key}": dict(sorted(value.items())) for key, value in per.items()},
               "duplicates_dropped": stats["duplicates_dropped"],
               "verification_failed": {"count": len(stats["verification_failed"]), "items": stats["verification_failed"]},
               "skipped_lines": bad_lines.summary()}
    if client is not None:
        summary.update(llm_templates=dict(stats["llm_templates"]), llm_rejected=dict(stats["llm_rejected"]),
                       llm=client.stats())
    lines = [f"wrote {writer.count} items from {len(templates)} seeds → {out}",
             f"duplicates dropped {stats['duplicates_dropped']}, verification failures {len(stats['verification_failed'])}"]
    if writer.count < count:
        lines.append(f"warning: only {writer.count} distinct items could be made (requested {count})")
    finish(summary, as_json, report, lines + skipped_line(summary))


# --------------------------------------------------------------------------------------------
# ifeval
# --------------------------------------------------------------------------------------------
@data.group(cls=DataGroup)
def ifeval():
    """Instruction-following data from format-constraint templates, and its verifier."""


@ifeval.command("generate")
@click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=False))
@output_options
@click.option("--templates", type=click.Path(dir_okay=False), help="Constraint catalogue YAML (default: built in).")
@click.option("--max-constraints", type=click.IntRange(1, 8), default=3, show_default=True,
              help="Constraints per item (1 to this many).")
@click.option("--variants", type=click.IntRange(1, 100), default=1, show_default=True,
              help="Constrained items per input sample.")
@click.option("--skip-bad", is_flag=True, help="Skip and report malformed lines instead of failing.")
@summary_options
def ifeval_generate(input_path, out, overwrite, seed, templates, max_constraints, variants, skip_bad, report, as_json,
                    show_progress):
    """Turn (question, answer, reasoning) samples into constrained instructions with conforming answers."""
    import random

    from .ifeval import IfevalStats, constrain, content_from_sample, load_catalog
    from .jsonl import BadLines, JsonlWriter, read_jsonl
    from .samples import sample_text

    catalog = load_catalog(templates)
    writer = JsonlWriter(out, overwrite)
    bad_lines = BadLines()
    stats = IfevalStats()

    def validate(data):
        text = sample_text(data)
        if not text.response.strip():
            raise ValueError("the sample has no answer to constrain")
        return text

    records = 0
    with writer:
        for record in read_jsonl(input_path, bad_lines, skip_bad, validate, show_progress, desc="ifeval"):
            records += 1
            content = content_from_sample(record.parsed)
            for variant in range(variants):
                rng = random.Random(f"ifeval:{seed}:{record.line_no}:{variant}")
                item = constrain(content, catalog, rng, max_constraints)
                if item is None:
                    stats.unsatisfiable.append({"line": record.line_no, "variant": variant})
                    continue
                item = {"id": f"ifeval-{record.line_no}-{variant}", **item,
                        "source": {"question": content.question, "answer": content.answer,
                                   "reasoning": content.reasoning, "line": record.line_no}}
                writer.write(item)
                stats.count(item)
        if not records:  # an empty output would look like success
            raise UserError(f"INPUT {input_path}: no usable sample"
                            + (f" ({len(bad_lines.entries)} malformed line(s) skipped)" if bad_lines.entries else ""))
    summary = {"output": out, "items": stats.generated, "seed": seed, "catalog": catalog.source,
               "per_constraint": dict(sorted(stats.per_constraint.items())),
               "unsatisfiable": {"count": len(stats.unsatisfiable), "items": stats.unsatisfiable},
               "skipped_lines": bad_lines.summary()}
    finish(summary, as_json, report, [f"wrote {stats.generated} constrained items → {out}",
                                      f"no satisfiable constraint set for {len(stats.unsatisfiable)} sample variant(s)"]
           + skipped_line(summary))


@ifeval.command("verify")
@click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=False))
@click.option("--response-field", default="response", show_default=True,
              help="Field holding the model output (lines also need 'constraints').")
@click.option("--out", type=click.Path(dir_okay=False), help="Per-item results JSONL.")
@overwrite_option
@click.option("--skip-bad", is_flag=True, help="Skip and report malformed lines instead of failing.")
@summary_options
def ifeval_verify(input_path, response_field, out, overwrite, skip_bad, report, as_json, show_progress):
    """Check model outputs against their constraints: prompt- and instruction-level accuracy."""
    import contextlib

    from .ifeval import KINDS, verify
    from .jsonl import BadLines, JsonlWriter, read_jsonl

    def validate(data):
        constraints = data.get("constraints")
        if not isinstance(constraints, list) or not all(isinstance(c, dict) and c.get("kind") in KINDS for c in constraints):
            raise ValueError("'constraints' must be a list of {id, kind, params} with known kinds")
        response = data.get(response_field)
        if not isinstance(response, str):
            raise ValueError(f"no string field {response_field!r} with the model output")
        return constraints, response

    bad_lines = BadLines()
    prompts = prompts_ok = instructions = instructions_ok = 0
    per_kind: dict[str, Counter] = {}
    writer = JsonlWriter(out, overwrite) if out else None
    with (writer or contextlib.nullcontext()):
        for record in read_jsonl(input_path, bad_lines, skip_bad, validate, show_progress, desc="verify"):
            constraints, response = record.parsed
            results = verify(constraints, response)
            passed = all(r["pass"] for r in results)
            prompts += 1
            prompts_ok += passed
            instructions += len(results)
            instructions_ok += sum(r["pass"] for r in results)
            for result in results:
                counter = per_kind.setdefault(result["kind"], Counter())
                counter["total"] += 1
                counter["pass"] += result["pass"]
            if writer:
                writer.write({"id": record.data.get("id", record.line_no), "pass": passed, "results": results})
    share = (lambda a, b: round(a / b, 4) if b else 0.0)
    summary = {"input": input_path, "prompts": prompts, "prompt_level_accuracy": share(prompts_ok, prompts),
               "instructions": instructions, "instruction_level_accuracy": share(instructions_ok, instructions),
               "per_kind": {k: {"pass": v["pass"], "total": v["total"], "accuracy": share(v["pass"], v["total"])}
                            for k, v in sorted(per_kind.items())},
               "skipped_lines": bad_lines.summary()}
    finish(summary, as_json, report, [
        f"prompt-level accuracy {summary['prompt_level_accuracy']:.4f} ({prompts_ok}/{prompts})",
        f"instruction-level accuracy {summary['instruction_level_accuracy']:.4f} ({instructions_ok}/{instructions})"]
        + skipped_line(summary))


# --------------------------------------------------------------------------------------------
# augment
# --------------------------------------------------------------------------------------------
@data.command()
@output_options
@click.option("--count", type=int, required=True, help="Instructions to generate.")
@llm_options("llm", "generation (required; `mindyouzhi serve` works)")
@click.option("--input", "input_path", type=click.Path(dir_okay=False),
              help="Existing dataset: its domain coverage decides which domains are missing.")
@click.option("--domains", help="Target domains (taxonomy slugs or free names); default: the finance taxonomy.")
@click.option("--min-per-domain", type=int, default=50, show_default=True,
              help="A domain with fewer samples in --input counts as missing.")
@click.option("--language", type=click.Choice(["zh", "en"]), default="zh", show_default=True)
@click.option("--max-constraints", type=click.IntRange(0, 6), default=2, show_default=True,
              help="Format constraints injected per instruction (1 to this many; 0 for none).")
@click.option("--cross-ratio", type=float, default=0.5, show_default=True,
              help="Share of instructions that also draw on a knowledge point from another domain.")
@click.option("--judge", is_flag=True, help="Ask the LLM to judge each answer's substance; drop rejected ones.")
@click.option("--dedup-threshold", type=float, default=0.7, show_default=True,
              help="MinHash/Jaccard similarity above which an instruction is a near-duplicate.")
@click.option("--fanout", type=click.IntRange(1, 50), default=5, show_default=True,
              help="Requests, scenarios, personas and knowledge points asked for per call.")
@click.option("--templates", type=click.Path(dir_okay=False), help="Constraint catalogue YAML (default: built in).")
@click.option("--skip-bad", is_flag=True, help="Skip and report malformed --input lines instead of failing.")
@summary_options
def augment(out, overwrite, seed, count, llm_url, llm_model, llm_timeout, llm_retries, llm_cache, input_path, domains,
            min_per_domain, language, max_constraints, cross_ratio, judge, dedup_threshold, fanout, templates, skip_bad,
            report, as_json, show_progress):
    """DecIF-style synthesis for missing domains: meta-domain → request → scenario → persona, verified answers."""
    from .augment import AugmentSettings, AugmentStats, DecifPipeline, check_domains, input_exists
    from .ifeval import load_catalog
    from .jsonl import BadLines, JsonlWriter

    if not llm_url:
        raise UserError("--llm-url is required: data augment generates through an OpenAI-compatible endpoint")
    if count <= 0:
        raise UserError(f"--count {count}: expected a positive number")
    input_exists(input_path)
    writer = JsonlWriter(out, overwrite)
    client = make_client(llm_url, llm_model, llm_timeout, llm_retries, llm_cache, "--llm-url")
    settings = AugmentSettings(count, seed, language, check_domains(_split_list(domains)), min_per_domain,
                               max_constraints, cross_ratio, judge, dedup_threshold, fanout)
    stats = AugmentStats()
    pipeline = DecifPipeline(client, load_catalog(templates), settings, stats)
    bad_lines = BadLines()
    missing, covered_points = pipeline.survey(input_path, bad_lines, skip_bad, show_progress)
    with writer:
        for item in pipeline.run(missing, covered_points, show_progress):
            writer.write(item)
        if missing and writer.count == 0:
            # Every reply was unusable: an empty file would look like success.  The request cache
            # keeps the replies, so a re-run with another model or prompt setup pays nothing twice.
            detail = stats.drop_details[0]["detail"] if stats.drop_details else "no details"
            raise UserError(f"--llm-url {llm_url}: no instruction could be generated ({dict(stats.dropped)}; "
                            f"first: {detail})")
    summary = {"output": out, "items": writer.count, "requested": count, "seed": seed, "coverage": stats.coverage,
               "missing_domains": stats.missing_domains, "per_domain": dict(sorted(stats.generated.items())),
               "covered_domains_with_knowledge": sorted(covered_points), "repaired": stats.repaired,
               "retried": stats.retried, "attempts": stats.attempts, "dropped": dict(sorted(stats.dropped.items())),
               "drop_details": stats.drop_details, "llm": client.stats(), "skipped_lines": bad_lines.summary()}
    lines = [f"wrote {writer.count} of {count} instructions for {len(missing)} missing domain(s) → {out}",
             f"dropped {dict(stats.dropped)}; repaired {stats.repaired}"]
    if not missing:
        lines.append("no domain is missing from --input (raise --min-per-domain or pass --domains)")
    finish(summary, as_json, report, lines + skipped_line(summary))


# --------------------------------------------------------------------------------------------
# banking
# --------------------------------------------------------------------------------------------
@data.group(cls=DataGroup)
def banking():
    """Mobile-banking dialogues for intent recognition and slot filling, and their evaluation."""


@banking.command("generate")
@output_options
@click.option("--count", type=int, required=True, help="Number of dialogues.")
@click.option("--multi-turn-ratio", type=float, default=0.5, show_default=True,
              help="Share of dialogues where the assistant has to ask for missing slots.")
@click.option("--intents", help="Restrict to these L1 (loan, wealth, transfer, other) or L2 intents, comma-separated.")
@summary_options
def banking_generate(out, overwrite, seed, count, multi_turn_ratio, intents, report, as_json, show_progress):
    """Generate dialogues with gold intent (L1/L2) and slot labels (SFT messages included)."""
    from .banking import BankingSettings, allowed_intents, make_dialogue
    from .jsonl import JsonlWriter, progress

    if count <= 0:
        raise UserError(f"--count {count}: expected a positive number")
    if not 0 <= multi_turn_ratio <= 1:
        raise UserError(f"--multi-turn-ratio {multi_turn_ratio}: expected a value in [0, 1]")
    allowed = allowed_intents(tuple(_split_list(intents) or ()))
    if not allowed:
        raise UserError(f"--intents {intents}: matches no L1 or L2 intent")
    settings = BankingSettings(count, seed, multi_turn_ratio)
    per_l1, per_l2, per_slot, turns = Counter(), Counter(), Counter(), Counter()
    with JsonlWriter(out, overwrite) as writer, progress(count, "banking", show_progress) as bar:
        for index in range(count):
            item = make_dialogue(index, settings, allowed)
            writer.write(item)
            per_l1[item["labels"]["intent"]["l1"]] += 1
            per_l2[item["labels"]["intent"]["l2"]] += 1
            per_slot.update(item["labels"]["slots"].keys())
            turns["multi_turn" if len(item["dialogue"]) > 1 else "single_turn"] += 1
            bar.update(1)
    summary = {"output": out, "items": count, "seed": seed, "per_l1": dict(sorted(per_l1.items())),
               "per_l2": dict(sorted(per_l2.items())), "per_slot": dict(sorted(per_slot.items())), "turns": dict(turns)}
    finish(summary, as_json, report, [f"wrote {count} dialogues → {out}", f"L1: {dict(per_l1)}"])


@banking.command("eval")
@click.argument("gold_path", metavar="GOLD", type=click.Path(dir_okay=False))
@click.argument("pred_path", metavar="PRED", type=click.Path(dir_okay=False))
@click.option("--skip-bad", is_flag=True, help="Skip and report malformed lines instead of failing.")
@summary_options
def banking_eval(gold_path, pred_path, skip_bad, report, as_json, show_progress):
    """Score predictions (lines with id and labels/prediction) against gold dialogues."""
    from .banking import BankingScores, prediction_labels
    from .jsonl import BadLines, read_jsonl

    def validate_gold(data):
        labels = data.get("labels")
        if not isinstance(data.get("id"), str) or not isinstance(labels, dict) or not isinstance(labels.get("intent"), dict):
            raise ValueError("a gold line needs 'id' and 'labels' with an 'intent'")
        return labels

    def validate_prediction(data):
        if "id" not in data:
            raise ValueError("a prediction line needs 'id'")
        return prediction_labels(data)

    bad_lines = BadLines()
    predictions = {str(r.data["id"]): r.parsed for r in read_jsonl(pred_path, bad_lines, skip_bad, validate_prediction)}
    scores = BankingScores()
    dialogues = 0
    for record in read_jsonl(gold_path, bad_lines, skip_bad, validate_gold, show_progress, desc="eval"):
        scores.add(record.parsed, predictions.get(record.data["id"]))
        dialogues += 1
    if not dialogues:  # scores "over 0 dialogues" would look like a result
        raise UserError(f"GOLD {gold_path}: no gold dialogue"
                        + (f" ({len(bad_lines.entries)} malformed line(s) skipped)" if bad_lines.entries else ""))
    summary = {**scores.summary(), "gold": gold_path, "predictions": pred_path, "skipped_lines": bad_lines.summary()}
    finish(summary, as_json, report, [
        f"L1 accuracy {summary['l1_accuracy']:.4f}, L2 accuracy {summary['l2_accuracy']:.4f}, "
        f"slot F1 {summary['slots_micro']['f1']:.4f}, joint {summary['joint_accuracy']:.4f} "
        f"over {summary['dialogues']} dialogues"] + skipped_line(summary))


@data.command()
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False),
              help="The teacher: the model that writes the answers (the original GQA model).")
@click.option("--input", "records_path", required=True, type=click.Path(dir_okay=False),
              help="SFT records (JSON array or JSONL: instruction/output, messages or conversations).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output JSONL file.")
@overwrite_option
@click.option("--max-new-tokens", type=click.IntRange(1), default=256, show_default=True,
              help="Longest answer, in tokens.")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True,
              help="Sequences decoded together by the paged engine.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Annotate only the first N records.")
@forward_precision_option
@summary_options
def annotate(model_dir, records_path, out, overwrite, max_new_tokens, batch_size, limit, forward_precision, report,
             as_json, show_progress):
    """The teacher answers each record's prompt (greedy): off-policy GKD data; resumable after a kill."""
    from pathlib import Path

    from ..eval.lm import resolve_precision
    from ..progress import progress_bar
    from .annotate import annotate as run_annotate

    precision = resolve_precision(forward_precision)
    bar = progress_bar(None, "annotate", "rec", enabled=show_progress)
    summary = run_annotate(Path(model_dir), Path(records_path), Path(out), max_new_tokens, batch_size, limit,
                           progress=bar.update, precision=precision["used"])
    summary["forward_precision"] = precision
    bar.close()
    finish(summary, as_json, report, [f"annotated {summary['records']} records → {out} "
                                      f"({summary['resumed']} from an interrupted run, {summary['new_tokens']} new tokens)"])
