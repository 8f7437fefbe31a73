"""The one tokenizer API of the product: ``load_tokenizer(model_dir)``.

Every command that turns text into ids (eval, calibration, training data, generate, serve) goes
through :class:`Tokenizer`, whatever format the model directory carries:

* ``tokenizer.json`` — a Hugging Face ``tokenizers`` file (any HF model directory, and every
  import: GGUF, and llama2.c, whose ``tokenizer.json`` reproduces run.c's ids — see
  ``convert_weights/hf_tokenizer.py``), with special tokens and the chat template in
  ``tokenizer_config.json`` (or ``chat_template.jinja``, where recent transformers versions save it);
* ``tokenizer_llama2c.json`` — the llama2.c tokenizer (``tok512.bin`` and friends) as written by
  ``mindyouzhi import --llama2c`` next to its ``tokenizer.json``; read only for directories
  imported before the import wrote a ``tokenizer.json``.  Its format, version 1::

      {
        "format": "mindyouzhi-llama2c-tokenizer", "version": 1,
        "vocab":  ["<unk>", "\\n<s>\\n", "\\n</s>\\n", "<0x00>", ..., " t", "he", ...],
        "scores": [0.0, 0.0, 0.0, 0.0, ..., -0.0, -1.0, ...],
        "max_token_length": 7,
        "bos_token_id": 1, "eos_token_id": 2, "unk_token_id": 0,
        "byte_fallback_offset": 3
      }

  ``vocab[i]`` is token ``i`` exactly as llama2.c stores it (UTF-8; spaces are real spaces, not
  sentencepiece's "▁").  ``scores[i]`` is its merge priority: higher merges first.  Byte ``b``
  that has no token of its own is encoded as id ``byte_fallback_offset + b``, and those ids are
  spelled ``<0xXX>`` (upper-case hex), as in llama2.c's ``run.c``.

Special tokens are never added implicitly: ``encode(text, add_bos=True)`` is the only way a BOS
appears, so perplexity windows and chat prompts control it explicitly.
"""
from __future__ import annotations

import heapq
import json
import re
from abc import ABC, abstractmethod
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .errors import UserError

HF_TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
MODEL_CONFIG_FILE = "config.json"
LLAMA2C_TOKENIZER_FILE = "tokenizer_llama2c.json"
LLAMA2C_FORMAT = "mindyouzhi-llama2c-tokenizer"
LLAMA2C_FORMAT_VERSION = 1

# llama2.c's run.c merges only pairs scoring above this (its initial ``best_score``).
_LLAMA2C_MIN_SCORE = -1e10
_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")


