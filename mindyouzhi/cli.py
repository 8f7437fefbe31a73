"""The ``mindyouzhi`` command line: one click group, each subcommand a thin call into the library.

Every command prints a human summary, or with ``--json`` exactly one JSON object on stdout.  A
``UserError`` becomes ``error: <one line>`` on stderr and exit code 2 — never a traceback.
"""
from __future__ import annotations

from pathlib import Path

import click

from mindyouzhi.cli_support import (DEFAULT_WINDOW, KV_LORA_RANK, UserErrorGroup, emit, forward_precision_option,
                                     json_option, overwrite_option, progress_option)
from mindyouzhi.errors import UserError


_Group = UserErrorGroup


@click.group(cls=_Group)
@click.version_option(package_name="mindyouzhi")
@click.option("--verbose", is_flag=True, help="Also show MindSpore's own warnings and info lines (hidden by default).")
def main(verbose):
    """GQA → MLA conversion (TransMLA + YouZhi layer-adaptive FreqFold), evaluation, training and serving on MindSpore."""
    if verbose:
        import os

        os.environ["GLOG_v"] = "1"  # MindSpore is imported lazily, after this: INFO and above


text_field_option = click.option("--text-field", default="text", show_default=True,
                                 help="field/column holding the text in .jsonl/.parquet data")


# -- eval ---------------------------------------------------------------------------------------
@main.group("eval", cls=_Group)
def eval_group():
    """Perplexity, benchmarks and teacher-vs-student fidelity."""


@eval_group.command("ppl")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path), help="model directory")
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="text tokenized as one stream: .txt (any plain text), .jsonl, .parquet, or generate:N[:SEED] "
                   "(N tokens the model writes itself; default seed 1042, held out from convert's default calibration)")
@text_field_option
@click.option("--seq-len", type=int, default=None, help=f"window length in tokens [default: {DEFAULT_WINDOW}, or the "
                                                        "model's context if shorter]")
@click.option("--max-windows", type=int, default=None, help="score only the first N windows")
@click.option("--batch-size", default=1, show_default=True, help="windows per forward")
@click.option("--stream-layers/--no-stream-layers", default=None,
              help="one layer in memory at a time, every window through it before the next is read (same result) "
                   "[default: when the loaded weights would take more than half of the available memory]")
@forward_precision_option
@progress_option
@json_option
def eval_ppl(model_dir, data, text_field, seq_len, max_windows, batch_size, stream_layers, forward_precision, as_json):
    """Perplexity over non-overlapping windows: exp(total NLL / predicted tokens)."""
    from mindyouzhi.convert_weights.safetensors_io import SafetensorsStore
    from mindyouzhi.eval.lm import resolve_precision
    from mindyouzhi.eval.ppl import perplexity, perplexity_streamed, should_stream, token_stream, windows
    from mindyouzhi.generated_text import DEFAULT_CALIB_SEED, HELD_OUT_SEED_OFFSET, resolve_text_source
    from mindyouzhi.models.config import ModelConfig, window_length
    from mindyouzhi.models.runner import ModelRunner
    from mindyouzhi.progress import progress_bar
    from mindyouzhi.tokenizer import load_tokenizer

    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    config = ModelConfig.from_dir(model_dir)
    seq_len = window_length(seq_len, DEFAULT_WINDOW, "--seq-len", config)
    data = resolve_text_source(data, model_dir, DEFAULT_CALIB_SEED + HELD_OUT_SEED_OFFSET, "--data")
    precision = resolve_precision(forward_precision)
    if stream_layers is None:
        stream_layers, loaded = should_stream(config, precision["used"])
        if stream_layers:
            click.echo(f"note: streaming layers (the loaded weights would take {loaded / 2**30:.1f} GiB, more than "
                       f"half of the memory available)", err=True)
    if stream_layers:
        data_windows = windows(token_stream(load_tokenizer(model_dir), data, "--data", text_field), seq_len,
                               max_windows, data)
        bar = progress_bar(config.num_hidden_layers, "ppl (layers)", "layer")
        result = perplexity_streamed(config, SafetensorsStore(model_dir), data_windows, batch_size, precision["used"],
                                     str(model_dir), progress=lambda done: bar.update(1))
    else:
        runner = ModelRunner.from_dir(model_dir, precision=precision["used"])
        data_windows = windows(token_stream(runner.tokenizer, data, "--data", text_field), seq_len, max_windows, data)
        bar = progress_bar(data_windows.size, "ppl", "tok")
        result = perplexity(runner, data_windows, batch_size, progress=bar.update)
    bar.close()
    payload = {**result.to_dict(), "forward_precision": precision}
    emit(payload, as_json, f"ppl {result.ppl:.4f} over {result.windows} windows × {seq_len} tokens "
                           f"({result.tokens} predicted), {result.tokens_per_second:.0f} tok/s, {precision['used']} forward")


