"""bench/transition: ppl original → stage 1 → final for every uniform fold and for adaptive.

Same run, same data, per model: calibration and search on WikiText-2 *valid* (disjoint windows),
evaluation on WikiText-2 raw *test*.  The adaptive plan is chosen by the greedy last-to-first
search on the search split (criterion: stage-1 ppl, the paper's); every uniform fold is evaluated
the same way, and each plan is then taken to every requested kv_lora_rank.  Targets:
adaptive ≤ best uniform on the search split, and on SmolLM2 the degradation (ppl − original) cut
by ≥ 25 % against the best uniform fold.

    .venv/bin/python bench/transition.py [--models smollm2,stories260k] [--calib-tokens 16384] [--eval-windows 4]

``--protocol hf-rows`` is the side-by-side protocol against the public TransMLA converter (issue 12):
SmolLM2, rope_dim 32, calibration 32,768 tokens of wiki.valid.tokens, perplexity on the first 40
windows × 2048 of WikiText-2 test built as the Hugging Face rows joined with blank lines.  It runs
the real ``convert`` with its defaults (stage 1, final at each rank, uniform folds, the default
adaptive search and its plan reused at the other ranks) plus one row with TransMLA's own choices in
our code, and writes ``bench/results/transition_hf_rows.json``:

    .venv/bin/python bench/transition.py --protocol hf-rows [--eval-windows 40] [--uniform-folds 2,4,8]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import common  # noqa: E402

# TransMLA's own choices, expressed with our options (its converter: key PCA, BKV, the original
# model's stream for stage 1, position-free components scored at distance 0).
TRANSMLA_CHOICES = {"rorope": "key", "lowrank": "bkv", "statistics": "two-stream", "nope_rotation": "none"}

SETTINGS = {  # model → (loader, rope_dim, ranks, eval seq len)
    "smollm2": (common.smollm2, 32, [96, 160], 2048),
    "stories260k": (common.stories260k, 4, [16, 32], 512),
}


def stage1_model(config, store, grams, plan, rope_dim):
    from mindyouzhi.models.decoder import layer_prefix, read_global_weights, read_layer_weights
    from mindyouzhi.transition.layers import convert_stage1, full_rank, hybrid_config

    weights = dict(read_global_weights(store, config))
    for index, fold in enumerate(plan):
        layer = read_layer_weights(store, config, index)
        stage1 = (convert_stage1(config, layer, np.asarray(grams[index]), fold, rope_dim, profile=grams.profile(index))
                  if fold is not None else None)
        weights.update({layer_prefix(index) + k: v for k, v in (stage1.weights if stage1 else layer).items()})
    ranks = [full_rank(config, rope_dim) if f is not None else None for f in plan]
    return hybrid_config(config, plan, ranks, rope_dim, stage=1), weights


def stage2_grams(stage1_config, weights, calib, batch_size=8):
    """Layer-input Grams of the stage-1 model over the calibration windows (stage-2 statistics)."""
    from mindyouzhi.models.decoder import layer_prefix
    from mindyouzhi.transition.calibration import LayerRunner, layer_gram

    runner = LayerRunner(calib.shape[1], batch_size)
    hidden = weights["model.embed_tokens.weight"][calib]
    grams = []
    for index in range(stage1_config.num_hidden_layers):
        layer = {k[len(layer_prefix(index)):]: v for k, v in weights.items() if k.startswith(layer_prefix(index))}
        grams.append(layer_gram(hidden, layer, stage1_config.rms_norm_eps)[0])
        hidden = runner.run(stage1_config, index, layer, hidden)
    return grams


def final_model(stage1_config, weights, grams_b, rank):
    from mindyouzhi.models.decoder import layer_prefix
    from mindyouzhi.transition.layers import Stage1Layer, convert_stage2, head_geometry

    config = stage1_config
    out = dict(weights)
    latent = config.num_key_value_heads * config.head_dim
    rope = config.mla.rope_dim
    for index, fold in enumerate(config.mla.fold_plan):
        if fold is None:
            continue
        prefix = layer_prefix(index)
        layer = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        stage1 = Stage1Layer(layer, latent - rope, rope, 2 * latent - rope, head_geometry(config, rope))
        out.update({prefix + k: v for k, v in convert_stage2(stage1, grams_b[index], rank).weights.items()})
    mla = config.mla.__class__(rope_dim=rope, kv_lora_rank=[rank if f is not None else None for f in config.mla.fold_plan],
                               fold_plan=config.mla.fold_plan, stage=2)
    return config.replace(mla=mla), out


def hf_rows_test_windows(tokenizer, count, seq_len=2048):
    """The first ``count`` windows of WikiText-2 test built as the HF rows joined with blank lines
    (issue 12's protocol, the peer's evaluator)."""
    from mindyouzhi.eval.ppl import windows

    _, test_path = common.wikitext()
    text = common.wikitext_hf_rows(test_path.read_text(encoding="utf-8"))
    return windows(np.asarray(tokenizer.encode(text), np.int32), seq_len, count, test_path)


def run_model(name, args, calib_path, test_path):
    from mindyouzhi.convert_weights.safetensors_io import SafetensorsStore
    from mindyouzhi.eval.ppl import perplexity, token_stream, windows
    from mindyouzhi.models.config import ModelConfig
    from mindyouzhi.models.runner import ModelRunner
    from mindyouzhi.tokenizer import load_tokenizer
    from mindyouzhi.transition.calibration import GramCache, text_windows
    from mindyouzhi.transition.folds import legal_folds, paper_label
    from mindyouzhi.transition.pipeline import compute_original_grams
    from mindyouzhi.transition.search import CandidateFactory, HybridEvaluator, run_adaptive_search

    loader, rope_dim, ranks, eval_len = SETTINGS[name]
    model_dir = loader()
    config = ModelConfig.from_dir(model_dir)
    store = SafetensorsStore(model_dir)
    tokenizer = load_tokenizer(model_dir)
    folds = legal_folds(config.head_dim, rope_dim)
    started = time.perf_counter()
    calib = text_windows(tokenizer, calib_path, args.calib_tokens, 256, 42, "--calib")
    search = text_windows(tokenizer, calib_path, args.search_tokens, 512, 43, "--search-data")
    test = windows(token_stream(tokenizer, test_path, "--eval-data"), eval_len, args.eval_windows, test_path)
    grams = GramCache()
    evaluate = lambda runner: perplexity(runner, test).ppl  # noqa: E731
    original = evaluate(ModelRunner.from_dir(model_dir, with_tokenizer=False))
    evaluator = HybridEvaluator(config, store, search, "stage1")
    factory = CandidateFactory(evaluator, grams, rope_dim, None)
    compute_original_grams(config, store, calib, grams, nope_rotation="mean")
    outcome = run_adaptive_search(evaluator, factory, folds, None,
                                  {"bench": name}, uniform_guard=True, trajectories=args.trajectories)
    plans = {f"uniform f={f}": [f] * config.num_hidden_layers for f in folds}
    plans["adaptive"] = outcome.plan
    rows = {}
    for label, plan in plans.items():
        s1_config, s1_weights = stage1_model(config, store, grams, plan, rope_dim)
        row = {"plan": plan, "search_stage1_ppl": (outcome.adaptive_score if label == "adaptive"
                                                   else outcome.uniform_scores[plan[0]]),
               "test_stage1_ppl": evaluate(ModelRunner.from_weights(s1_config, s1_weights))}
        grams_b = stage2_grams(s1_config, s1_weights, calib)
        for rank in ranks:
            f_config, f_weights = final_model(s1_config, s1_weights, grams_b, rank)
            row[f"test_final_ppl_rank{rank}"] = evaluate(ModelRunner.from_weights(f_config, f_weights))
        rows[label] = row
        print(f"  {name} {label}: {row}", flush=True)
    uniform_labels = [k for k in rows if k.startswith("uniform")]
    best_search = min(uniform_labels, key=lambda k: rows[k]["search_stage1_ppl"])
    summary = {}
    for metric in ["test_stage1_ppl"] + [f"test_final_ppl_rank{r}" for r in ranks]:
        best_test = min(uniform_labels, key=lambda k: rows[k][metric])
        degradation_uniform = rows[best_search][metric] - original
        degradation_adaptive = rows["adaptive"][metric] - original
        summary[metric] = {
            "best_uniform_by_search": best_search, "best_uniform_by_test": best_test,
            "uniform": rows[best_search][metric], "adaptive": rows["adaptive"][metric],
            "degradation_cut_vs_search_best_uniform": 1 - degradation_adaptive / degradation_uniform,
            "degradation_cut_vs_test_best_uniform": 1 - degradation_adaptive / (rows[best_test][metric] - original),
        }
    stage1_values = [rows[k]["test_stage1_ppl"] for k in uniform_labels]
    return {
        "model": str(model_dir), "rope_dim": rope_dim, "ranks": ranks, "folds": folds,
        "paper_labels": {str(f): paper_label(f, config.head_dim, rope_dim) for f in folds},
        "calibration": {"file": str(calib_path), "tokens": int(calib.size)},
        "search": {"file": str(calib_path), "tokens": int(search.size), "original_ppl": outcome.original,
                   "adaptive_ppl": outcome.adaptive_score, "uniform_ppl": {str(k): v for k, v in outcome.uniform_scores.items()},
                   "fell_back_to_uniform": outcome.fell_back_to_uniform, "rounds": outcome.rounds,
                   "trajectory": {k: [list(p) for p in v] for k, v in outcome.trajectory.items()},
                   "search_forward_equivalents": outcome.search_forward_equivalents,
                   "adaptive_not_worse_than_best_uniform": outcome.adaptive_score <= min(outcome.uniform_scores.values())},
        "evaluation": {"file": str(test_path), "windows": int(test.shape[0]), "seq_len": eval_len},
        "original_test_ppl": original, "rows": rows, "summary": summary,
        "pattern": {"stage1_degrades_every_fold": all(v > original for v in stage1_values),
                    "larger_folds_not_always_better": any(b < a for a, b in zip(stage1_values[1:], stage1_values[:-1]))},
        "seconds": time.perf_counter() - started,
    }


def hf_rows_protocol(args) -> dict:
    """The issue-12 table: original, stage 1, final at each rank — uniform folds and the adaptive plan."""
    import tempfile
    from pathlib import Path

    from mindyouzhi.eval.ppl import perplexity
    from mindyouzhi.models.runner import ModelRunner
    from mindyouzhi.tokenizer import load_tokenizer
    from mindyouzhi.transition.convert import ConvertOptions, convert

    model_dir = common.smollm2()
    calib_path, test_path = common.wikitext()
    tokenizer = load_tokenizer(model_dir)
    test = hf_rows_test_windows(tokenizer, args.eval_windows)
    ranks = [int(r) for r in args.ranks.split(",")]
    results: dict = {"protocol": "hf-rows", "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)",
                     "calibration": {"file": str(calib_path), "tokens": args.calib_tokens, "seq_len": 256},
                     "evaluation": {"file": str(test_path), "windows": int(test.shape[0]), "seq_len": 2048},
                     "rows": {}}

    def ppl(directory) -> float:
        return perplexity(ModelRunner.from_dir(directory, with_tokenizer=False), test).ppl

    def run(label: str, **overrides) -> dict:
        with tempfile.TemporaryDirectory(dir=common.CACHE) as work:
            options = ConvertOptions(model=model_dir, out=Path(work) / "out", calib=calib_path, rope_dim=32,
                                     calib_tokens=args.calib_tokens, search_data=calib_path, **overrides)
            started = time.perf_counter()
            report = convert(options)
            row = {"seconds": time.perf_counter() - started, "fold_plan": report["fold_plan"],
                   "kv_lora_rank": report["kv_lora_rank"], "lowrank": report["lowrank"],
                   "peak_rss_bytes": report["peak_rss_bytes"], "search": report.get("search") or None,
                   "test_ppl": ppl(options.out)}
        results["rows"][label] = row
        print(f"  {label}: ppl {row['test_ppl']:.4f} ({row['seconds']:.0f} s)", flush=True)
        common.save(name, results)
        return row

    name = "transition_hf_rows" if args.only == "all" else f"transition_hf_rows_{args.only}"
    results["rows"]["original"] = {"test_ppl": ppl(model_dir)}
    print(f"  original: {results['rows']['original']['test_ppl']:.4f}", flush=True)
    peer = TRANSMLA_CHOICES
    first, *other_ranks = ranks
    # most telling rows first: results are saved after every row
    uniform_rows = args.only in ("all", "uniform")
    if uniform_rows:
        run(f"final f=4 r{first}", freqfold="4", kv_lora_rank=first)
        if args.peer_equivalent:
            run(f"TransMLA-equivalent f=4 r{first}", freqfold="4", kv_lora_rank=first, **peer)
        run("stage1 f=4", freqfold="4", stage=1)
        for rank in other_ranks:
            run(f"final f=4 r{rank}", freqfold="4", kv_lora_rank=rank)
    adaptive = None
    if args.adaptive and args.only in ("all", "adaptive"):
        adaptive = run(f"adaptive r{first}", freqfold="adaptive", kv_lora_rank=first, search_tokens=args.search_tokens,
                       trajectories=False)
    for fold in [int(f) for f in args.uniform_folds.split(",") if f and int(f) != 4 and uniform_rows]:
        run(f"final f={fold} r{first}", freqfold=str(fold), kv_lora_rank=first)
    if adaptive is not None:
        with tempfile.TemporaryDirectory() as scratch:
            plan_file = Path(scratch) / "report.json"
            plan_file.write_text(json.dumps({"fold_plan": adaptive["fold_plan"], "rope_dim": 32}))
            for rank in other_ranks:
                run(f"adaptive plan r{rank}", plan=plan_file, kv_lora_rank=rank)
        uniform = {label: row["test_ppl"] for label, row in results["rows"].items()
                   if label.startswith("final f=") and label.endswith(f"r{first}")}
        if uniform:
            best = min(uniform, key=uniform.get)
            results["adaptive_vs_best_uniform"] = {"best_uniform": best, "ratio": adaptive["test_ppl"] / uniform[best]}
    common.save(name, results)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", choices=["legacy", "hf-rows"], default="legacy")
    parser.add_argument("--uniform-folds", default="2,4,8", help="hf-rows: uniform folds converted at the first rank")
    parser.add_argument("--no-peer-equivalent", dest="peer_equivalent", action="store_false",
                        help="hf-rows: skip the row with TransMLA's choices (key PCA, BKV, two streams) in our code")
    parser.add_argument("--no-adaptive", dest="adaptive", action="store_false", help="hf-rows: skip the search rows")
    parser.add_argument("--only", choices=["all", "uniform", "adaptive"], default="all",
                        help="hf-rows: run one half (e.g. in two processes); results go to transition_hf_rows_<half>.json")
    parser.add_argument("--ranks", default="96,160", help="hf-rows: kv_lora_rank values")
    parser.add_argument("--models", default="stories260k,smollm2")
    parser.add_argument("--calib-tokens", type=int, default=None, help="default 16384 (hf-rows: the issue-12 protocol's)")
    parser.add_argument("--search-tokens", type=int, default=None, help="default 4096 (hf-rows: the issue-12 protocol's)")
    parser.add_argument("--eval-windows", type=int, default=None, help="default 4 (hf-rows: the issue-12 protocol's)")
    parser.add_argument("--no-trajectories", dest="trajectories", action="store_false")
    args = parser.parse_args()
    hf_rows = args.protocol == "hf-rows"
    for name, legacy, protocol in (("calib_tokens", 16384, 32768), ("search_tokens", 4096, 8192), ("eval_windows", 4, 40)):
        if getattr(args, name) is None:
            setattr(args, name, protocol if hf_rows else legacy)
    if hf_rows:
        print(common.dump(hf_rows_protocol(args)))
        return
    calib, test = common.wikitext()
    previous = common.RESULTS / "transition.json"  # keep other models' rows from earlier runs
    results = json.loads(previous.read_text()).get("results", {}) if previous.is_file() else {}
    for name in args.models.split(","):
        results[name] = run_model(name, args, calib, test)
        common.save("transition", {"args": vars(args), "results": results})
    if args.trajectories:
        from mindyouzhi.transition.plots import plot_trajectory

        for name in args.models.split(","):
            result = results[name]
            plot_trajectory(result["search"]["trajectory"], result["search"]["original_ppl"],
                            common.RESULTS / f"transition_{name}_trajectory.png")
    print(common.dump({k: {"original": v["original_test_ppl"], "summary": v["summary"], "pattern": v["pattern"]}
                       for k, v in results.items() if k in args.models.split(",")}))


if __name__ == "__main__":
    main()