class Tokenizer(ABC):
    """Text ↔ ids for one model, plus its chat template.

    Attributes: ``bos_token_id`` / ``eos_token_id`` (int or None), ``vocab_size`` (ids are
    ``0..vocab_size-1``), ``add_bos_token`` (whether the model was trained with a BOS in front
    of every document — callers decide whether to pass ``add_bos=True``).
    """

    bos_token_id: int | None
    eos_token_id: int | None
    vocab_size: int
    add_bos_token: bool

    def __init__(self, source: Path, chat_template: str | None, chat_template_source: Path | None,
                 bos_token: str | None, eos_token: str | None):
        self.source = source
        self._chat_template = chat_template
        self._chat_template_source = chat_template_source
        self._bos_token = bos_token
        self._eos_token = eos_token
        self._compiled_template = None

    @abstractmethod
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``; BOS is prepended only when ``add_bos`` is true."""

    @abstractmethod
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; BOS/EOS (and other special tokens) are dropped unless asked for."""

    def _bos_prefix(self, add_bos: bool) -> list[int]:
        if not add_bos:
            return []
        if self.bos_token_id is None:
            raise UserError(f"{self.source}: the tokenizer has no BOS token, so add_bos cannot be honoured")
        return [self.bos_token_id]

    @property
    def has_chat_template(self) -> bool:
        return self._chat_template is not None

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` (``[{"role": ..., "content": ...}, ...]``) with the model's template.

        Rendered the way transformers does (a sandboxed jinja2 environment with ``trim_blocks``,
        ``lstrip_blocks``, ``loopcontrols``, ``raise_exception`` and ``strftime_now``), so a
        template written for transformers produces the same prompt here.
        """
        if self._chat_template is None:
            raise UserError(
                f"{self.source.parent}: the model has no chat template "
                f"(expected 'chat_template' in {TOKENIZER_CONFIG_FILE} or a {CHAT_TEMPLATE_FILE} file)"
            )
        import jinja2

        if self._compiled_template is None:
            self._compiled_template = _compile_chat_template(self._chat_template, self._chat_template_source)
        try:
            return self._compiled_template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos_token or "",
                eos_token=self._eos_token or "",
            )
        except jinja2.TemplateError as exc:
            raise UserError(f"{self._chat_template_source}: chat template failed: {exc}") from None


def _compile_chat_template(template: str, source: Path | None):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers overrides jinja's tojson: no HTML escaping, non-ASCII kept as is.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as exc:
        raise UserError(f"{source}: invalid chat template: {exc}") from None


# --------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json
# --------------------------------------------------------------------------------------------


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` with the special tokens of ``tokenizer_config.json``."""

    def __init__(self, model_dir: Path):
        import tokenizers

        path = model_dir / HF_TOKENIZER_FILE
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a bare Exception for any parse error
            raise UserError(f"{path}: invalid {HF_TOKENIZER_FILE} ({exc})") from None

        config_path = model_dir / TOKENIZER_CONFIG_FILE
        config = read_json_object(config_path) if config_path.is_file() else {}
        model_config_path = model_dir / MODEL_CONFIG_FILE
        model_config = read_json_object(model_config_path) if model_config_path.is_file() else {}

        bos_token = _token_content(config.get("bos_token"), config_path, "bos_token")
        eos_token = _token_content(config.get("eos_token"), config_path, "eos_token")
        # config.json's ids only stand in when tokenizer_config.json does not mention the token at
        # all; an explicit null (Qwen2.5's bos_token) means the tokenizer has none.
        self.bos_token_id = self._special_id(
            bos_token, config_path, "bos_token", None if "bos_token" in config else model_config.get("bos_token_id")
        )
        self.eos_token_id = self._special_id(
            eos_token, config_path, "eos_token", None if "eos_token" in config else model_config.get("eos_token_id")
        )
        if bos_token is None and self.bos_token_id is not None:
            bos_token = self._tokenizer.id_to_token(self.bos_token_id)
        if eos_token is None and self.eos_token_id is not None:
            eos_token = self._tokenizer.id_to_token(self.eos_token_id)
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        add_bos_token = config.get("add_bos_token")
        if add_bos_token is None:
            # No flag (Llama 3 style): the tokenizer.json post-processor says whether the
            # model's own pipeline puts a BOS first.
            probe = self._tokenizer.encode("a", add_special_tokens=True).ids
            add_bos_token = self.bos_token_id is not None and probe[:1] == [self.bos_token_id]
        self.add_bos_token = bool(add_bos_token)

        template, template_source = _chat_template(config.get("chat_template"), config_path, model_dir)
        super().__init__(path, template, template_source, bos_token, eos_token)

    def _special_id(self, content: str | None, config_path: Path, key: str, fallback) -> int | None:
        if content is not None:
            token_id = self._tokenizer.token_to_id(content)
            if token_id is None:
                raise UserError(f"{config_path}: {key} {content!r} is not in the vocabulary of {HF_TOKENIZER_FILE}")
            return token_id
        # config.json may list several EOS ids (Llama 3.1): the first is the canonical one.
        if isinstance(fallback, list):
            fallback = fallback[0] if fallback else None
        return int(fallback) if isinstance(fallback, int) else None

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return self._bos_prefix(add_bos) + self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def read_json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def _token_content(value, path: Path, key: str) -> str | None:
    """``"<s>"`` or transformers' serialized AddedToken ``{"content": "<s>", ...}``."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise UserError(f"{path}: {key} must be a string or an object with 'content', found {value!r}")


