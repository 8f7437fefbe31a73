"""``mindyouzhi generate``, ``serve`` and ``capacity``: thin click commands over the serving engine.

Each prints a human summary, or one JSON object with ``--json``; user mistakes raise ``UserError``
(one line on stderr, exit code 2 once the main group wraps them).
"""
from __future__ import annotations

import math
import signal
import sys
import threading
import time
from pathlib import Path

import click

from mindyouzhi.cli_support import KV_LORA_RANK, emit, json_option, progress_option, renamed_option
from mindyouzhi.errors import UserError

_DIR = click.Path(file_okay=False, path_type=Path)
_ATTENTION = click.Choice(["auto", "custom", "gather"])
_ATTENTION_HELP = "decode attention over the paged cache: the CPU custom kernel, plain MindSpore ops, or auto"


# -- generate -------------------------------------------------------------------------------------
@click.command("generate")
@click.option("--model", "model_dir", required=True, type=_DIR, help="model directory (GQA, MLA or hybrid)")
@click.option("--prompt", required=True, help="prompt text")
@click.option("--max-new-tokens", default=64, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy")
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int, help="random seed for sampling")
@click.option("--chat", is_flag=True, help="wrap the prompt as a user message in the model's chat template")
@click.option("--attention", default="auto", show_default=True, type=_ATTENTION, help=_ATTENTION_HELP)
@json_option
def generate_cmd(model_dir, prompt, max_new_tokens, temperature, top_p, seed, chat, attention, as_json):
    """Generate text with the paged latent KV cache (absorbed MLA on converted layers)."""
    _check_sampling_flags(max_new_tokens, temperature, top_p, seed)
    from mindyouzhi.models.runner import ModelRunner

    from .engine import Engine, EngineOptions
    from .sampling import SamplingParams
    from .text_stream import IncrementalDetokenizer

    runner = ModelRunner.from_dir(model_dir)
    tokenizer = runner.tokenizer
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        prompt_ids = tokenizer.encode(text, add_bos=False)
    else:
        prompt_ids = tokenizer.encode(prompt, add_bos=tokenizer.add_bos_token)
    # As the engine (and so the server) does: a sequence ends at the model's context.  Capping
    # here also sizes the KV pool below for what can actually be generated.
    context = int(runner.config.max_position_embeddings)
    room = context - len(prompt_ids)
    if room < 1:
        raise UserError(f"--prompt: its {len(prompt_ids)} tokens fill the model's context of {context} tokens; "
                        f"nothing can be generated")
    if max_new_tokens > room:
        click.echo(f"note: --max-new-tokens {max_new_tokens} capped at {room}: the model's context is {context} "
                   f"tokens and the prompt has {len(prompt_ids)}", err=True)
        max_new_tokens = room
    stop_ids = tuple(t for t in {tokenizer.eos_token_id, runner.config.eos_token_id} if t is not None)
    params = SamplingParams(max_new_tokens, temperature, top_p, seed, stop_ids)
    block_size = 16
    lifetime = len(prompt_ids) + max_new_tokens
    # A pool exactly as large as this one request can use (plus the null block).
    engine = Engine(runner, EngineOptions(num_blocks=-(-lifetime // block_size) + 1, block_size=block_size,
                                          max_batch=1, attention=attention))
    detokenizer = IncrementalDetokenizer(tokenizer)
    output_ids: list[int] = []
    finish_reason = None

    def on_event(event):
        nonlocal finish_reason
        output_ids.append(event.token_id)
        finish_reason = event.finish_reason
        if not as_json:
            delta = detokenizer.push(event.token_id) + (detokenizer.flush() if event.finish_reason else "")
            click.echo(delta, nl=False)

    started = time.perf_counter()
    engine.add_request(prompt_ids, params, on_event=on_event)
    while engine.has_work():
        engine.step()
    seconds = time.perf_counter() - started
    text = tokenizer.decode(output_ids)
    payload = {"text": text, "token_ids": output_ids, "prompt_tokens": len(prompt_ids),
               "completion_tokens": len(output_ids), "finish_reason": finish_reason, "seconds": seconds,
               "tokens_per_second": len(output_ids) / seconds if seconds > 0 else 0.0,
               "kv_bytes_per_token": engine.pool.bytes_per_token, "attention": engine.attention.name}
    emit(payload, as_json, "")  # the text itself was streamed above: end its line
    if not as_json:
        click.echo(f"[{len(output_ids)} tokens, {finish_reason}, {payload['tokens_per_second']:.1f} tok/s incl. prefill, "
                   f"KV {engine.pool.bytes_per_token} B/token, attention {engine.attention.name}]", err=True)


def _check_sampling_flags(max_new_tokens: int, temperature: float, top_p: float, seed: int) -> None:
    """Before the model loads, and naming the flag (``SamplingParams.validate`` names the field)."""
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    if not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"--temperature {temperature}: must be a finite number ≥ 0 (0 = greedy)")
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise UserError(f"--top-p {top_p}: must be in (0, 1]")
    if seed < 0:
        raise UserError(f"--seed {seed}: must be a non-negative integer")