# -- convert ------------------------------------------------------------------------------------
@main.command("convert")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path), help="source GQA model directory")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="output model directory")
@click.option("--calib", required=True,
              help="calibration text (never the test split): .txt, .jsonl, .parquet, or generate:N[:SEED] = N tokens "
                   "the original model writes itself (data-free; cached in ~/.cache/mindyouzhi/generated)")
@click.option("--calib-tokens", default=128 * 256, show_default=True, help="calibration tokens (windows × seq len)")
@click.option("--calib-seq-len", default=256, show_default=True)
@click.option("--calib-sampling", type=click.Choice(["rows", "slots"]), default=None,
              help="calibration windows: rows = each starts at a line/record, following rows joined by a blank line "
                   "(default for files); slots = random offsets of the token stream (default for generate:)")
@click.option("--forward-precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True,
              help="matrix products of the conversion's forward passes (calibration streams, search evaluations): "
                   "bf16 (bfloat16 inputs, fp32 accumulation; CPU kernel over MindSpore's oneDNN), fp32, or auto = "
                   "bf16 on CPUs with native bf16 dot products; statistics and weights stay fp32/fp64")
@click.option("--rope-dim", type=int, default=None, help="shared RoPE key width (default head_dim/2)")
@click.option("--rope-stride", default="auto", show_default=True,
              help="RoPE pair p of the MLA slice rotates at the source frequency θ(s·p): s = head_dim/rope_dim spreads "
                   "the pairs over every frequency (TransMLA); 1 gives them to the rope_dim/2 fastest, the slower ones "
                   "become position-free; auto = each s dividing head_dim/rope_dim, scored like --nope-rotation auto "
                   "(together with it) on the search windows")
@click.option("--kv-lora-rank", type=KV_LORA_RANK, default=None,
              help="latent width K, or 'full' (no truncation); default min(4·head_dim, full)")
@click.option("--freqfold", default="adaptive", show_default=True,
              help="adaptive | uniform | a fold F for every layer | one fold per layer F1,F2,…")
@click.option("--plan", "plan_file", type=click.Path(path_type=Path), default=None,
              help="reuse the fold_plan of an earlier report.json (no search), at any --kv-lora-rank")
@click.option("--rorope", default="score", show_default=True, type=click.Choice(["score", "key"]),
              help="stage-1 basis: score = the components carrying the most score energy E[(q·k)²] keep RoPE "
                   "(default), key = TransMLA's key PCA")
@click.option("--nope-rotation", default="auto", show_default=True, type=click.Choice(["auto", "mean", "none"]),
              help="position-free key components: mean = scored with the relative rotation they lose, averaged "
                   "under each head's attention; none = as if at distance 0 (TransMLA); auto = whichever of the two "
                   "scores better on the search windows, the uniform plan converted both ways (default)")