def _chat_template(value, config_path: Path, model_dir: Path) -> tuple[str | None, Path | None]:
    if isinstance(value, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {entry.get("name"): entry.get("template") for entry in value if isinstance(entry, dict)}
        value = named.get("default")
    if isinstance(value, str):
        return value, config_path
    if value is not None:
        raise UserError(f"{config_path}: chat_template must be a string or a list of named templates")
    jinja_path = model_dir / CHAT_TEMPLATE_FILE
    if jinja_path.is_file():
        return jinja_path.read_text(encoding="utf-8"), jinja_path
    return None, None


# --------------------------------------------------------------------------------------------
# llama2.c tokenizer
# --------------------------------------------------------------------------------------------


class Llama2cTokenizer(Tokenizer):
    """A faithful port of ``encode``/``decode`` in llama2.c's ``run.c``.

    ``encode`` prepends the dummy-prefix token ``" "``, maps each code point to its token (or its
    UTF-8 bytes to the byte-fallback ids), then repeatedly merges the adjacent pair whose
    concatenation is a token with the highest score, leftmost on ties.  run.c rescans the whole
    sequence per merge (quadratic); here a heap over the live pairs gives the same merges in the
    same order in O(n log n), so a whole evaluation corpus tokenizes in seconds.
    """

    def __init__(self, path: Path, data: Mapping[str, Any]):
        vocab, scores = _validated_llama2c(path, data)
        self._vocab = vocab
        self._scores = scores
        # llama2.c looks pieces up by bisection in a sorted copy; for a (malformed) duplicated
        # piece we pick the first id, deterministically.
        self._piece_to_id: dict[str, int] = {}
        for token_id, piece in enumerate(vocab):
            self._piece_to_id.setdefault(piece, token_id)
        self._byte_offset = int(data["byte_fallback_offset"])
        self.bos_token_id = int(data["bos_token_id"])
        self.eos_token_id = int(data["eos_token_id"])
        self.unk_token_id = int(data["unk_token_id"])
        self.vocab_size = len(vocab)
        self.add_bos_token = True  # llama2.c models are trained with BOS before every story
        self._dummy_prefix_id = self._piece_to_id.get(" ")
        if self._dummy_prefix_id is None:
            raise UserError(f"{path}: the vocabulary has no ' ' token, which llama2.c's encode needs as dummy prefix")
        # What decode emits for each id: byte tokens stand for their raw byte.
        self._piece_bytes = [
            bytes([int(match.group(1), 16)]) if (match := _BYTE_PIECE.fullmatch(piece)) else piece.encode("utf-8")
            for piece in vocab
        ]
        super().__init__(path, None, None, vocab[self.bos_token_id], vocab[self.eos_token_id])

    @property
    def pieces(self) -> list[str]:
        """Token ``i`` exactly as llama2.c spells it."""
        return list(self._vocab)

    @property
    def scores(self) -> list[float]:
        return list(self._scores)

    @classmethod
    def from_file(cls, path: Path) -> "Llama2cTokenizer":
        return cls(path, read_json_object(path))

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self._bos_prefix(add_bos)
        if text:
            ids.append(self._dummy_prefix_id)
        for char in text:
            token_id = self._piece_to_id.get(char)
            if token_id is not None:
                ids.append(token_id)
            else:
                ids.extend(self._byte_offset + byte for byte in char.encode("utf-8", "surrogatepass"))
        return self._merge(ids)

    def _merge_candidate(self, left: int, right: int) -> int | None:
        merged = self._piece_to_id.get(self._vocab[left] + self._vocab[right])
        if merged is None or self._scores[merged] <= _LLAMA2C_MIN_SCORE:
            return None
        return merged

    def _merge(self, ids: list[int]) -> list[int]:
        count = len(ids)
        if count < 2:
            return ids
        tokens = list(ids)
        next_pos = list(range(1, count)) + [-1]
        prev_pos = [-1] + list(range(count - 1))
        alive = [True] * count

        # Heap entries (-score, position, left id, right id, merged id).  Positions keep their
        # original order in the linked list, so the smallest position among equal scores is the
        # leftmost pair — run.c's tie rule (it keeps the first strictly better pair).
        def candidate(pos: int) -> tuple[float, int, int, int, int] | None:
            nxt = next_pos[pos]
            if nxt == -1:
                return None
            merged = self._merge_candidate(tokens[pos], tokens[nxt])
            return None if merged is None else (-self._scores[merged], pos, tokens[pos], tokens[nxt], merged)

        heap = [entry for pos in range(count - 1) if (entry := candidate(pos)) is not None]
        heapq.heapify(heap)
        while heap:
            _, pos, left, right, merged = heapq.heappop(heap)
            nxt = next_pos[pos]
            # An entry is stale once either side has been merged into something else.
            if not alive[pos] or nxt == -1 or tokens[pos] != left or tokens[nxt] != right:
                continue
            tokens[pos] = merged
            alive[nxt] = False
            after = next_pos[nxt]
            next_pos[pos] = after
            if after != -1:
                prev_pos[after] = pos
            for touched in (prev_pos[pos], pos):
                if touched != -1 and (entry := candidate(touched)) is not None:
                    heapq.heappush(heap, entry)
        return [token for token, keep in zip(tokens, alive) if keep]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        out = bytearray()
        previous: int | None = None
        for token_id in ids:
            token_id = int(token_id)
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
            special = token_id in (self.bos_token_id, self.eos_token_id)
            if not (special and skip_special_tokens):
                piece = self._piece_bytes[token_id]
                # run.c strips the dummy-prefix space of the piece after BOS; a sequence without
                # BOS starts the same way (encode put the dummy prefix there), so strip it too
                # and decode(encode(text)) == text with or without add_bos.
                if previous in (None, self.bos_token_id) and piece.startswith(b" "):
                    piece = piece[1:]
                out += piece
            previous = token_id
        return out.decode("utf-8", errors="replace")


def _validated_llama2c(path: Path, data: Mapping[str, Any]) -> tuple[list[str], list[float]]:
    if data.get("format") != LLAMA2C_FORMAT:
        raise UserError(f"{path}: not a llama2.c tokenizer file (expected \"format\": \"{LLAMA2C_FORMAT}\")")
    if data.get("version") != LLAMA2C_FORMAT_VERSION:
        raise UserError(f"{path}: unsupported version {data.get('version')!r} (this build reads version {LLAMA2C_FORMAT_VERSION})")
    vocab, scores = data.get("vocab"), data.get("scores")
    if not isinstance(vocab, list) or not all(isinstance(piece, str) for piece in vocab) or not vocab:
        raise UserError(f"{path}: 'vocab' must be a non-empty list of strings")
    if not isinstance(scores, list) or len(scores) != len(vocab) or not all(
        isinstance(score, (int, float)) and not isinstance(score, bool) for score in scores
    ):
        raise UserError(f"{path}: 'scores' must be a list of {len(vocab)} numbers, one per vocab entry")
    for key in ("bos_token_id", "eos_token_id", "unk_token_id", "byte_fallback_offset"):
        value = data.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < len(vocab):
            raise UserError(f"{path}: '{key}' must be a token id in 0..{len(vocab) - 1}, found {value!r}")
    offset = data["byte_fallback_offset"]
    if offset + 256 > len(vocab):
        raise UserError(f"{path}: byte_fallback_offset {offset} leaves no room for 256 byte tokens in {len(vocab)} entries")
    for byte in range(256):
        if vocab[offset + byte] != f"<0x{byte:02X}>":
            raise UserError(
                f"{path}: token {offset + byte} is {vocab[offset + byte]!r}, expected byte token '<0x{byte:02X}>'"
            )
    return vocab, [float(score) for score in scores]


# --------------------------------------------------------------------------------------------


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The tokenizer of a model directory (``tokenizer.json`` first, then the llama2.c JSON)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: model directory not found")
    if (model_dir / HF_TOKENIZER_FILE).is_file():
        return HFTokenizer(model_dir)
    if (model_dir / LLAMA2C_TOKENIZER_FILE).is_file():
        return Llama2cTokenizer.from_file(model_dir / LLAMA2C_TOKENIZER_FILE)
    raise UserError(
        f"{model_dir}: no tokenizer found; expected {HF_TOKENIZER_FILE} (Hugging Face) "
        f"or {LLAMA2C_TOKENIZER_FILE} (written by 'mindyouzhi import --llama2c')"
    )
