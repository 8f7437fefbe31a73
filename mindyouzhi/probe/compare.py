"""``probe compare``: dump teacher and student with msprobe, run ``msprobe compare``, summarise per layer.

The teacher (e.g. the original GQA model) is the *golden* side (``-gp``), the student (the
converted or trained model) the *target* (``-tp``).  Two comparisons:

* ``chained`` — each model on its own hidden states: what the user sees at the output; a
  layer's figure includes every earlier layer's error;
* ``isolated`` — every student layer reads the teacher's input of that layer: the error each
  layer adds by itself, i.e. *which* layer a conversion or a training step broke.

For every decoder layer: cosine similarity, max absolute error and relative error
(‖student − teacher‖ / ‖teacher‖) of the attention output and of the layer output, read from
msprobe's comparison CSV (``Cosine``, ``MaxAbsErr``, ``EucDist``, ``Bench l2norm``).
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from mindyouzhi.errors import UserError

MODES = ("chained", "isolated")
_ROW = re.compile(r"^Cell\.model\.layers\.(\d+)\.(self_attn\.Attention|DecoderLayer)\.forward\.0\.output\.0$")


def require_msprobe() -> None:
    """mindstudio-probe (import name ``msprobe``) must be installed — and not PyPI's unrelated ``msprobe``."""
    spec = importlib.util.find_spec("msprobe")
    if spec is None or importlib.util.find_spec("msprobe.mindspore") is None:
        raise UserError("probe compare needs the package mindstudio-probe (import name msprobe): "
                        "pip install 'mindyouzhi[probe]' or pip install mindstudio-probe==26.2.0 \"numpy<2\" "
                        "(the PyPI package named 'msprobe' is an unrelated tool)")


def _msprobe_command() -> list[str]:
    script = Path(sys.executable).parent / "msprobe"
    if script.is_file():
        return [str(script)]
    found = shutil.which("msprobe")
    return [found] if found else [sys.executable, "-m", "msprobe.msprobe"]


def _start(command: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, GLOG_v=os.environ.get("GLOG_v", "3"))
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    with open(log, "w") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)


def _wait(process: subprocess.Popen, log: Path, what: str) -> None:
    if process.wait() != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"{what} failed (exit {process.returncode}); see {log}:\n" + "\n".join(tail))


def _run(command: list[str], log: Path, what: str) -> None:
    _wait(_start(command, log), log, what)


def probe_ids(tokenizer, data: Path, seq_len: int, samples: int) -> np.ndarray:
    from mindyouzhi.eval.ppl import token_stream, windows

    return windows(token_stream(tokenizer, data), seq_len, samples, data).astype(np.int32)


def _step_dir(dump_dir: Path, step: int) -> Path:
    path = dump_dir / f"step{step}"
    if not path.is_dir():
        raise RuntimeError(f"msprobe wrote no {path}")
    return path


def read_compare_csv(path: Path) -> dict[tuple[int, str], dict]:
    """(layer, "attention"|"layer") → cosine / max_abs_err / rel_err from one msprobe CSV."""
    out = {}
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            match = _ROW.match(row.get("NPU Name", ""))
            if not match:
                continue
            kind = "attention" if match.group(2).startswith("self_attn") else "layer"
            norm = _number(row.get("Bench l2norm"))
            dist = _number(row.get("EucDist"))
            out[(int(match.group(1)), kind)] = {
                "cosine": _number(row.get("Cosine")), "max_abs_err": _number(row.get("MaxAbsErr")),
                "rel_err": dist / norm if dist is not None and norm else None}
    return out