@click.option("--lowrank", default="output", show_default=True, type=click.Choice(["output", "bkv", "care"]),
              help="stage-2 compression: output = query/W_o-aware (default), bkv = TransMLA's balanced PCA, "
                   "care = covariance-aware SVD of the per-head keys and values")
@click.option("--key-weight", default=1.0, show_default=True, type=float,
              help="--lowrank output: weight of key (score) errors against value errors")
@click.option("--statistics", default="stage1-stream", show_default=True,
              type=click.Choice(["stage1-stream", "two-stream", "sequential"]),
              help="calibration streams: stage1-stream = the stage-1 model's hidden states for both stages; "
                   "two-stream = the original model's for stage 1 (TransMLA, twice the cost); sequential = one "
                   "stream through the converted layers")
@click.option("--folds", default=None, help="candidate folds for the search, e.g. 1,2,4,8 (default: all legal)")
@click.option("--criterion", default="final", show_default=True, type=click.Choice(["stage1", "final", "kl"]),
              help="search criterion: final = ppl of the deployed model (stage 2 at --kv-lora-rank), "
                   "stage1 = the paper's partial-RoPE ppl, kl = KL to the original")
@click.option("--shortlist", default=2, show_default=True, type=int,
              help="per search round, candidates ranked by the layer's own output error; the best N get the criterion")
@click.option("--search-context", default="uniform", show_default=True, type=click.Choice(["uniform", "original"]),
              help="what the layers below the searched one are: uniform = the best uniform fold (the search "
                   "starts from TransMLA's plan and never ends worse on the search split), original = GQA (the paper)")
@click.option("--search-data", type=click.Path(path_type=Path), default=None, help="search split (default: --calib)")
@click.option("--search-tokens", default=8192, show_default=True)
@click.option("--search-seq-len", type=int, default=None,
              help=f"tokens per search window: the context the model will serve (fold errors grow with distance) "
                   f"[default: {DEFAULT_WINDOW}, or the model's context if shorter]")
@click.option("--layers", default=None, help="layers to convert: all | 0-3,7 | last:N (others stay GQA)")
@click.option("--stage", default=2, show_default=True, type=int, help="1 = stop after RoRoPE/FreqFold (partial-RoPE model)")
@click.option("--latent-norm", is_flag=True, help="add a learnable kv_a_layernorm, initialised to the identity on average (lossy until trained; "
                   "`export` does not need it: it writes an exact linear norm otherwise)")
@click.option("--eval-data", type=click.Path(path_type=Path), default=None,
              help="report ppl at each stage on this text (a file, or generate:N[:SEED], by default seed --seed + 1000)")
@text_field_option
@click.option("--eval-seq-len", type=int, default=None,
              help=f"tokens per --eval-data window [default: {DEFAULT_WINDOW}, or the model's context if shorter]")
@click.option("--eval-max-windows", type=int, default=None)
@click.option("--seed", default=42, show_default=True)
@click.option("--batch-size", default=8, show_default=True, help="windows per layer forward")
@click.option("--work-dir", type=click.Path(path_type=Path), default=None,
              help="where the resumable state (statistics, search) is kept: one subdirectory of it, removed on "
                   "success; nothing else in it is touched (default: .OUT.work next to --out, removed on success)")
