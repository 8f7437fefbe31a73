"""Checkpoints: a loadable model directory plus optimizer state and the data position.

``<output_dir>/checkpoint-000050/`` holds

* ``config.json`` + ``model.safetensors`` (parameter names = HF names) + the tokenizer and other
  side files of the student directory — a model directory that ``ModelRunner.from_dir``,
  ``eval``, ``export`` and ``train`` accept as is;
* ``optimizer.safetensors``: the AdamW moments by name (``exp_avg.<param>``, ``exp_avg_sq.<param>``);
* ``trainer_state.json``: the optimizer step (which is also the data position: step ``s`` reads
  global batch ``s`` of the seeded order), the recipe fingerprint and data fingerprint checked on
  resume, tokens seen and elapsed time.

``<output_dir>/final/`` is the trained model (no optimizer).  Every directory is written to a
temporary sibling and renamed, so a kill never leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from mindyouzhi.errors import UserError
from mindyouzhi.io_utils import atomic_output_dir, read_json, write_json_atomic

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
FINAL_DIR = "final"
_NOT_SIDE_FILES = {"config.json", "report.json", "model.safetensors.index.json", STATE_FILE}


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def copy_side_files(source_dir: Path, out_dir: Path) -> None:
    """Tokenizer, generation config and similar small files of the model we started from."""
    for path in sorted(Path(source_dir).iterdir()):
        if (path.is_file() and path.name not in _NOT_SIDE_FILES and path.suffix not in (".safetensors", ".png")
                and path.name != OPTIMIZER_FILE):
            shutil.copy2(path, out_dir / path.name)


def full_arrays(cell, sharded_scratch: Optional[Path] = None) -> dict:
    """Parameter name → full numpy array.  A semi-auto parallel run (``sharded_scratch`` given)
    holds slices: MindSpore's ``save_checkpoint(integrated_save=True)`` gathers them (a collective:
    every rank calls it) into a scratch file read back here."""
    if sharded_scratch is None:
        return {name: param.asnumpy() for name, param in cell.parameters_and_names()}
    import mindspore as ms
    from safetensors.numpy import load_file

    ms.save_checkpoint(cell, str(sharded_scratch), integrated_save=True, format="safetensors")
    path = sharded_scratch if sharded_scratch.is_file() else sharded_scratch.with_suffix(".safetensors")
    arrays = load_file(str(path))
    path.unlink()
    return arrays


def write_model(out_dir: Path, net, config, side_files_from: Path, arrays: Optional[dict] = None) -> None:
    from mindyouzhi.convert_weights.safetensors_io import ShardedWriter

    arrays = arrays if arrays is not None else full_arrays(net)
    writer = ShardedWriter(out_dir, {name: value.shape for name, value in arrays.items()}, max_shard_bytes=4 << 30,
                           metadata={"format": "pt"})
    for name, value in arrays.items():
        writer.add(name, value)
    writer.close()
    (out_dir / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2, ensure_ascii=False) + "\n")
    copy_side_files(side_files_from, out_dir)


def save_checkpoint(output_dir: Path, step: int, net, config, optimizer, state: dict, side_files_from: Path,
                    keep: int, arrays: Optional[tuple] = None) -> Path:
    """``arrays``: (weights, optimizer state) already gathered (a sharded run), else read here."""
    from safetensors.numpy import save_file

    weights, moments = arrays if arrays is not None else (None, optimizer.state_arrays())
    target = output_dir / checkpoint_name(step)
    with atomic_output_dir(target, overwrite=True, flag="checkpoint") as tmp:
        write_model(tmp, net, config, side_files_from, weights)
        save_file({k: np.ascontiguousarray(v) for k, v in moments.items()}, str(tmp / OPTIMIZER_FILE))
        write_json_atomic(tmp / STATE_FILE, state)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def save_final(output_dir: Path, net, config, state: dict, side_files_from: Path,
               weights: Optional[dict] = None) -> Path:
    target = output_dir / FINAL_DIR
    with atomic_output_dir(target, overwrite=True, flag="final model") as tmp:
        write_model(tmp, net, config, side_files_from, weights)
        write_json_atomic(tmp / STATE_FILE, state)
    return target


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def remove_stale_temporaries(output_dir: Path) -> None:
    """Temporary directories of checkpoints a kill interrupted."""
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            if path.is_dir() and path.name.startswith((".checkpoint-", f".{FINAL_DIR}.")):
                shutil.rmtree(path, ignore_errors=True)


def read_state(checkpoint: Path) -> dict:
    return read_json(checkpoint / STATE_FILE, "trainer state")


def load_optimizer_state(checkpoint: Path, optimizer) -> None:
    from mindyouzhi.convert_weights.safetensors_io import SafetensorsFile

    path = checkpoint / OPTIMIZER_FILE
    if not path.is_file():
        raise UserError(f"{checkpoint}: {OPTIMIZER_FILE} is missing, cannot resume the optimizer")
    store = SafetensorsFile(path)
    optimizer.load_state_arrays({name: store.get(name) for name in store.keys()}, str(path))
