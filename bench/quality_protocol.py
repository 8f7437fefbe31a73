"""bench/quality_protocol: one model's quality protocol — dev choices on validation text, then the test table.

    .venv/bin/python bench/quality_protocol.py --model smollm2|qwen-coder-0.5b|stories260k|DIR
        [--part dev|test|test-stage1|all] [--ranks 96,160] [--test-windows N] [--rows original,transmla,uniform,adaptive,stage1] [--use-dev-choices] [--dev-stage 1|2] [--dev-fixed]
        [--options NAME,..] [--extra k=v,k=v ...] [--smoke]

Three disjoint pieces of WikiText-2, never mixed:

* **pool** — ``wiki.valid.tokens`` minus its tail (whole lines, ending at least ``2 × dev`` tokens
  before the end of the file): every conversion's calibration (``--calib``) and search windows
  (``--search-data``) come from it.
* **dev** — the last 4 × 2,048 tokens of ``wiki.valid.tokens``: every choice of part ``dev`` is made
  on its perplexity.
* **test** — the first N windows × 2,048 of WikiText-2 test built as the Hugging Face rows joined
  with blank lines (issue 12's protocol; 40 for SmolLM2, 10 for Qwen2.5-Coder): only the table of
  part ``test`` sees it.

Part ``dev``: starting from the defaults, one option at a time, each value of every quality option
``convert`` exposes — the stage-1 basis (``--rorope``), the position-free components
(``--nope-rotation``), the low rank (``--lowrank``, ``--key-weight``), the statistics streams
(``--statistics``), the calibration draw (``--calib-sampling``) at the dev fold and rank; the search
context (``--search-context``) and window length (``--search-seq-len``) with the default adaptive
search — converted by the real ``mindyouzhi convert`` in a child process and scored on dev.  With
``--dev-stage 1`` only stage 1 is converted (``--stage 1`` at ``--fold``) and only the options stage 1
reads are tried: where a model loses most in stage 1, this is the cheap way to see why.  The
result lists, per option, the dev perplexity of every value and whether the default wins.  ``--options``
limits the sweep to some options; ``--extra k=v,k=v`` adds a row with several settings changed together.

Part ``test``: per rank, the original model; TransMLA's choices in our code (``TRANSMLA_CHOICES``
of bench/transition.py, fold 4); our best uniform fold (``--freqfold uniform``: chosen on the
search windows); our adaptive plan (the default ``convert``); and stage 1 at our best uniform plan
(``--freqfold uniform --stage 1``: its fold and RoPE stride chosen on the search windows) — each with its wall time and peak RSS (the child's own, from its report).  With ``--use-dev-choices``
the "ours" rows use part dev's winners instead of the defaults.

Results: ``bench/results/quality_<model>.json`` (saved after every row; a rerun skips the rows it
holds for the same arguments and code defaults) and ``bench/results/quality_<model>.md`` (the tables).  ``--smoke``
shrinks every budget (for a tiny model: a check that the driver runs, no figure to quote).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from transition import TRANSMLA_CHOICES, hf_rows_test_windows  # noqa: E402

MODELS = {  # name → (loader, rope_dim, test windows, ranks)
    "smollm2": (common.smollm2, 32, 40, "96,160"),
    "qwen-coder-0.5b": (common.qwen25_coder, 32, 10, "96,160"),
    "stories260k": (common.stories260k, 4, 4, "16,32"),
}

BUDGETS = {  # the protocol's (issue 12) and the smoke test's
    "full": dict(calib_tokens=32768, calib_seq_len=256, search_tokens=8192, search_seq_len=2048, dev_windows=4,
                 seq_len=2048),
    "smoke": dict(calib_tokens=2048, calib_seq_len=128, search_tokens=512, search_seq_len=256, dev_windows=2,
                  seq_len=256),
}


def quality_options() -> dict[str, list]:
    """Option → its values, the default first (read from the code, so the bench follows it)."""
    from mindyouzhi.transition.calibration import CALIB_SAMPLING, DEFAULT_CALIB_SAMPLING
    from mindyouzhi.transition.lowrank import DEFAULT_KEY_WEIGHT, DEFAULT_LOWRANK, LOWRANK_METHODS
    from mindyouzhi.transition.pipeline import DEFAULT_STATISTICS, STATISTICS
    from mindyouzhi.transition.positions import DEFAULT_NOPE_ROTATION, NOPE_ROTATION
    from mindyouzhi.transition.rorope import DEFAULT_RORO, RORO_METHODS

    def default_first(default, values):
        return [default] + [v for v in values if v != default]

    return {
        "rorope": default_first(DEFAULT_RORO, RORO_METHODS),
        "nope_rotation": default_first(DEFAULT_NOPE_ROTATION, NOPE_ROTATION),
        "lowrank": default_first(DEFAULT_LOWRANK, LOWRANK_METHODS),
        "key_weight": default_first(DEFAULT_KEY_WEIGHT, [DEFAULT_KEY_WEIGHT * 0.3, DEFAULT_KEY_WEIGHT * 3]),
        "statistics": default_first(DEFAULT_STATISTICS, STATISTICS),
        "calib_sampling": default_first(DEFAULT_CALIB_SAMPLING, CALIB_SAMPLING),
    }


# What stage 1 (RoRoPE + FreqFold) reads: its key basis, the position-free components' rotation and
# the calibration draw; the low rank, its key weight and the statistics streams are stage 2's.
STAGE1_OPTIONS = ("rorope", "nope_rotation", "calib_sampling")


def search_options(budget: dict) -> dict[str, list]:
    from mindyouzhi.transition.search import DEFAULT_SEARCH_CONTEXT, SEARCH_CONTEXTS

    length = budget["search_seq_len"]
    return {"search_context": [DEFAULT_SEARCH_CONTEXT] + [c for c in SEARCH_CONTEXTS if c != DEFAULT_SEARCH_CONTEXT],
            "search_seq_len": [length, length // 4]}


class Protocol:
    def __init__(self, args):
        from mindyouzhi.tokenizer import load_tokenizer

        self.args = args
        self.budget = BUDGETS["smoke" if args.smoke else "full"]
        if args.model in MODELS:
            loader, rope_dim, test_windows, ranks = MODELS[args.model]
            self.model_dir, self.name = loader(), args.model
        else:  # a model directory: convert's default rope_dim (head_dim / 2)
            self.model_dir, self.name = Path(args.model).resolve(), Path(args.model).name
            rope_dim, test_windows, ranks = None, 10, "96,160"
        self.rope_dim = args.rope_dim or rope_dim
        self.test_count = args.test_windows or test_windows
        self.ranks = [int(r) for r in (args.ranks or ranks).split(",")]
        self.dev_rank = args.dev_rank or self.ranks[0]
        self.work = common.CACHE / "quality" / (self.name + ("-smoke" if args.smoke else ""))
        self.work.mkdir(parents=True, exist_ok=True)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.pool, self.dev = self._split_validation()
        self.results_name = f"quality_{self.name}" + ("_smoke" if args.smoke else "")
        previous = common.RESULTS / f"{self.results_name}.json"
        self.results = json.loads(previous.read_text()) if previous.is_file() else {}
        self.results.update({"model": str(self.model_dir), "rope_dim": self.rope_dim, "budget": self.budget,
                             "data": {"pool": str(self.pool), "dev_windows": list(self.dev.shape),
                                      "test_windows": self.test_count}})
        self.results.setdefault("rows", {})

    # --- data -------------------------------------------------------------------------------
    def _split_validation(self) -> tuple[Path, np.ndarray]:
        """(pool file, dev windows): dev = the last windows of wiki.valid.tokens; the pool = its
        whole lines ending at least twice the dev's tokens (plus a margin for tokenizing lines one
        at a time) before the end."""
        from mindyouzhi.textdata import token_stream

        valid, _ = common.wikitext()
        count, length = self.budget["dev_windows"], self.budget["seq_len"]
        tokens = token_stream(self.tokenizer, valid, "--calib")
        dev = tokens[len(tokens) - count * length:].reshape(count, length)
        lines = valid.read_text(encoding="utf-8").splitlines(keepends=True)
        tail, cut = 0, len(lines)
        while tail < 2 * count * length + 1024 and cut > 0:
            cut -= 1
            tail += len(self.tokenizer.encode(lines[cut]))
        pool = self.work / "pool.txt"
        pool.write_text("".join(lines[:cut]), encoding="utf-8")
        return pool, dev

    # --- one conversion ---------------------------------------------------------------------
    def convert(self, label: str, windows: np.ndarray, split: str, **options) -> dict:
        """``mindyouzhi convert`` in a child process with ``options`` (ConvertOptions names), the
        output's perplexity on ``windows``; cached in the results by label and arguments."""
        settings = {"rope_dim": self.rope_dim, "calib_tokens": self.budget["calib_tokens"],
                    "calib_seq_len": self.budget["calib_seq_len"], "search_tokens": self.budget["search_tokens"],
                    "search_seq_len": self.budget["search_seq_len"], **options}
        settings = {k: v for k, v in settings.items() if v is not None}
        # what a row measured is its settings over the code's defaults: a row made under other defaults
        # for an option it did not set is stale
        defaults = {k: str(v[0]) for k, v in {**quality_options(), **search_options(self.budget)}.items()}
        done = self.results["rows"].get(label)
        if done is not None and (done.get("settings"), done.get("split")) == (settings, split) and "defaults" in done:
            if _effective(done["defaults"], settings) == _effective(defaults, settings):
                return done
        out = self.work / "out"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [common.cli(), "convert", "--model", str(self.model_dir), "--out", str(out), "--calib", str(self.pool),
               "--search-data", str(self.pool), "--no-trajectories", "--json", "--overwrite"]
        for name, value in settings.items():
            cmd += [f"--{name.replace('_', '-')}", str(value)]
        wall, _, stdout = common.child_peak(cmd)
        report = json.loads(stdout)
        row = {"split": split, "settings": settings, "defaults": defaults, "ppl": self.perplexity(out, windows),
               "wall_seconds": wall,
               "peak_rss_bytes": report["peak_rss_bytes"], "fold_plan": report["fold_plan"],
               "timings": report["timings_seconds"], "search": _search_summary(report.get("search") or {}),
               "rope_stride": report.get("rope_stride"), "position_choice": report.get("position_choice")}
        shutil.rmtree(out, ignore_errors=True)
        self.save_row(label, row)
        return row

    def perplexity(self, directory: Path, windows: np.ndarray) -> float:
        from mindyouzhi.eval.ppl import perplexity
        from mindyouzhi.models.runner import ModelRunner

        return perplexity(ModelRunner.from_dir(directory, with_tokenizer=False), windows).ppl

    def save_row(self, label: str, row: dict) -> None:
        self.results["rows"][label] = row
        print(f"  {label}: ppl {row['ppl']:.4f} ({row.get('wall_seconds', 0):.0f} s)", flush=True)
        common.save(self.results_name, self.results)

    # --- part dev ---------------------------------------------------------------------------
    def dev_choices(self) -> dict:
        """Per option: the dev ppl of each value (others at their defaults) and the winner.  With
        ``--dev-stage 1``: stage 1 only (fold ``--fold``), the options stage 1 reads."""
        rank, fold = self.dev_rank, self.args.fold
        if self.args.dev_stage == 1:
            options = {k: v for k, v in quality_options().items() if k in STAGE1_OPTIONS}
            bases = ((f"dev stage 1 f={fold}", options, {"freqfold": fold, "stage": 1}),)
        else:
            bases = ((f"dev f={fold} r{rank}", quality_options(), {"freqfold": fold, "kv_lora_rank": rank}),
                     (f"dev adaptive r{rank}", search_options(self.budget), {"kv_lora_rank": rank}))
            if self.args.dev_fixed:
                bases = bases[:1]
        choices = {}
        only = set(self.args.options.split(",")) if self.args.options else None
        for base, options, fixed in bases:
            for option, values in options.items():
                if only is not None and option not in only:
                    continue
                scores = {}
                for value in values:  # the default's row is shared by every option
                    changed = {} if value == values[0] else {option: value}
                    label = base + "".join(f" {k}={v}" for k, v in changed.items())
                    scores[str(value)] = self.convert(label, self.dev, "dev", **fixed, **changed)["ppl"]
                choices[option] = _choice(values, scores)
            for extra in self.args.extra or []:  # settings beyond one option at a time: "name=value,name=value"
                changed = dict(item.split("=", 1) for item in extra.split(","))
                label = base + "".join(f" {k}={v}" for k, v in changed.items())
                choices[f"extra: {extra}"] = {"dev_ppl": {extra: self.convert(label, self.dev, "dev", **fixed, **changed)["ppl"]}}
        key = "dev_choices" + ("_stage1" if self.args.dev_stage == 1 else "")
        self.results[key] = {**self.results.get(key, {}), **choices}
        common.save(self.results_name, self.results)
        return choices

    # --- part test --------------------------------------------------------------------------
    def test_table(self) -> dict:
        test = hf_rows_test_windows(self.tokenizer, self.test_count, self.budget["seq_len"])
        ours = {}
        if self.args.use_dev_choices:
            ours = {k: v["chosen"] for k, v in self.results.get("dev_choices", {}).items() if "chosen" in v}
        rows = set(self.args.rows.split(","))
        if "original" in rows and "test original" not in self.results["rows"]:
            started = time.perf_counter()
            self.save_row("test original", {"split": "test", "ppl": self.perplexity(self.model_dir, test),
                                            "wall_seconds": time.perf_counter() - started})
        for rank in self.ranks:
            if "transmla" in rows:
                self.convert(f"test TransMLA's choices f={self.args.fold} r{rank}", test, "test",
                             freqfold=self.args.fold, kv_lora_rank=rank, **TRANSMLA_CHOICES)
            if "uniform" in rows:
                self.convert(f"test best uniform r{rank}", test, "test", freqfold="uniform", kv_lora_rank=rank, **ours)
            if "adaptive" in rows:
                self.convert(f"test adaptive r{rank}", test, "test", kv_lora_rank=rank, **ours)
        if "stage1" in rows:
            self.stage1_row(test, ours)
        return self.results["rows"]

    def stage1_row(self, test: np.ndarray = None, ours: dict = None) -> dict:
        """Stage 1 at our best uniform plan (``--freqfold uniform --stage 1``: the fold and the position
        layout chosen on the search windows, as the final rows choose theirs)."""
        if test is None:
            test = hf_rows_test_windows(self.tokenizer, self.test_count, self.budget["seq_len"])
        return self.convert("test stage 1, best uniform", test, "test", freqfold="uniform", stage=1,
                            **{k: v for k, v in (ours or {}).items() if k not in ("search_context", "search_seq_len")})