@click.option("--restart", is_flag=True, help="discard this output's saved state instead of resuming from it")
@click.option("--no-uniform-guard", is_flag=True, help="--search-context original: do not fall back to the best uniform plan if it scores better")
@click.option("--no-trajectories", is_flag=True, help="--search-context original: skip the uniform trajectories (faster; no Figure-9 plot)")
@click.option("--rope-all", is_flag=True, hidden=True, help="exactness mode: RoPE kept on every rotated component")
@overwrite_option
@progress_option
@json_option
def convert_cmd(model_dir, out, calib, calib_tokens, calib_seq_len, calib_sampling, forward_precision, rope_dim, rope_stride,
                kv_lora_rank, freqfold, plan_file, lowrank,
                key_weight, statistics, rorope, nope_rotation, folds, criterion, shortlist, search_context, search_data, search_tokens, search_seq_len, layers, stage, latent_norm, eval_data, text_field, eval_seq_len,
                eval_max_windows, seed, batch_size, work_dir, restart, no_uniform_guard, no_trajectories, rope_all,
                overwrite, as_json):
    """Convert a GQA model into an MLA model (RoRoPE + FreqFold, output-aware joint low-rank)."""
    from mindyouzhi.transition.convert import ConvertOptions, convert

    options = ConvertOptions(
        model=model_dir, out=out, calib=Path(calib), rope_dim=rope_dim, rope_stride=_auto_or_int(rope_stride), kv_lora_rank=kv_lora_rank, freqfold=freqfold,
        search_data=search_data, search_tokens=search_tokens, search_seq_len=search_seq_len, calib_tokens=calib_tokens,
        calib_seq_len=calib_seq_len, calib_sampling=calib_sampling, forward_precision=forward_precision, layers=layers, latent_norm=latent_norm, stage=stage,
        criterion=criterion, folds=_int_list(folds, "--folds"), eval_data=eval_data, text_field=text_field, eval_seq_len=eval_seq_len,
        eval_max_windows=eval_max_windows, seed=seed, overwrite=overwrite, work_dir=work_dir, restart=restart,
        batch_size=batch_size, uniform_guard=not no_uniform_guard, trajectories=not no_trajectories, rope_all=rope_all,
        plan=plan_file, lowrank=lowrank, key_weight=key_weight, shortlist=shortlist, search_context=search_context, statistics=statistics,
        rorope=rorope, nope_rotation=nope_rotation)
    report = convert(options)
    emit(report, as_json, _convert_summary(report, out))


def _auto_or_int(text: str):
    """'auto' or the integer it spells; anything else is left for the validation that names the flag."""
    return int(text) if text.strip().lstrip("-").isdigit() else text.strip()


def _int_list(text, flag):
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{flag} {text}: expected comma-separated integers") from None


def _convert_summary(report: dict, out: Path) -> str:
    kv = report["kv_values_per_token"]
    lines = [f"converted → {out}",
             f"  rope_dim {report['rope_dim']}, kv_lora_rank {report['kv_lora_rank']}, stage {report['stage']}",
             f"  fold plan (f): {report['fold_plan']}",
             f"  paper labels:  {report['fold_plan_paper_labels']}",
             f"  KV cache per token (all layers): {kv['before']} → {kv['after']} values ({kv['reduction']:.1%} smaller)"]
    search = report.get("search") or {}
    if search.get("mode") == "adaptive":
        uniform = ", ".join(f"f={f}: {s:.4f}" for f, s in search["uniform_scores"].items())
        lines.append(f"  search ({search['criterion']}): original {search['original']:.4f}, adaptive {search['adaptive']:.4f}; uniform {uniform}")
        lines.append(f"  search cost: {search['search_forward_equivalents']:.1f} full-forward equivalents "
                     f"(L·|S| = {search['budget_forward_equivalents']}); with uniform baselines and trajectories "
                     f"{search['full_forward_equivalents']:.1f}, {search['evaluations']} evaluations")
    elif search.get("mode") == "uniform":
        lines.append(f"  uniform search: {search['uniform_scores']} → f={search['chosen']}")
    choice = report.get("position_choice")
    if choice:
        chosen = choice["chosen"]
        scores = ", ".join(f"stride {c['rope_stride']} {c['nope_rotation']} (f={c['fold']}) {c['score']:.4f}"
                           for c in choice["candidates"])
        lines.append(f"  position layout: auto → RoPE stride {chosen['rope_stride']}, position-free rotation "
                     f"{chosen['nope_rotation']} ({choice['criterion']} of uniform plans on {choice['windows'][0]} × "
                     f"{choice['windows'][1]}: {scores})")
    data = report.get("data") or {}
    calibration = report.get("calibration") or {}
    if calibration:
        lines.append(f"  calibration: {calibration['tokens']} tokens in windows of {calibration['seq_len']} "
                     f"(seed {calibration['seed']}, sampling {calibration.get('sampling', 'slots')})")
    lines.append("  data: " + "; ".join(f"{label} {data[role].get('source', 'file')} ({data[role]['path']})"
                                        for role, label in (("calib", "calibration"), ("search", "search"),
                                                            ("eval", "evaluation")) if role in data))
    ppl = report.get("ppl") or {}
    if ppl:
        stages = " → ".join(f"{k} {ppl[k]:.4f}" for k in ("original", "stage1", "final") if k in ppl)
        lines.append(f"  ppl ({ppl['windows']} windows × {ppl['seq_len']}): {stages}")
    lines.append(f"  time {report['timings_seconds']['total']:.1f} s, peak RSS {report['peak_rss_bytes'] / 2**20:.0f} MiB")
    return "\n".join(lines)


