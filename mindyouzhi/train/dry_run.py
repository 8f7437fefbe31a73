"""``mindyouzhi train --config R.yaml --dry-run [RANK]``: compile one rank's semi-auto step with
MindSpore's DryRun and print its compiled device memory next to ``train --plan``.

MindSpore's DryRun is switched on by the environment — ``MS_SIMULATION_LEVEL=1`` (compile, and
count memory, without executing), ``RANK_SIZE`` (the recipe's world size) and ``RANK_ID`` — read by
MindSpore when the runtime starts (``mindspore/parallel/cluster/process_entity/_api.py`` reads the
same variables for ``msrun --sim_level``), so the compilation runs in a child process started with
them.  It compiles for Ascend only: on a CPU device MindSpore refuses a simulated distributed job
(``mindspore/communication/management.py``: "Dryrun is not supported on CPU device for a
distributed job"), and the Ascend device needs the CANN runtime (``libge_runner.so``).  Without
CANN this command stops with one line (exit 2).  Written against MindSpore 2.10; not run here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mindyouzhi.errors import UserError

CANN_LIBRARY = "libge_runner.so"
_RESULT = "MINDYOUZHI_DRY_RUN "


def cann_available() -> bool:
    import ctypes

    try:
        ctypes.CDLL(CANN_LIBRARY)
    except OSError:
        return False
    return True


def dry_run(config_path: Path, rank: int) -> dict:
    from .config import load_recipe
    from .memory import gib, plan_recipe
    from .parallel_layout import recipe_layout

    recipe = load_recipe(config_path, check_paths=False)
    world = recipe_layout(recipe).world
    if not 0 <= rank < world:
        raise UserError(f"--dry-run {rank}: the recipe has {world} ranks (0 … {world - 1})")
    if not cann_available():
        raise UserError(f"--dry-run: needs the CANN runtime ({CANN_LIBRARY} not found; source CANN's set_env.sh): "
                        f"MindSpore's DryRun (MS_SIMULATION_LEVEL=1) compiles for Ascend only")
    recipe = load_recipe(config_path)  # the models must be there: the step is built from them
    plan = plan_recipe(recipe, "ascend")
    env = {**os.environ, "MS_SIMULATION_LEVEL": "1", "RANK_SIZE": str(world), "RANK_ID": str(rank)}
    env.pop("MS_ROLE", None)
    child = subprocess.run([sys.executable, "-m", "mindyouzhi.train.dry_run", str(config_path)], env=env,
                           capture_output=True, text=True)
    lines = [line for line in child.stdout.splitlines() if line.startswith(_RESULT)]
    if child.returncode != 0 or not lines:
        tail = (child.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"--dry-run: MindSpore's simulated compilation of rank {rank} failed: {tail}")
    compiled = json.loads(lines[-1][len(_RESULT):])["max_memory_allocated"]
    text = (f"{recipe.path}: rank {rank} of {world}, MindSpore DryRun (MS_SIMULATION_LEVEL=1): compiled peak "
            f"{gib(compiled)}; plan {gib(plan.total)}" + (f" of {gib(plan.limit)}" if plan.limit else ""))
    return {"recipe": str(config_path), "rank": rank, "world": world, "compiled_bytes": compiled,
            "plan_bytes": plan.total, "plan_rows": plan.rows, "text": text}


def _compile(config_path: str) -> None:
    """The child: build this rank's semi-auto step as the trainer does and compile it (no step runs)."""
    import mindspore as ms
    import numpy as np
    from mindspore.communication import init

    from mindyouzhi.convert_weights.safetensors_io import SafetensorsStore
    from mindyouzhi.models.config import ModelConfig
    from mindyouzhi.models.decoder import CausalLM, RopeTables
    from mindyouzhi.models.layers import causal_mask, to_tensor

    from .config import load_recipe
    from .optim import AdamW
    from .semi_auto import TEACHER_PREFIX, SemiAutoStep
    from .trainer import setup_device

    recipe = load_recipe(Path(config_path))
    setup_device({**recipe.context, "device_target": "Ascend"})
    init()
    config = ModelConfig.from_dir(recipe.student)
    net = CausalLM(config, SafetensorsStore(recipe.student), where=str(recipe.student))
    params = net.trainable_params()
    teacher = teacher_config = None
    if recipe.run_mode == "gkd":
        teacher_config = ModelConfig.from_dir(recipe.teacher)
        teacher = CausalLM(teacher_config, SafetensorsStore(recipe.teacher), where=str(recipe.teacher),
                           name_prefix=TEACHER_PREFIX)
    seq = recipe.train_dataset["seq_length"]
    tables = tuple(to_tensor(t) for t in RopeTables(config)(seq)) + (to_tensor(causal_mask(seq)),)
    step = SemiAutoStep(net, config, params, AdamW(params), recipe, tables, teacher, teacher_config)
    rows = recipe.runner_config["batch_size"] * recipe.runner_config["gradient_accumulation_steps"]
    zeros = np.zeros((rows, seq), np.int32)
    step.step.compile(to_tensor(zeros, ms.int32), to_tensor(zeros, ms.int32), to_tensor(zeros.astype(np.float32)))
    print(_RESULT + json.dumps({"max_memory_allocated": int(ms.runtime.max_memory_allocated())}), flush=True)


if __name__ == "__main__":
    _compile(sys.argv[1])