def _effective(defaults: dict, settings: dict) -> dict:
    return {**defaults, **{k: str(v) for k, v in settings.items()}}


def _choice(values: list, scores: dict) -> dict:
    best = min(values, key=lambda v: scores[str(v)])
    return {"dev_ppl": scores, "default": values[0], "chosen": best, "default_wins": best == values[0]}


def _search_summary(search: dict) -> dict:
    keep = ("mode", "context", "baseline", "chosen", "adaptive", "uniform_scores", "search_forward_equivalents",
            "calibration_streams", "search_seconds", "rounds")  # rounds: each layer's candidates, as scored
    return {k: search[k] for k in keep if k in search}


def markdown(results: dict) -> str:
    lines = [f"# Quality protocol: {results['model']}", "",
             f"rope_dim {results['rope_dim']}; budgets {results['budget']}; data {results['data']}", ""]
    for key, title in (("dev_choices", "final conversion"), ("dev_choices_stage1", "stage 1")):
        choices = results.get(key)
        if not choices:
            continue
        lines += [f"## Dev choices, {title} (validation text only)", "",
                  "| option | dev ppl per value | default | chosen |", "|---|---|---|---|"]
        for option, choice in choices.items():
            values = ", ".join(f"{k}: {v:.3f}" for k, v in choice["dev_ppl"].items())
            chosen = f"**{choice['chosen']}**" if "chosen" in choice else ""
            lines.append(f"| `{option}` | {values} | {choice.get('default', '')} | {chosen} |")
        lines.append("")
    rows = {k: v for k, v in results["rows"].items() if v.get("split") == "test"}
    if rows:
        original = rows.get("test original", {}).get("ppl")
        lines += ["## Test", "", "| row | fold plan | test ppl | / original | wall s | peak RSS GiB |", "|---|---|---|---|---|---|"]
        for label, row in rows.items():
            plan = row.get("fold_plan")
            shown = "—" if plan is None else (str(plan[0]) if len(set(plan)) == 1 else ",".join(map(str, plan)))
            peak = row.get("peak_rss_bytes")
            ratio = f"{row['ppl'] / original:.3f}" if original else "—"  # (the original row not run yet)
            lines.append(f"| {label[5:]} | {shown} | {row['ppl']:.3f} | {ratio} | {row.get('wall_seconds', 0):.0f} | "
                         f"{'—' if peak is None else f'{peak / 2 ** 30:.2f}'} |")
        lines += [""] + _adaptive_gains(rows, original)
    return "\n".join(lines) + "\n"