# -- analyze ------------------------------------------------------------------------------------
@main.group("analyze", cls=_Group)
def analyze_group():
    """Studies of how layers react to the conversion."""


@analyze_group.command("layers")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path))
@click.option("--search-data", required=True, type=click.Path(path_type=Path), help="text to measure ppl on (not the test split)")
@click.option("--calib", type=click.Path(path_type=Path), default=None, help="calibration text (default: --search-data)")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="directory for layers.json and the PNGs")
@click.option("--rope-dim", type=int, default=None)
@click.option("--folds", default=None, help="folds to try (default: all legal)")
@click.option("--calib-tokens", default=128 * 256, show_default=True)
@click.option("--search-tokens", default=8192, show_default=True)
@click.option("--search-seq-len", default=2048, show_default=True,
              help="tokens per search window: the context the model will serve (fold errors grow with distance)")
@click.option("--seed", default=42, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@overwrite_option
@progress_option
@json_option
def analyze_layers_cmd(model_dir, search_data, calib, out, rope_dim, folds, calib_tokens, search_tokens, search_seq_len,
                       seed, batch_size, overwrite, as_json):
    """Each layer alone converted with each fold (others GQA): ppl change per layer (the paper's Figure 4)."""
    from mindyouzhi.paths import check_outputs
    from mindyouzhi.transition.analyze import analyze_layers

    check_outputs({"--out": out}, {"--model": model_dir, "--search-data": search_data, "--calib": calib}, overwrite,
                  directories={"--out"})
    result = analyze_layers(model_dir, search_data, calib or search_data, out, rope_dim, _int_list(folds, "--folds"),
                            calib_tokens, search_tokens, search_seq_len, seed, batch_size, overwrite)
    best = ", ".join(f"L{layer}: f={min(d, key=d.get)}" for layer, d in result["delta"].items())
    emit(result, as_json, f"layer sensitivity → {out}\n  original ppl {result['original']:.4f}\n  best fold per layer: {best}")


def _register_commands() -> None:
    """Subcommands that live next to the code they drive."""
    from mindyouzhi.commands_import import fetch, import_cmd
    from mindyouzhi.datagen.cli import data
    from mindyouzhi.eval.cli import bench_cmd, kl_cmd, suite_cmd
    from mindyouzhi.export.cli import export_cmd
    from mindyouzhi.probe.cli import probe
    from mindyouzhi.serve.cli import capacity_cmd, generate_cmd, serve_cmd
    from mindyouzhi.train.cli import train_cmd
    from mindyouzhi.workflow.cli import pipeline_cmd

    for command in (import_cmd, fetch, data, export_cmd, generate_cmd, serve_cmd, capacity_cmd, train_cmd, probe, pipeline_cmd):
        main.add_command(command)
    for command in (bench_cmd, kl_cmd, suite_cmd):
        eval_group.add_command(command)


_register_commands()

if __name__ == "__main__":
    main()
