"""bench/gkd_choice: choose the pipeline's GKD settings on validation text (issue 23).

    .venv/bin/python bench/gkd_choice.py --run RUN [--recipe recipes/youzhi_smollm2_cpu.yaml]
        [--steps 10] [--variants "NAME;…"] [--dev-windows 4] [--dev-seq-len 2048]

``RUN`` is a pipeline run directory whose ``convert`` and ``annotate`` stages are done: every variant
starts from that run's converted model and reads its teacher-annotated conversations
(``data/gkd.jsonl``), with the training recipe the pipeline's ``gkd`` stage would write
(``workflow.run.training_recipe``) plus the variant's changes, for ``--steps`` optimizer steps
(warm-up ``steps // 5``), in its own output directory under ``~/.cache/mindyouzhi/bench/gkd_choice``
(the run directory is only read).

Judged on **dev** only: the last ``--dev-windows`` × ``--dev-seq-len`` tokens of
``wiki.valid.tokens``.  The text a variant mixes in (``mix``) is the *first* windows of the same
file, and the script refuses a mix that would reach the dev tail.  WikiText-2 test is not read.
Reports the dev perplexity of the teacher, the student before GKD and each variant, the share of
the student's gap each closes, and the training KL of the last step.  Writes
``bench/results/gkd_choice.json`` (after every variant; a rerun skips the variants it holds with
the same settings) and prints a table.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MIX_SEQ = 256


def variants(wiki: Path, mix_windows: int) -> dict[str, dict]:
    """name → changes to the pipeline's gkd section (``balance_mla`` goes to ``model``)."""
    mix = [{"path": str(wiki), "format": "text", "max_samples": mix_windows}]
    return {
        "as-run": {"balance_mla": False},
        "balanced": {},
        "balanced, all tokens + wiki": {"annotated_loss": "all", "mix": mix},
        "balanced, all tokens + wiki, lr 2e-4": {"annotated_loss": "all", "mix": mix, "learning_rate": 2.0e-4},
        "balanced, all tokens + wiki, fp32": {"annotated_loss": "all", "mix": mix, "cpu_precision": "fp32"},
        "balanced, all tokens + wiki, lr 4e-4": {"annotated_loss": "all", "mix": mix, "learning_rate": 4.0e-4},
    }


