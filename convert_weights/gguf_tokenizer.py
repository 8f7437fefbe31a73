"""Rebuild a Hugging Face ``tokenizer.json`` + ``tokenizer_config.json`` from GGUF metadata.

A GGUF carries the tokenizer as llama.cpp sees it: ``tokenizer.ggml.model`` (the algorithm),
``tokenizer.ggml.pre`` (how text is split before BPE), the tokens, their types and scores, the
merges and the special-token ids.  We rebuild the equivalent ``tokenizers`` pipeline:

* ``gpt2``  — byte-level BPE; the pre-tokenizer is looked up in :data:`PRE_TOKENIZERS` by
  ``tokenizer.ggml.pre`` and reproduces llama.cpp's split regexes for that name;
* ``llama`` — sentencepiece-style BPE: "▁" for spaces, a dummy-prefix "▁" when
  ``tokenizer.ggml.add_space_prefix`` (default true), ``<0xXX>`` byte fallback, merges from the
  file or, when it has none, derived from the token scores (sentencepiece merges the pair whose
  result scores highest).

Tokens typed CONTROL become special added tokens (matched whole in text, dropped by
``decode(skip_special_tokens=True)``), USER_DEFINED ones plain added tokens, as in llama.cpp.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, Sequence

from mindyouzhi.errors import UserError

from .hf_tokenizer import add_special_tokens_template, ranked_merges, sentencepiece_bpe

# llama.cpp's token types (llama_token_type in llama.h / gguf.TokenType).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Llama 3's regex (digits in groups of up to three), as in its tokenizer.json.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's regex: Llama 3's with single digits.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_pre():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_pre():
    # llama.cpp splits on "\p{N}" first, then applies the GPT-2 regex to the pieces; the original
    # tokenizer.json of these models says the same with Digits(individual_digits) + ByteLevel.
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )


def _regex_pre(pattern: str) -> Callable[[], Any]:
    def build():
        from tokenizers import Regex, pre_tokenizers

        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    return build


# ``tokenizer.ggml.pre`` -> the pre-tokenizer reproducing llama.cpp's split for that name
# (llama-vocab.cpp, ``regex_exprs`` per LLAMA_VOCAB_PRE_TYPE_*).
PRE_TOKENIZERS: dict[str, Callable[[], Any]] = {
    "gpt-2": _gpt2_pre,
    "gpt2": _gpt2_pre,
    "smollm": _digits_then_gpt2_pre,
    "starcoder": _digits_then_gpt2_pre,
    "refact": _digits_then_gpt2_pre,
    "command-r": _digits_then_gpt2_pre,
    "codeshell": _digits_then_gpt2_pre,
    "exaone": _digits_then_gpt2_pre,
    "llama3": _regex_pre(_LLAMA3_SPLIT),
    "llama-v3": _regex_pre(_LLAMA3_SPLIT),
    "llama-bpe": _regex_pre(_LLAMA3_SPLIT),
    "falcon3": _regex_pre(_LLAMA3_SPLIT),
    "smaug-bpe": _regex_pre(_LLAMA3_SPLIT),
    "dbrx": _regex_pre(_LLAMA3_SPLIT),
    "qwen2": _regex_pre(_QWEN2_SPLIT),
    "deepseek-r1-qwen": _regex_pre(_QWEN2_SPLIT),
}

SUPPORTED_TOKENIZER_MODELS = ("gpt2", "llama")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level vocabularies are spelled in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def build_tokenizer_files(metadata: Mapping[str, Any], source: str | os.PathLike, model_max_length: int | None = None) -> dict[str, str]:
    """``{"tokenizer.json": ..., "tokenizer_config.json": ...}`` for a GGUF's ``tokenizer.*`` keys."""
    model = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if model is None or not tokens:
        raise UserError(f"{source}: the GGUF has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
    if model not in SUPPORTED_TOKENIZER_MODELS:
        raise UserError(
            f"{source}: unsupported tokenizer.ggml.model {model!r}; supported: {', '.join(SUPPORTED_TOKENIZER_MODELS)}"
        )
    tokens = list(tokens)
    token_types = list(metadata.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
    if len(token_types) != len(tokens):
        raise UserError(f"{source}: tokenizer.ggml.token_type has {len(token_types)} entries for {len(tokens)} tokens")
    merges = _parse_merges(metadata.get("tokenizer.ggml.merges"), source)

    if model == "gpt2":
        pre = metadata.get("tokenizer.ggml.pre", "gpt-2")
        if pre not in PRE_TOKENIZERS:
            raise UserError(
                f"{source}: unsupported tokenizer.ggml.pre {pre!r} for a byte-level BPE tokenizer; "
                f"supported: {', '.join(sorted(PRE_TOKENIZERS))}"
            )
        if merges is None:
            raise UserError(f"{source}: byte-level BPE tokenizer without tokenizer.ggml.merges")
        tokenizer = _byte_level_tokenizer(tokens, token_types, merges, PRE_TOKENIZERS[pre]())
        add_bos_default = False
    else:
        scores = metadata.get("tokenizer.ggml.scores")
        if merges is None and (scores is None or len(scores) != len(tokens)):
            raise UserError(f"{source}: sentencepiece tokenizer needs tokenizer.ggml.merges or one score per token")
        unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
        add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        tokenizer = _sentencepiece_tokenizer(tokens, token_types, scores, merges, unk_id, add_space_prefix)
        add_bos_default = True  # llama.cpp adds BOS for a sentencepiece vocab that does not say otherwise

    # Added tokens must reuse their id from the file; a new id would index past the embedding.
    if tokenizer.get_vocab_size(with_added_tokens=True) > len(tokens):
        raise UserError(f"{source}: rebuilt tokenizer has more ids than the {len(tokens)} tokens of the file")

    def special(key: str) -> str | None:
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if token_id is None:
            return None
        if not 0 <= int(token_id) < len(tokens):
            raise UserError(f"{source}: tokenizer.ggml.{key} {token_id} is outside the vocabulary of {len(tokens)}")
        return tokens[int(token_id)]

    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    bos, eos = special("bos_token_id"), special("eos_token_id")
    add_special_tokens_template(tokenizer, (bos, tokenizer.token_to_id(bos)) if add_bos and bos else None,
                                (eos, tokenizer.token_to_id(eos)) if add_eos and eos else None)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": special("unknown_token_id"),
        "pad_token": special("padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
    }
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    chat_template = metadata.get("tokenizer.chat_template")
    if chat_template is not None:
        config["chat_template"] = chat_template
    return {
        "tokenizer.json": tokenizer.to_str(pretty=False),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
    }


def _parse_merges(merges: Sequence[str] | None, source) -> list[tuple[str, str]] | None:
    if merges is None:
        return None
    pairs = []
    for index, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2 or not all(parts):
            raise UserError(f"{source}: tokenizer.ggml.merges[{index}] = {merge!r} is not two tokens separated by one space")
        pairs.append((parts[0], parts[1]))
    return pairs


def _add_typed_tokens(tokenizer, tokens: Sequence[str], token_types: Sequence[int]) -> None:
    from tokenizers import AddedToken

    control = [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, token_types) if kind == TOKEN_CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, token_types) if kind == TOKEN_USER_DEFINED]
    if control:
        tokenizer.add_special_tokens(control)
    if user:
        tokenizer.add_tokens(user)


def _byte_level_tokenizer(tokens: Sequence[str], token_types: Sequence[int], merges, pre_tokenizer):
    from tokenizers import Tokenizer, decoders, models

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for token_id, token in enumerate(tokens):
        if token_types[token_id] not in (TOKEN_CONTROL, TOKEN_USER_DEFINED) and not set(token) <= alphabet:
            # Some converters store a token's raw text instead of its byte-level spelling.
            token = "".join(spelling[byte] for byte in token.encode("utf-8"))
        vocab[token] = token_id  # a repeated spelling maps to its last id, as in llama.cpp's token_to_id
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    _add_typed_tokens(tokenizer, tokens, token_types)
    return tokenizer


def _sentencepiece_tokenizer(tokens, token_types, scores, merges, unk_id, add_space_prefix: bool):
    if merges is None:
        # control/byte/user-defined pieces are never merge results
        ranked = ranked_merges(tokens, scores, [kind == TOKEN_NORMAL for kind in token_types])
        merges = [(tokens[left], tokens[right]) for left, right in ranked]
    unk_token = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    tokenizer = sentencepiece_bpe(tokens, merges, unk_token, add_space_prefix)
    _add_typed_tokens(tokenizer, tokens, token_types)
    return tokenizer