def _adaptive_gains(rows: dict, original: Optional[float]) -> list[str]:
    """Per rank: the adaptive plan against the best uniform one, as a ratio and as the share of the
    uniform plan's log-perplexity gap to the original that it recovers (a ratio alone says little where
    the uniform plan is already close to the original)."""
    lines = []
    for label, row in rows.items():
        if not label.startswith("test adaptive r"):
            continue
        rank = label[len("test adaptive r"):]
        uniform = rows.get(f"test best uniform r{rank}", {}).get("ppl")
        if uniform is None:
            continue
        line = f"- rank {rank}: adaptive / best uniform = {row['ppl'] / uniform:.3f}"
        if original and uniform > original:
            share = (math.log(uniform) - math.log(row["ppl"])) / (math.log(uniform) - math.log(original))
            line += f"; share of the uniform plan's log-ppl gap to the original recovered = {share:.1%}"
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help=f"{', '.join(MODELS)} or a model directory")
    parser.add_argument("--part", choices=["dev", "test", "test-stage1", "all"], default="all")
    parser.add_argument("--ranks", default=None, help="kv_lora_rank values of the test table (default 96,160; "
                        "stories260k 16,32)")
    parser.add_argument("--dev-rank", type=int, default=None, help="default: the first of --ranks")
    parser.add_argument("--fold", type=int, default=4, help="the dev conversions' fold and TransMLA's")
    parser.add_argument("--dev-stage", type=int, choices=[1, 2], default=2,
                        help="part dev at stage 1 only (its options, fold --fold) or the final conversion")
    parser.add_argument("--dev-fixed", action="store_true",
                        help="part dev, stage 2: only the conversions at --fold (no adaptive search)")
    parser.add_argument("--options", default=None, help="part dev: only these options (comma-separated names)")
    parser.add_argument("--extra", action="append", help="part dev: one more row with these settings together, "
                        "e.g. calib_seq_len=2048,nope_rotation=none (repeatable)")
    parser.add_argument("--rope-dim", type=int, default=None, help="default: 32 (SmolLM2, Qwen), head_dim/2 for a DIR")
    parser.add_argument("--test-windows", type=int, default=None)
    parser.add_argument("--rows", default="original,transmla,uniform,adaptive,stage1",
                        help="part test: which rows (a subset of the default)")
    parser.add_argument("--use-dev-choices", action="store_true", help="test rows of ours with part dev's winners")
    parser.add_argument("--smoke", action="store_true", help="tiny budgets: checks that the driver runs")
    args = parser.parse_args()
    protocol = Protocol(args)
    if args.part in ("dev", "all"):
        print(common.dump(protocol.dev_choices()))
    if args.part == "test-stage1":  # the stage-1 row alone
        protocol.stage1_row()
    if args.part in ("test", "all"):
        protocol.test_table()
    table = common.RESULTS / f"{protocol.results_name}.md"
    table.write_text(markdown(protocol.results), encoding="utf-8")
    print(table.read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