def _number(value) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def compare_models(teacher: Path, student: Path, data: Path, out: Path, seq_len: int = 128, samples: int = 1,
                   keep_dumps: bool = False) -> dict:
    from mindyouzhi.models.config import ModelConfig
    from mindyouzhi.tokenizer import load_tokenizer

    require_msprobe()
    teacher_config, student_config = ModelConfig.from_dir(teacher), ModelConfig.from_dir(student)
    if teacher_config.num_hidden_layers != student_config.num_hidden_layers:
        raise UserError(f"--teacher has {teacher_config.num_hidden_layers} layers, --student "
                        f"{student_config.num_hidden_layers}: a layer-by-layer comparison needs the same depth")
    if teacher_config.hidden_size != student_config.hidden_size:
        raise UserError(f"--teacher hidden_size {teacher_config.hidden_size} differs from --student "
                        f"{student_config.hidden_size}")
    ids = probe_ids(load_tokenizer(student), data, seq_len, samples)
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "ids.npy", ids)
    inputs_file = out / "teacher_layer_inputs.npz"
    dumps = {"teacher": out / "dump_teacher", "student": out / "dump_student"}
    for path in dumps.values():
        shutil.rmtree(path, ignore_errors=True)
    dump = [sys.executable, "-m", "mindyouzhi.probe.dump", "--ids", str(out / "ids.npy")]
    _run(dump + ["--model", str(teacher), "--dump-dir", str(dumps["teacher"]), "--save-layer-inputs",
                 str(inputs_file), "--layer-inputs", str(inputs_file)], out / "dump_teacher.log", "teacher dump")
    _run(dump + ["--model", str(student), "--dump-dir", str(dumps["student"]), "--layer-inputs", str(inputs_file)],
         out / "dump_student.log", "student dump")

    csvs = {}
    tables = {}
    running = {}
    for step, mode in enumerate(MODES):  # both comparisons at once: msprobe's start-up dominates
        target = out / f"compare_{mode}"
        shutil.rmtree(target, ignore_errors=True)
        running[mode] = _start(_msprobe_command() + ["compare", "-tp", str(_step_dir(dumps["student"], step)), "-gp",
                                                     str(_step_dir(dumps["teacher"], step)), "-o", str(target)],
                               out / f"compare_{mode}.log")
    for mode, process in running.items():
        _wait(process, out / f"compare_{mode}.log", f"msprobe compare ({mode})")
    for mode in MODES:
        target = out / f"compare_{mode}"
        found = sorted(target.glob("compare_result*.csv")) + sorted(target.glob("compare_result*.xlsx"))
        if not found:
            raise RuntimeError(f"msprobe compare wrote no result in {target}")
        csvs[mode] = str(found[0])
        tables[mode] = read_compare_csv(found[0])

    layers = []
    for index in range(student_config.num_hidden_layers):
        entry = {"layer": index, "type": "mla" if student_config.is_mla(index) else "gqa"}
        for mode in MODES:
            for kind in ("attention", "layer"):
                entry[f"{mode}_{kind}"] = tables[mode].get((index, kind))
        layers.append(entry)
    isolated = [(l["isolated_attention"] or {}).get("cosine") for l in layers]
    valid = [(c, l["layer"]) for c, l in zip(isolated, layers) if c is not None]
    report = {
        "teacher": str(teacher), "student": str(student), "data": str(data), "tokens": int(ids.size),
        "seq_len": seq_len, "samples": int(ids.shape[0]), "layers": layers,
        "worst_layer_isolated_attention": min(valid)[1] if valid else None,
        "compare_csv": csvs, "output_dir": str(out), "seconds": round(time.perf_counter() - started, 1),
    }
    if not keep_dumps:
        for path in dumps.values():
            shutil.rmtree(path, ignore_errors=True)
        inputs_file.unlink(missing_ok=True)
    (out / "probe_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_report(report: dict) -> str:
    def cell(value, key):
        if not value or value.get(key) is None:
            return "     n/a"
        return f"{value[key]:8.5f}" if key == "cosine" else f"{value[key]:8.2e}"

    lines = [f"msprobe: student {report['student']} vs teacher {report['teacher']} on {report['tokens']} tokens",
             "layer type | isolated attn: cosine  max|err|   rel err | chained attn: cosine   rel err "
             "| chained layer: cosine"]
    for entry in report["layers"]:
        iso, chain, layer = entry["isolated_attention"], entry["chained_attention"], entry["chained_layer"]
        lines.append(f"{entry['layer']:5d} {entry['type']:>4} |              {cell(iso, 'cosine')} {cell(iso, 'max_abs_err')}"
                     f"  {cell(iso, 'rel_err')} |           {cell(chain, 'cosine')}  {cell(chain, 'rel_err')} "
                     f"|            {cell(layer, 'cosine')}")
    if report["worst_layer_isolated_attention"] is not None:
        lines.append(f"lowest isolated attention cosine: layer {report['worst_layer_isolated_attention']}")
    lines.append(f"msprobe CSVs: {', '.join(report['compare_csv'].values())}")
    return "\n".join(lines)
