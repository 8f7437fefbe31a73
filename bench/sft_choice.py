"""bench/sft_choice: choose the pipeline's SFT settings on a finance dev split (issue 23).

    .venv/bin/python bench/sft_choice.py --run RUN [--recipe RUN/recipe.yaml]
        [--steps 30] [--variants "NAME;…"] [--dev-items 60] [--ppl-slack 1.05] [--dev-seq-len 2048]

``RUN`` is a pipeline run directory whose ``data`` and ``gkd`` stages are done: every variant starts
from that run's GKD model (``train/gkd/final``) with the training recipe the pipeline's ``sft`` stage
would write (``workflow.run.training_recipe``) plus the variant's changes, for ``--steps`` optimizer
steps or the variant's own ``max_steps`` (warm-up ``steps // 10``), in its own directory under ``~/.cache/mindyouzhi/bench/sft_choice``
(the run directory is only read).

**The dev split** (built once under ``sft_choice/dev``; no item of it is trained on, none is a
held-out test item the pipeline's tables score):

* FPB — sentences on the *training* side of the pipeline's hash split that ``data compress`` left
  out of ``data/sft.jsonl``, so SFT never sees them; in hash order (the file's label mix);
* RMB amounts and banking — ``mindyouzhi data amounts|banking generate`` with a third seed
  (``data.seed + 2``; the held-out split is drawn from ``+ 1``), filtered exactly as the held-out
  split is (single conversions / single-turn dialogues whose prompt is not in training) and also
  against every held-out prompt.

Judged on dev only: FPB as generation (``label-jsonl`` accuracy: the label SFT teaches, case and
punctuation ignored), RMB amounts
(``amount_correct``: the value), banking (field accuracy), their mean; and the perplexity of the last
4 × 2,048 tokens of ``wiki.valid.tokens`` (the dev tail of bench/gkd_choice.py: general text kept).
The rule: the highest mean finance dev score among the variants whose dev perplexity is at most
``--ppl-slack`` (1.05) × the GKD model's.  Writes ``bench/results/sft_choice.json`` after every
variant (a rerun skips the variants it holds with the same settings; each variant's final model is
kept, so a changed dev suite re-scores it instead of training again) and prints a table.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from gkd_choice import dev_windows, perplexity, train  # noqa: E402

VARIANTS = {  # name → changes to the pipeline's sft section (max_steps: instead of --steps)
    "as-run (lr 5e-5)": {},
    "lr 2e-4": {"learning_rate": 2.0e-4},
    "lr 5e-4": {"learning_rate": 5.0e-4},
    "as-run, 60 steps": {"max_steps": 60},    # 2× the budget: whether RMB amounts and banking need more steps
    "as-run, 120 steps": {"max_steps": 120},  # 4× the budget
    "lr 2e-4, 60 steps": {"learning_rate": 2.0e-4, "max_steps": 60},  # 2e-4 went furthest on banking at 30
}
SCORES = {"FPB dev (gen)": "accuracy", "RMB amounts dev": "amount_correct", "Banking dev": "field_accuracy"}


def dev_split(run_dir: Path, recipe, count: int, work: Path) -> dict[str, Path]:
    """The three dev files (gen-jsonl records), built once per run and item count."""
    from mindyouzhi.workflow import finance_data

    marker = work / "split.json"
    files = {"fpb": work / "fpb.jsonl", "amounts": work / "amounts.jsonl", "banking": work / "banking.jsonl"}
    key = split_key(run_dir, recipe, count)
    if marker.is_file() and json.loads(marker.read_text()) == key:
        return {name: path for name, path in files.items() if path.is_file() and path.stat().st_size}
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    spec = recipe["data"]
    seed = int(spec.get("seed", 42))
    held = run_dir / "data" / "heldout"
    trained = {record.get("instruction") for record in finance_data.read_jsonl(run_dir / "data" / "sft.jsonl")}

    train_side, _ = finance_data.split_fpb(Path(spec["fpb"]["path"]), float(spec["fpb"].get("held_out", 0.3)), seed)
    held_fpb = {item["prompt"] for item in finance_data.read_jsonl(held / "fpb.jsonl")}
    unused = [s for s in train_side if finance_data.fpb_prompt(s.sentence) not in trained | held_fpb]
    unused.sort(key=lambda s: finance_data.hash_unit(s.sentence, seed + 2))
    _, items = finance_data.fpb_records(unused[:count])
    if len(items) < count:  # without a `data compress` budget every training sentence is trained on
        print(f"note: {len(items)} FPB dev sentences (fewer than {count} left out of training)", flush=True)
    finance_data.write_jsonl(files["fpb"], items)

    for name, splitter in (("amounts", finance_data.amount_splits), ("banking", finance_data.banking_splits)):
        held_prompts = {item["prompt"] for item in finance_data.read_jsonl(held / f"{name}.jsonl")}
        pool = work / f"{name}-pool.jsonl"
        done = subprocess.run([common.cli(), "data", name, "generate", "--out", str(pool), "--count",
                               str(6 * count), "--seed", str(seed + 2), "--overwrite"], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"error: data {name} generate failed: {done.stderr.strip().splitlines()[-1:]}")
        _, items = splitter(run_dir / "data" / "generated" / f"{name}-train.jsonl", pool, 2 * count)
        items = [item for item in items if item["prompt"] not in held_prompts][:count]
        if len(items) < count:
            sys.exit(f"error: only {len(items)} {name} dev items after filtering; lower --dev-items")
        finance_data.write_jsonl(files[name], items)
    marker.write_text(json.dumps(key))
    return {name: path for name, path in files.items() if path.stat().st_size}


def split_key(run_dir: Path, recipe, count: int) -> dict:
    """What the dev split depends on: the run, its data section and the item count."""
    return {"run": str(run_dir), "data": recipe.digest("data"), "count": count}


def suite(files: dict[str, Path], work: Path) -> Path:
    tasks = {"fpb": {"task": "label-jsonl", "name": "FPB dev (gen)", "chat": True, "max_new_tokens": 8},
             "amounts": {"task": "rmb-amounts", "name": "RMB amounts dev", "chat": True, "max_new_tokens": 64},
             "banking": {"task": "gen-jsonl", "name": "Banking dev", "chat": True, "max_new_tokens": 128}}
    tasks = [dict(tasks[name], data=str(path)) for name, path in files.items()]
    path = work / "suite.yaml"
    path.write_text(yaml.safe_dump({"defaults": {"batch_size": 16}, "tasks": tasks}, allow_unicode=True), "utf-8")
    return path


def suite_digest(config: Path) -> str:
    """What the finance scores depend on besides the model: the dev suite (tasks, scorers, files)."""
    return hashlib.sha256(config.read_bytes()).hexdigest()[:16]


def finance_scores(model: Path, config: Path, out: Path) -> dict:
    env = dict(os.environ, MINDYOUZHI_NO_PROGRESS="1")
    done = subprocess.run([common.cli(), "eval", "suite", "--model", str(model), "--label", "m", "--config",
                           str(config), "--out", str(out)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"error: eval suite failed: {done.stderr.strip().splitlines()[-1:]}")
    results = json.loads((out / "results.json").read_text())
    scores = {task["name"]: task["results"]["m"]["metrics"][SCORES[task["name"]]] for task in results["tasks"]}
    scores["mean"] = sum(scores.values()) / len(scores)
    return scores


def training_recipe(run_dir: Path, recipe, changes: dict, steps: int, out: Path) -> dict:
    from mindyouzhi.workflow.run import PipelineRun, training_recipe as pipeline_recipe

    sections = copy.deepcopy(recipe.sections)
    sft = sections["sft"]
    sft.setdefault("runner_config", {}).update(max_steps=steps, save_steps=0)
    sft.setdefault("lr_schedule", {}).update(warmup_steps=max(1, steps // 10))
    if "learning_rate" in changes:
        sft["lr_schedule"]["learning_rate"] = changes["learning_rate"]
    built = pipeline_recipe(PipelineRun(type(recipe)(recipe.path, sections), run_dir, log=lambda _: None), "sft")
    built["output_dir"] = str(out)
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="pipeline run directory (data and gkd done)")
    parser.add_argument("--recipe", type=Path, default=None, help="default: the run's own RUN/recipe.yaml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--variants", default=None, help="names separated by semicolons (default: all)")
    parser.add_argument("--dev-items", type=int, default=60, help="items of each finance dev task")
    parser.add_argument("--ppl-slack", type=float, default=1.05)
    parser.add_argument("--dev-seq-len", type=int, default=2048, help="wiki.valid dev tail: 4 windows of this length")
    args = parser.parse_args()

    from mindyouzhi.tokenizer import load_tokenizer
    from mindyouzhi.workflow.recipe import load_pipeline_recipe

    run_dir = args.run.resolve()
    recipe = load_pipeline_recipe(args.recipe or run_dir / "recipe.yaml")
    start = run_dir / "train" / "gkd" / "final"
    if not start.is_dir():
        sys.exit(f"error: --run {run_dir}: no train/gkd/final (run the pipeline through its gkd stage)")
    names = args.variants.split(";") if args.variants else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"error: --variants: unknown {unknown[0]!r} (known: {', '.join(VARIANTS)})")
    wiki, _ = common.wikitext()
    windows = dev_windows(load_tokenizer(start), wiki, 4, args.dev_seq_len, 0)
    root = common.CACHE / "sft_choice"
    files = dev_split(run_dir, recipe, args.dev_items, root / "dev")
    config = suite(files, root / "dev")

    results_path = common.RESULTS / "sft_choice.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if results.get("split") != split_key(run_dir, recipe, args.dev_items):
        results = {}   # another run or dev split: earlier rows are not comparable
    results.update(run=str(run_dir), recipe=str(recipe.path), split=split_key(run_dir, recipe, args.dev_items),
                   dev={"finance": {k: str(v) for k, v in files.items()}, "items": args.dev_items,
                        "wiki": {"file": str(wiki), "windows": list(windows.shape), "where": "tail"}})
    rows = results.setdefault("rows", {})
    scoring = suite_digest(config)
    before = rows.get("GKD model (before SFT)", {})
    if (before.get("model"), before.get("suite")) != (str(start), scoring):
        rows["GKD model (before SFT)"] = {"model": str(start), "suite": scoring, "dev_ppl": perplexity(start, windows),
                                          **finance_scores(start, config, root / "eval-gkd")}
        common.save("sft_choice", results)
    for name in names:
        steps = VARIANTS[name].get("max_steps", args.steps)
        settings = {"changes": VARIANTS[name], "steps": steps, "sft": recipe.digest("sft")}
        work = root / name.replace(" ", "_").replace("(", "").replace(")", "")
        model = work / "out" / "final"
        if rows.get(name, {}).get("settings") == settings:
            if rows[name].get("suite") == scoring:
                continue
            if model.is_dir():  # the dev suite changed (a scorer, a task): score the kept model again
                rows[name].update(suite=scoring, **finance_scores(model, config, work / "eval"))
                common.save("sft_choice", results)
                continue
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        trained = train(training_recipe(run_dir, recipe, VARIANTS[name], steps, work / "out"), work)
        row = {"settings": settings, "suite": scoring, "wall_seconds": trained["wall_seconds"], "first_loss": trained["first_kl"],
               "last_loss": trained["last_kl"]}
        row.update(dev_ppl=perplexity(model, windows), **finance_scores(model, config, work / "eval"))
        rows[name] = row
        common.save("sft_choice", results)
        for checkpoint in (work / "out").glob("checkpoint-*"):  # the final model stays: a changed scorer re-scores it
            shutil.rmtree(checkpoint, ignore_errors=True)
        print(f"{name}: finance dev mean {row['mean']:.3f}, dev ppl {row['dev_ppl']:.3f} ({row['wall_seconds']:.0f} s)",
              flush=True)
    limit = args.ppl_slack * rows["GKD model (before SFT)"]["dev_ppl"]
    eligible = [n for n, r in rows.items() if "settings" in r and r["dev_ppl"] <= limit]
    results["chosen"] = max(eligible, key=lambda n: rows[n]["mean"]) if eligible else None
    common.save("sft_choice", results)
    print(f"\n| variant | {' | '.join(SCORES)} | mean | wiki dev ppl | loss first → last | wall |")
    print("|---|" + "---|" * (len(SCORES) + 4))
    for name, row in rows.items():
        trained = "settings" in row
        print(f"| {name}{' **(chosen)**' if name == results['chosen'] else ''} | "
              + " | ".join(f"{row[s]:.3f}" if s in row else "—" for s in SCORES) + f" | {row['mean']:.3f} | {row['dev_ppl']:.3f} | "
              + (f"{row['first_loss']:.3f} → {row['last_loss']:.3f} | {row['wall_seconds']:.0f} s |" if trained else " | |"))


if __name__ == "__main__":
    main()
