"""Teacher annotation: a model answers the prompts of SFT records (off-policy GKD data).

YouZhi's GKD stage trains the converted student on sequences the *original* model wrote: every SFT
record's conversation up to its last assistant turn is the prompt, the teacher's greedy answer
replaces that turn.  The student then matches the teacher's token distributions on text the
teacher itself produces (forward KL, off-policy), which is what the conversion perturbed.

Generation runs batched through the paged engine (``eval.lm.generate_texts``).  The job is
resumable: answers are appended to ``.OUT.partial`` in chunks, with the run's fingerprint (model
weights, input file, generation settings) in its first line; a re-run with the same fingerprint
continues after the last complete chunk, any other partial file is discarded.  ``--out`` appears
only when every record is annotated.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional

from ..errors import UserError
from ..io_utils import sha256_file, write_text_atomic

CHUNK = 64


def prompts_and_records(path: Path) -> list[tuple[list[dict], dict]]:
    """(prompt messages, source record) per SFT record; the last assistant turn is what gets replaced."""
    from mindyouzhi.train.sft import conversation, read_records

    out = []
    for where, record in read_records(Path(path)):
        messages = conversation(record, where)
        prompt = messages[:-1]
        if not any(message["role"] == "user" for message in prompt):
            raise UserError(f"{where}: a record needs a user turn before its last assistant turn to be annotated")
        out.append((prompt, record))
    if not out:
        raise UserError(f"{path}: no SFT records to annotate")
    return out


def _fingerprint(model_dir: Path, input_path: Path, max_new_tokens: int, precision: str) -> str:
    digest = hashlib.sha256()
    for weights in sorted(Path(model_dir).glob("*.safetensors")):
        digest.update(weights.name.encode())
        digest.update(sha256_file(weights).encode())
    digest.update(sha256_file(input_path).encode())
    digest.update(f"greedy:{max_new_tokens}:{precision}".encode())
    return digest.hexdigest()


def _resume(partial: Path, fingerprint: str) -> list[str]:
    """The complete answer lines of an earlier run with the same fingerprint (else none)."""
    if not partial.is_file():
        return []
    lines = partial.read_text(encoding="utf-8").splitlines()
    try:
        header = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        header = {}
    if header.get("fingerprint") != fingerprint:
        return []
    done = []
    for line in lines[1:]:
        try:
            json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything from it on is generated again
        done.append(line)
    return done


def annotate(model_dir: Path, input_path: Path, out: Path, max_new_tokens: int = 256, batch_size: int = 8,
             limit: Optional[int] = None, progress: Optional[Callable[[int], None]] = None,
             loader: Optional[Callable[..., object]] = None, precision: str = "fp32") -> dict:
    """Write ``out`` (JSONL of ``{"messages": [...], "source_index": i}``) with the teacher's answers."""
    from mindyouzhi.eval.lm import generate_texts, load_language_model

    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    items = prompts_and_records(input_path)[:limit]
    out = Path(out)
    partial = out.with_name(f".{out.name}.partial")
    fingerprint = _fingerprint(model_dir, input_path, max_new_tokens, precision)
    done = _resume(partial, fingerprint)
    resumed = len(done)
    lm = (loader or load_language_model)(model_dir, precision=precision)
    with open(partial, "w", encoding="utf-8") as handle:
        handle.write(json.dumps({"fingerprint": fingerprint}) + "\n")
        for line in done:
            handle.write(line + "\n")
        handle.flush()
        new_tokens = 0
        for start in range(resumed, len(items), CHUNK):
            chunk = items[start:start + CHUNK]
            texts = [lm.tokenizer.apply_chat_template(prompt, add_generation_prompt=True) for prompt, _ in chunk]
            generations = generate_texts(lm, texts, max_new_tokens, [()] * len(texts), batch_size=batch_size)
            for offset, ((prompt, _), generation) in enumerate(zip(chunk, generations)):
                new_tokens += generation.new_tokens
                record = {"messages": prompt + [{"role": "assistant", "content": generation.text.strip()}],
                          "source_index": start + offset}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
            if progress:
                progress(len(chunk))
    lines = partial.read_text(encoding="utf-8").splitlines()[1:]
    write_text_atomic(out, "\n".join(lines) + "\n")
    partial.unlink()
    return {"records": len(items), "resumed": resumed, "generated": len(items) - resumed,
            "new_tokens": new_tokens, "out": str(out), "max_new_tokens": max_new_tokens}