def _at_least_one(*flags: tuple[str, "int | None"]) -> None:
    for flag, value in flags:
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: must be at least 1")


# -- serve ----------------------------------------------------------------------------------------
@click.command("serve")
@click.option("--model", "model_dir", required=True, type=_DIR, help="model directory")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind (no authentication: keep loopback)")
@click.option("--port", default=8000, show_default=True, type=int, help="0 = any free port")
@click.option("--kv-memory", default="1GiB", show_default=True, help="KV pool size, e.g. 512MiB, 4GiB")
@click.option("--max-batch", default=64, show_default=True, type=int, help="sequences decoded together at most")
@click.option("--block-size", default=16, show_default=True, type=int, help="tokens per KV block")
@click.option("--admission", default="on-demand", show_default=True, type=click.Choice(["on-demand", "reserve"]),
              help="on-demand: admit when the prompt fits, preempt under pressure; reserve: admit when the whole "
                   "request fits, never preempt")
@click.option("--attention", default="auto", show_default=True, type=_ATTENTION, help=_ATTENTION_HELP)
@click.option("--served-model-name", default=None, help="model id clients send (default: the directory name)")
@click.option("--log-requests", is_flag=True, help="log each HTTP request on stderr")
@click.option("--read-timeout", default=60.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="seconds an idle or slow client connection may take to send its request before it is closed")
def serve_cmd(model_dir, host, port, kv_memory, max_batch, block_size, admission, attention, served_model_name,
              log_requests, read_timeout):
    """OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models, /health)."""
    from mindyouzhi.models.runner import ModelRunner

    from .capacity import format_bytes, parse_bytes
    from .engine import Engine, EngineOptions
    from .engine_thread import EngineThread
    from .http_server import make_server, served_model

    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: must be in 0..65535")
    _at_least_one(("--max-batch", max_batch), ("--block-size", block_size))
    runner = ModelRunner.from_dir(model_dir)
    engine = Engine(runner, EngineOptions(kv_memory=parse_bytes(kv_memory, "--kv-memory"), block_size=block_size,
                                          max_batch=max_batch, attention=attention, admission=admission))
    served = served_model(engine, served_model_name or Path(model_dir).resolve().name)
    worker = EngineThread(engine).start()
    try:
        server = make_server(worker, served, host, port, log_requests, read_timeout)
    except OSError as exc:
        worker.stop()
        raise UserError(f"--host {host} --port {port}: cannot bind ({exc.strerror or exc})") from None
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: listening on {host} without authentication", err=True)
    pool = engine.pool
    click.echo(f"serving {served.model_id} at {server.url}/v1 — KV pool {format_bytes(pool.total_bytes)}: "
               f"{pool.usable_tokens} tokens × {pool.bytes_per_token} B, attention {engine.attention.name}, "
               f"admission {admission} (Ctrl-C to stop)")
    sys.stdout.flush()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops as cleanly as Ctrl-C
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        worker.stop()
    click.echo("stopped", err=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


# -- capacity -------------------------------------------------------------------------------------
@click.command("capacity")
@click.option("--model", "model_dir", type=_DIR, default=None, help="model directory (a converted one compares "
              "against its all-GQA original)")
@click.option("--model-config", "config_name", default=None, help="llama-3-8b | qwen2.5-7b | openpangu-embedded-7b | "
              "qwen2.5-14b | all | a config.json (no weights needed; formerly --config, still accepted until the "
              "next release)")
@click.option("--memory", required=True, help="device memory for weights + KV + workspace, e.g. 64GiB")
@click.option("--context", default=2048, show_default=True, type=int, help="tokens per sequence (1k in + 1k out = 2048)")
@click.option("--dtype", default=None, type=click.Choice(["bf16", "fp16", "fp32"]),
              help="cache and weight dtype [default: bf16 for --model-config (Ascend), fp32 for --model (this CPU engine)]")
@click.option("--workspace", default=None, help="reserve for activations and runtime: bytes or a % of --memory [10%]")
@click.option("--kv-lora-rank", type=KV_LORA_RANK, default=None,
              help="MLA form of an unconverted model: latent width K, or 'full' (no truncation) [--model-config: 512]")
@click.option("--rope-dim", type=int, default=None, help="MLA form of an unconverted model [--model-config: 64]")
@click.option("--block-size", default=16, show_default=True, type=int)
@click.option("--measure", is_flag=True, help="also fill a real KV pool in the engine (needs --model)")
@click.option("--original", "original_dir", type=_DIR, default=None, help="with --measure: the GQA source model, "
              "measured side by side")
@click.option("--prompt-len", type=int, default=None, help="--measure prompt tokens [context/2]")
@click.option("--gen-len", type=int, default=None, help="--measure generated tokens [context − prompt]")
@click.option("--attention", default="auto", show_default=True, type=_ATTENTION, help=_ATTENTION_HELP)
@renamed_option("--config", "--model-config", "config_name")
@progress_option
@json_option
def capacity_cmd(model_dir, config_name, memory, context, dtype, workspace, kv_lora_rank, rope_dim, block_size,
                 measure, original_dir, prompt_len, gen_len, attention, as_json):
    """KV bytes per token and max concurrent sequences for a memory budget, original vs converted."""
    from . import capacity

    _at_least_one(("--block-size", block_size), ("--context", context), ("--prompt-len", prompt_len),
                  ("--gen-len", gen_len))
    if (model_dir is None) == (config_name is None):
        raise UserError("pass exactly one of --model DIR or --model-config NAME_OR_FILE")
    if measure and model_dir is None:
        raise UserError("--measure runs the engine and needs --model DIR")
    if original_dir is not None and not measure:
        raise UserError("--original is only used with --measure")
    memory_bytes = capacity.parse_bytes(memory, "--memory")
    reserve = capacity.workspace_bytes(workspace, memory_bytes)
    dtype = dtype or ("fp32" if model_dir is not None else "bf16")
    if config_name is not None and config_name.lower() == "all":
        names = list(capacity.PAPER_MODELS)
    else:
        names = [config_name or str(model_dir)]
    results = {}
    for name in names:
        config = capacity.ModelConfig.from_dir(model_dir) if model_dir is not None else capacity.load_config(name)
        original, converted = _sides(config, kv_lora_rank, rope_dim, model_dir is None)
        results[name] = capacity.compare(original, converted, memory_bytes, context, dtype, reserve, block_size)
    if measure:
        results[names[0]]["measured"] = _measure(model_dir, original_dir, results[names[0]], memory_bytes, reserve,
                                                 context, prompt_len, gen_len, block_size, attention)
    payload = results[names[0]] if len(names) == 1 else results
    human = "\n\n".join(capacity.summary(result, name) for name, result in results.items())
    emit(payload, as_json, human)


def _sides(config, kv_lora_rank, rope_dim, config_only: bool):
    from . import capacity

    if config.mla is not None:
        if kv_lora_rank is not None or rope_dim is not None:
            raise UserError("--kv-lora-rank/--rope-dim apply to an unconverted model; this one has an mla section")
        return capacity.as_gqa(config), config
    if config_only:
        kv_lora_rank = kv_lora_rank or capacity.PAPER_MLA_FORM["kv_lora_rank"]
        rope_dim = rope_dim or capacity.PAPER_MLA_FORM["rope_dim"]
    elif kv_lora_rank is None or rope_dim is None:
        raise UserError("the model is not converted: pass --kv-lora-rank and --rope-dim to project a conversion")
    if kv_lora_rank == "full":
        from mindyouzhi.transition.layers import full_rank

        kv_lora_rank = full_rank(config, rope_dim)
    return config, capacity.as_mla(config, kv_lora_rank, rope_dim)


def _measure(model_dir, original_dir, result, memory, reserve, context, prompt_len, gen_len, block_size, attention):
    from mindyouzhi.models.runner import ModelRunner
    from mindyouzhi.progress import progress_bar

    from . import capacity

    prompt_len = prompt_len or max(1, context // 2)
    gen_len = gen_len or max(1, context - prompt_len)
    measured = {}
    sides = [("converted" if result["converted"]["attention"].startswith("MLA") else "original", model_dir)]
    if original_dir is not None:
        sides.append(("original", original_dir))
    for side, directory in sides:
        runner = ModelRunner.from_dir(directory, with_tokenizer=False)
        kv_budget = memory - capacity.weights_bytes_loaded(runner.config) - reserve
        if kv_budget <= 0:
            raise UserError(f"--memory {memory} bytes leaves no KV budget after the weights and the workspace")
        _check_host_memory(kv_budget)
        bar = progress_bar(0, f"measure {side}", "tok")
        measured[side] = capacity.measure(runner, kv_budget, prompt_len, gen_len, attention, block_size,
                                          progress=bar.update)
        bar.close()
    return measured


def _check_host_memory(kv_budget: int) -> None:
    import psutil

    available = psutil.virtual_memory().available
    if kv_budget > 0.8 * available:
        raise UserError(f"--measure would allocate a {kv_budget / 2**30:.1f} GiB KV pool but only "
                        f"{available / 2**30:.1f} GiB of RAM is available: lower --memory")