def training_recipe(run_dir: Path, recipe_path: Path, changes: dict, steps: int, out: Path) -> dict:
    from mindyouzhi.workflow.recipe import load_pipeline_recipe
    from mindyouzhi.workflow.run import PipelineRun, training_recipe as pipeline_recipe

    recipe = load_pipeline_recipe(recipe_path)
    sections = copy.deepcopy(recipe.sections)
    gkd = sections["gkd"]
    for key in ("annotated_loss", "mix"):
        if key in changes:
            gkd[key] = changes[key]
    gkd.setdefault("runner_config", {}).update(max_steps=steps, save_steps=0)
    gkd.setdefault("lr_schedule", {}).update(warmup_steps=max(1, steps // 5))
    if "learning_rate" in changes:
        gkd["lr_schedule"]["learning_rate"] = changes["learning_rate"]
    run = PipelineRun(type(recipe)(recipe.path, sections), run_dir, log=lambda _: None)
    built = pipeline_recipe(run, "gkd")
    built["output_dir"] = str(out)
    built["model"]["balance_mla"] = changes.get("balance_mla", True)
    if "cpu_precision" in changes:
        built["context"]["cpu_precision"] = changes["cpu_precision"]
    return built


def dev_windows(tokenizer, wiki: Path, count: int, length: int, mix_windows: int) -> "np.ndarray":
    from mindyouzhi.textdata import token_stream

    tokens = token_stream(tokenizer, wiki, "--calib")
    if mix_windows * MIX_SEQ > len(tokens) - count * length:
        sys.exit(f"error: {mix_windows} mix windows × {MIX_SEQ} would reach the dev tail of {wiki}")
    return tokens[len(tokens) - count * length:].reshape(count, length)


def perplexity(model_dir: Path, windows) -> float:
    from mindyouzhi.eval.ppl import perplexity as ppl
    from mindyouzhi.models.runner import ModelRunner

    return ppl(ModelRunner.from_dir(model_dir, with_tokenizer=False, precision="bf16"), windows).ppl


def train(recipe: dict, work: Path) -> dict:
    path = work / "gkd.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True), encoding="utf-8")
    env = dict(os.environ, MINDYOUZHI_NO_PROGRESS="1")
    start = time.perf_counter()
    with open(work / "train.log", "w") as log:
        done = subprocess.run([common.cli(), "train", "--config", str(path), "--no-resume"], stdout=log, stderr=log,
                              env=env)
    if done.returncode != 0:
        sys.exit(f"error: training failed, see {work / 'train.log'}")
    steps = [json.loads(line) for line in open(Path(recipe["output_dir"]) / "train_log.jsonl")]
    return {"wall_seconds": round(time.perf_counter() - start, 1), "first_kl": steps[0]["loss"],
            "last_kl": steps[-1]["loss"], "grad_norm_first": steps[0]["grad_norm"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="pipeline run directory (convert and annotate done)")
    parser.add_argument("--recipe", type=Path, default=common.REPO / "recipes" / "youzhi_smollm2_cpu.yaml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variants", default=None, help="names separated by semicolons (default: all)")
    parser.add_argument("--dev-windows", type=int, default=4)
    parser.add_argument("--dev-seq-len", type=int, default=2048)
    parser.add_argument("--mix-windows", type=int, default=400, help=f"wiki.valid windows × {MIX_SEQ} mixed in")
    args = parser.parse_args()

    from mindyouzhi.tokenizer import load_tokenizer
    from mindyouzhi.workflow.recipe import load_pipeline_recipe

    wiki, _ = common.wikitext()
    run_dir = args.run.resolve()
    student = run_dir / "models" / "convert"
    teacher = Path(load_pipeline_recipe(args.recipe)["original"])
    windows = dev_windows(load_tokenizer(student), wiki, args.dev_windows, args.dev_seq_len, args.mix_windows)
    chosen = variants(wiki, args.mix_windows)
    names = args.variants.split(";") if args.variants else list(chosen)
    unknown = [n for n in names if n not in chosen]
    if unknown:
        sys.exit(f"error: --variants: unknown {unknown[0]!r} (known: {', '.join(chosen)})")

    results_path = common.RESULTS / "gkd_choice.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results.update(run=str(run_dir), recipe=str(args.recipe), steps=args.steps,
                   dev={"file": str(wiki), "windows": list(windows.shape), "where": "tail"})
    rows = results.setdefault("rows", {})
    for label, directory in (("teacher", teacher), ("student before GKD", student)):
        if label not in rows or rows[label].get("model") != str(directory):
            rows[label] = {"model": str(directory), "dev_ppl": perplexity(directory, windows)}
            common.save("gkd_choice", results)
        print(f"{label}: dev ppl {rows[label]['dev_ppl']:.3f}", flush=True)
    base = rows["student before GKD"]["dev_ppl"]
    gap = base - rows["teacher"]["dev_ppl"]
    work_root = common.CACHE / "gkd_choice"
    for name in names:
        changes = chosen[name]
        settings = {"changes": changes, "steps": args.steps}
        if rows.get(name, {}).get("settings") == settings:
            print(f"{name}: dev ppl {rows[name]['dev_ppl']:.3f} (held)", flush=True)
            continue
        work = work_root / name.replace(" ", "_").replace(",", "").replace("+", "plus")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        recipe = training_recipe(run_dir, args.recipe, changes, args.steps, work / "out")
        row = {"settings": settings, **train(recipe, work)}
        row["dev_ppl"] = perplexity(work / "out" / "final", windows)
        row["gap_closed"] = (base - row["dev_ppl"]) / gap if gap > 0 else None
        rows[name] = row
        common.save("gkd_choice", results)
        shutil.rmtree(work / "out", ignore_errors=True)
        print(f"{name}: dev ppl {row['dev_ppl']:.3f}, gap closed {row['gap_closed']:+.1%}, KL {row['first_kl']:.3f} → "
              f"{row['last_kl']:.3f} ({row['wall_seconds']:.0f} s)", flush=True)
    print("\n| variant | dev ppl | gap closed | train KL first → last | wall |\n|---|---|---|---|---|")
    for name, row in rows.items():
        if "settings" in row:
            print(f"| {name} | {row['dev_ppl']:.3f} | {row['gap_closed']:+.1%} | {row['first_kl']:.3f} → "
                  f"{row['last_kl']:.3f} | {row['wall_seconds']:.0f} s |")
        else:
            print(f"| {name} | {row['dev_ppl']:.3f} | | | |")


if __name__ == "__main__":
    main()
