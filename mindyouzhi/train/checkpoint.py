"""Checkpoints: a loadable model directory plus optimizer state and the data position.

``<output_dir>/checkpoint-000050/`` holds

* ``config.json`` + ``model.safetensors`` (parameter names = HF names) + the tokenizer and other
  side files of the student directory — a model directory that ``ModelRunner.from_dir``,
  ``eval``, ``export`` and ``train`` accept as is;
* ``optimizer.safetensors``: the AdamW moments by name (``exp_avg.<param>``, ``exp_avg_sq.<param>``);
* ``trainer_state.json``: the optimizer step (which is also the data position: step ``s`` reads
  global batch ``s`` of the seeded order), the recipe fingerprint and data fingerprint checked on
  resume, tokens seen and elapsed time.

A run with several workers (``msrun``) writes *per-rank shards* instead of ``model.safetensors`` /
``optimizer.safetensors``, in MindSpore's distributed layout (``rank_<R>/``, as
``mindspore.parallel.unified_safetensors`` reads it), so no rank writes or re-reads the whole model:

* data parallel (every rank holds everything): rank R writes its share of the weights
  (``rank_R/model.safetensors``) and of the AdamW moments (``rank_R/optimizer.safetensors``) —
  the tensors split between the ranks by size, each written once;
* semi-auto parallel (Ascend): rank R writes the slices it holds (weights and optimizer state) with
  MindSpore's ``save_checkpoint(integrated_save=False)`` (``rank_R/sliced.safetensors``), next to
  the strategy file (``strategy.ckpt``) that says how they were cut.

Each rank writes into ``.checkpoint-NNNNNN.shards/`` first; rank 0 publishes the directory once
every rank has written.  ``mindyouzhi train merge`` (``merge_checkpoint``) turns either form into
one Hugging Face model directory; resume reads the shards back (``read_checkpoint``).

``<output_dir>/final/`` is the trained model (no optimizer).  Every directory is written to a
temporary sibling and renamed, so a kill never leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from mindyouzhi.errors import UserError
from mindyouzhi.io_utils import atomic_output_dir, read_json, write_json_atomic

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
MODEL_FILE = "model.safetensors"
SLICED_FILE = "sliced.safetensors"
STRATEGY_FILE = "strategy.ckpt"
RANK_DIR = "rank_{}"
MOMENT_PREFIXES = ("exp_avg.", "exp_avg_sq.")  # optim.AdamW: ParameterTuple.clone(prefix=…) of the weights
FINAL_DIR = "final"
_NOT_SIDE_FILES = {"config.json", "report.json", "model.safetensors.index.json", STATE_FILE, STRATEGY_FILE}
# Test hook (tests/test_adversarial_train.py): the name of a directory (``checkpoint-000008``,
# ``final``) whose write pauses halfway — weights written, state not yet — so a test can SIGKILL
# the process mid-write deterministically.  Unset in normal use.
PAUSE_MID_WRITE_ENV = "MINDYOUZHI_TEST_PAUSE_MID_WRITE"


def _test_pause(target: Path) -> None:
    if os.environ.get(PAUSE_MID_WRITE_ENV) == target.name:
        time.sleep(600)


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def copy_side_files(source_dir: Path, out_dir: Path) -> None:
    """Tokenizer, generation config and similar small files of the model we started from."""
    for path in sorted(Path(source_dir).iterdir()):
        if (path.is_file() and path.name not in _NOT_SIDE_FILES and path.suffix not in (".safetensors", ".png")
                and path.name != OPTIMIZER_FILE):
            shutil.copy2(path, out_dir / path.name)


def full_arrays(cell) -> dict:
    """Parameter name → numpy array of a cell that holds its full weights."""
    return {name: param.asnumpy() for name, param in cell.parameters_and_names()}


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
                    keep: int) -> Path:
    """A single process: the model directory plus the optimizer state."""
    from safetensors.numpy import save_file

    target = output_dir / checkpoint_name(step)
    with atomic_output_dir(target, overwrite=True, flag="checkpoint") as tmp:
        write_model(tmp, net, config, side_files_from)
        _test_pause(target)
        save_file({k: np.ascontiguousarray(v) for k, v in optimizer.state_arrays().items()}, str(tmp / OPTIMIZER_FILE))
        write_json_atomic(tmp / STATE_FILE, state)
    _prune(output_dir, keep)
    return target


def _prune(output_dir: Path, keep: int) -> None:
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# -- several workers: per-rank shards ------------------------------------------------------------------
def staging_dir(output_dir: Path, step: int) -> Path:
    return output_dir / f".{checkpoint_name(step)}.shards"


def shard_owners(sizes: dict, world: int) -> dict:
    """Tensor name → the rank that writes it: the largest first, each to the rank with the fewest
    bytes so far (every rank computes the same split from the names and sizes alone)."""
    load, owner = [0] * world, {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[name] = rank
        load[rank] += sizes[name]
    return owner


def _save_safetensors(path: Path, arrays: dict) -> None:
    from safetensors.numpy import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
    os.replace(tmp, path)


def write_rank_shard(output_dir: Path, step: int, rank: int, world: int, net, optimizer) -> None:
    """Data parallel: this rank's share of the weights and of the AdamW moments (only that share is
    copied off the device)."""
    params = dict(net.parameters_and_names())
    moments = {p.name: p for p in optimizer.moments()}
    owner = shard_owners({name: int(np.prod(p.shape)) for name, p in {**params, **moments}.items()}, world)
    directory = staging_dir(output_dir, step) / RANK_DIR.format(rank)
    directory.mkdir(parents=True, exist_ok=True)
    _save_safetensors(directory / MODEL_FILE, {n: p.asnumpy() for n, p in params.items() if owner[n] == rank})
    _save_safetensors(directory / OPTIMIZER_FILE, {n: p.asnumpy() for n, p in moments.items() if owner[n] == rank})


def write_sliced_shard(output_dir: Path, step: int, rank: int, cell) -> None:
    """Semi-auto parallel: the slices this rank holds (weights and optimizer state), MindSpore's own
    per-rank save (``integrated_save=False``: no gathering across ranks)."""
    import mindspore as ms

    directory = staging_dir(output_dir, step) / RANK_DIR.format(rank)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{SLICED_FILE}.tmp.safetensors"
    ms.save_checkpoint(cell, str(tmp), integrated_save=False, format="safetensors")
    os.replace(tmp, directory / SLICED_FILE)


def publish_checkpoint(output_dir: Path, step: int, world: int, config, state: dict, side_files_from: Path,
                       keep: int, strategy_file: Optional[Path] = None) -> Path:
    """Rank 0, once every rank has written its shard: the checkpoint directory, atomically."""
    staged = staging_dir(output_dir, step)
    missing = [rank for rank in range(world) if not (staged / RANK_DIR.format(rank)).is_dir()]
    if missing:
        raise UserError(f"{output_dir}: rank {missing[0]} wrote no shard for step {step} (shared output_dir?)")
    target = output_dir / checkpoint_name(step)
    with atomic_output_dir(target, overwrite=True, flag="checkpoint") as tmp:
        for rank in range(world):
            os.replace(staged / RANK_DIR.format(rank), tmp / RANK_DIR.format(rank))
        if strategy_file is not None:
            shutil.copy2(strategy_file, tmp / STRATEGY_FILE)
        (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2, ensure_ascii=False) + "\n")
        copy_side_files(side_files_from, tmp)
        write_json_atomic(tmp / STATE_FILE, state)
    shutil.rmtree(staged, ignore_errors=True)
    _prune(output_dir, keep)
    return target


def is_sharded(checkpoint: Path) -> bool:
    return (Path(checkpoint) / RANK_DIR.format(0)).is_dir()


def _load_all(files, unique: bool = True) -> dict:
    """Every tensor of ``files``; ``unique``: a name in two files is an error (data-parallel shares)."""
    from safetensors.numpy import load_file

    arrays: dict = {}
    for path in files:
        for name, value in load_file(str(path)).items():
            if name in arrays and unique:
                raise UserError(f"{path}: tensor {name} is in more than one rank's shard")
            arrays.setdefault(name, value)
    return arrays


def read_checkpoint(checkpoint: Path, config) -> tuple[dict, dict]:
    """(weights by HF name, AdamW moments by name) of a sharded checkpoint, as full arrays: the union of
    the data-parallel shares, or MindSpore's ``unified_safetensors`` over the semi-auto slices and the
    strategy file.  Every weight of ``config`` must be there once."""
    from mindyouzhi.models.decoder import expected_tensor_names

    checkpoint = Path(checkpoint)
    ranks = sorted(checkpoint.glob("rank_[0-9]*"), key=lambda p: int(p.name.split("_")[1]))
    if (checkpoint / STRATEGY_FILE).is_file():
        import mindspore as ms

        with tempfile.TemporaryDirectory(prefix=".unified-", dir=checkpoint.parent) as unified:
            ms.parallel.unified_safetensors(str(checkpoint), str(checkpoint / STRATEGY_FILE), unified,
                                            file_suffix=Path(SLICED_FILE).stem)
            arrays = _load_all(sorted(Path(unified).glob("*.safetensors")), unique=False)
    else:
        arrays = _load_all([rank / name for rank in ranks for name in (MODEL_FILE, OPTIMIZER_FILE)
                            if (rank / name).is_file()])
    expected = expected_tensor_names(config)
    missing = sorted(expected - set(arrays))
    if missing:
        raise UserError(f"{checkpoint}: tensor {missing[0]} is in no rank's shard ({len(missing)} missing)")
    weights = {name: arrays[name] for name in sorted(expected)}
    moments = {name: value for name, value in arrays.items() if name.startswith(MOMENT_PREFIXES)}
    return weights, moments


def merge_checkpoint(checkpoint: Path, out: Path, overwrite: bool = False) -> Path:
    """``mindyouzhi train merge``: one Hugging Face model directory from a checkpoint (sharded or not)."""
    from mindyouzhi.convert_weights.safetensors_io import SafetensorsStore
    from mindyouzhi.models.config import ModelConfig

    checkpoint = Path(checkpoint)
    if not (checkpoint / STATE_FILE).is_file():
        raise UserError(f"--checkpoint {checkpoint}: not a training checkpoint ({STATE_FILE} missing)")
    config = ModelConfig.from_dir(checkpoint)
    if is_sharded(checkpoint):
        weights = read_checkpoint(checkpoint, config)[0]
    else:
        store = SafetensorsStore(checkpoint)
        weights = {name: np.asarray(store.get(name)) for name in store.keys()}
    with atomic_output_dir(out, overwrite=overwrite, flag="--out") as tmp:
        write_model(tmp, None, config, checkpoint, weights)
    return Path(out)


def save_final(output_dir: Path, net, config, state: dict, side_files_from: Path,
               weights: Optional[dict] = None) -> Path:
    target = output_dir / FINAL_DIR
    with atomic_output_dir(target, overwrite=True, flag="final model") as tmp:
        write_model(tmp, net, config, side_files_from, weights)
        _test_pause(target)
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
