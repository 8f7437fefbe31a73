"""The YouZhi pipeline recipe (``recipes/youzhi_*.yaml``): one YAML for the whole run.

Sections (``${VAR}`` / ``${VAR:-default}`` expanded as in training recipes)::

    original: DIR                 # the GQA model (teacher)
    convert:  {flag: value}       # `mindyouzhi convert` flags (names without --), our conversion
    baseline: {flag: value}       # optional: the same conversion with TransMLA's choices (its own row)
    data:     {...}               # finance SFT data and the held-out splits (workflow/finance_data.py)
    annotate: {max_new_tokens, batch_size, limit, forward_precision}   # the teacher answers the SFT prompts
    gkd:      {training-recipe sections to override}   # runner_config, optimizer, lr_schedule, …
              # + annotated_loss: response|all, mix: [{path, format, max_samples}] (more sources)
    sft:      {training-recipe sections to override}
    eval:     {ppl: {data, seq_len, max_windows}, kl: {…}, tasks: [suite tasks], heldout_limit: N, bootstrap: 1000}
    export:   {format: deepseek-v3}
    capacity: {memory: 64GiB, context: 2048}
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mindyouzhi.errors import UserError
from mindyouzhi.io_utils import read_yaml

SECTIONS = {"original": True, "convert": True, "baseline": False, "data": True, "annotate": False, "gkd": True,
            "sft": True, "eval": True, "export": False, "capacity": False}
DEFAULTS = {"annotate": {"max_new_tokens": 256, "batch_size": 8, "limit": None, "forward_precision": "auto"},
            "export": {"format": "deepseek-v3"},
            "capacity": {"memory": "64GiB", "context": 2048}}


@dataclass(frozen=True)
class PipelineRecipe:
    path: Path
    sections: dict

    def __getitem__(self, name: str) -> Any:
        return self.sections.get(name)

    def digest(self, *names: str) -> str:
        """A stable hash of the named sections (what a stage's fingerprint is made of)."""
        payload = json.dumps({name: self.sections.get(name) for name in names}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_pipeline_recipe(path: Path, check_paths: bool = True) -> PipelineRecipe:
    from mindyouzhi.train.config import expand_env

    path = Path(path)
    where = f"--recipe {path}"
    raw = read_yaml(path, "--recipe", "pipeline recipe")
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping with sections {', '.join(SECTIONS)}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise UserError(f"{where}: unknown section {unknown[0]!r} (expected: {', '.join(SECTIONS)})")
    missing = [name for name, required in SECTIONS.items() if required and raw.get(name) is None]
    if missing:
        raise UserError(f"{where}: missing section {missing[0]!r}")
    sections = expand_env(raw, where)
    for name in SECTIONS:
        if name != "original" and sections.get(name) is not None and not isinstance(sections[name], dict):
            raise UserError(f"{where}: section {name!r} must be a mapping")
    for name, defaults in DEFAULTS.items():
        sections[name] = {**defaults, **(sections.get(name) or {})}
    limit = sections["eval"].get("heldout_limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"{where}: eval.heldout_limit {limit!r}: expected a whole number ≥ 1 (held-out items per task)")
    original = Path(str(sections["original"])).expanduser()
    if check_paths and not (original / "config.json").is_file():
        raise UserError(f"{where}: original {original}: not a model directory (no config.json)")
    sections["original"] = str(original.resolve())
    if "model" in sections["convert"] or "out" in sections["convert"]:
        raise UserError(f"{where}: convert: --model and --out are set by the pipeline; remove them")
    return PipelineRecipe(path, sections)
