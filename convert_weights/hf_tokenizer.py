"""Hugging Face tokenizer files (``tokenizer.json`` + ``tokenizer_config.json`` +
``special_tokens_map.json``) for tokenizers that arrive in other formats.

Sentencepiece-style BPE (llama2.c's ``tok*.bin``, GGUF "llama" vocabularies) becomes a
``tokenizers`` BPE model the way transformers' ``LlamaConverter`` builds one from a sentencepiece
model: vocabulary with "▁" for spaces, ``<0xXX>`` byte fallback, merges ranked by the score of the
piece they produce, a normalizer adding the dummy-prefix "▁", and a decoder undoing all of it.
Greedy merging by score and BPE's merge ranks then pick the same merges, except where two
*different* pieces have the *same* score and compete for a shared token: llama2.c takes the
leftmost pair, BPE the lower rank.  Real vocabularies give every piece its own score (llama2.c's
export writes ``-rank``), so the two agree; the tests compare them on WikiText.

Known divergence, shared with every HF Llama tokenizer: the special tokens are matched in text,
so a document spelling ``<s>`` literally gets the BOS id where llama2.c spells it out.  And since
"▁" stands for a space, a literal U+2581 in the text is read as a space.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from mindyouzhi.errors import UserError
from mindyouzhi.tokenizer import (HF_TOKENIZER_FILE, LLAMA2C_TOKENIZER_FILE, TOKENIZER_CONFIG_FILE,
                                  Llama2cTokenizer, read_json_object)

SPIECE_SPACE = "\u2581"  # "▁"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
                      "additional_special_tokens")
# A llama2.c pair merges only when its result scores above run.c's initial best_score.
LLAMA2C_MIN_MERGE_SCORE = -1e10


def ranked_merges(pieces: Sequence[str], scores: Sequence[float], mergeable: Sequence[bool]) -> list[tuple[int, int]]:
    """Sentencepiece BPE as ranked merges ``(left id, right id)``: every split of a mergeable piece
    into two vocabulary pieces, the best (highest-scoring) result first; ties keep vocabulary order.
    The splits are searched in ``pieces``' own spelling (a repeated piece resolves to its last id)."""
    vocab = {piece: token_id for token_id, piece in enumerate(pieces)}
    ranked = []
    for token_id, piece in enumerate(pieces):
        if not mergeable[token_id]:
            continue
        for cut in range(1, len(piece)):
            left, right = vocab.get(piece[:cut]), vocab.get(piece[cut:])
            if left is not None and right is not None:
                ranked.append((-float(scores[token_id]), token_id, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def sentencepiece_bpe(pieces: Sequence[str], merges: Sequence[tuple[str, str]], unk_token: str | None,
                      add_space_prefix: bool):
    """A ``tokenizers.Tokenizer`` for a sentencepiece BPE vocabulary spelled with "▁"."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {piece: token_id for token_id, piece in enumerate(pieces)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), unk_token=unk_token, fuse_unk=True,
                                     byte_fallback=True))
    # A normalizer, not a Metaspace pre-tokenizer: sentencepiece (and llama.cpp, llama2.c) always
    # prepends the dummy "▁" — at the start and after every added token — even when the text
    # already starts with a space, which Metaspace skips.  No pre-tokenizer: sentencepiece merges
    # across "▁", the whole text is one word.
    replace_spaces = normalizers.Replace(" ", SPIECE_SPACE)
    tokenizer.normalizer = (
        normalizers.Sequence([normalizers.Prepend(SPIECE_SPACE), replace_spaces]) if add_space_prefix else replace_spaces
    )
    steps = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))  # drop the dummy prefix again
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def add_special_tokens_template(tokenizer, bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> None:
    """Make ``encode(add_special_tokens=True)`` — what transformers, vLLM and MindIE call — put BOS
    (and EOS) around the text as the model was trained; ``add_bos_token`` in tokenizer_config.json
    alone does not do it for a ``PreTrainedTokenizerFast``."""
    from tokenizers import processors

    if bos is None and eos is None:
        return
    prefix, suffix = (f"{bos[0]} " if bos else ""), (f" {eos[0]}" if eos else "")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{prefix}$A{suffix}",
        pair=f"{prefix}$A{suffix} {prefix}$B:1{suffix}",
        special_tokens=list(dict.fromkeys(token for token in (bos, eos) if token is not None)),  # BOS may be EOS
    )


def special_tokens_map(tokenizer_config: Mapping[str, Any]) -> dict:
    """``special_tokens_map.json`` as transformers writes it: the special tokens of the config."""
    return {key: tokenizer_config[key] for key in SPECIAL_TOKEN_KEYS if tokenizer_config.get(key) not in (None, [])}


def _json_text(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def llama2c_hf_files(tokenizer: Llama2cTokenizer, model_max_length: int | None) -> dict[str, str]:
    """The three HF tokenizer files reproducing ``tokenizer`` (llama2.c's encode and decode).

    Special tokens get their sentencepiece names (llama2.c's export wrote BOS/EOS as
    ``"\\n<s>\\n"``/``"\\n</s>\\n"``); every other piece is spelled with "▁" for its spaces.
    """
    special_ids = (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    pieces = [(piece.strip() or piece) if token_id in special_ids else piece.replace(" ", SPIECE_SPACE)
              for token_id, piece in enumerate(tokenizer.pieces)]
    for token_id, piece in enumerate(tokenizer.pieces):
        if SPIECE_SPACE in piece:
            raise UserError(f"{tokenizer.source}: token {token_id} {piece!r} contains '{SPIECE_SPACE}' (U+2581), which "
                            f"{HF_TOKENIZER_FILE} reserves for spaces")
    first_id: dict[str, int] = {}
    for token_id, piece in enumerate(pieces):
        if piece in first_id:
            raise UserError(f"{tokenizer.source}: tokens {first_id[piece]} and {token_id} are both spelled {piece!r} "
                            f"in {HF_TOKENIZER_FILE}; each id needs its own spelling")
        first_id[piece] = token_id

    # run.c may merge into any piece scoring above its threshold, byte pieces included; the splits
    # are searched in llama2.c's spelling so the renamed specials cannot create merges.
    mergeable = [token_id not in special_ids and score > LLAMA2C_MIN_MERGE_SCORE
                 for token_id, score in enumerate(tokenizer.scores)]
    merges = [(pieces[left], pieces[right]) for left, right in ranked_merges(tokenizer.pieces, tokenizer.scores, mergeable)]
    unk, bos, eos = (pieces[token_id] for token_id in special_ids)
    hf_tokenizer = sentencepiece_bpe(pieces, merges, unk, add_space_prefix=True)
    from tokenizers import AddedToken

    hf_tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in (unk, bos, eos)])
    add_special_tokens_template(hf_tokenizer, (bos, tokenizer.bos_token_id), None)
    config: dict[str, Any] = {
        # Not LlamaTokenizerFast: transformers 5 rebuilds a Llama tokenizer with a Metaspace
        # pre-tokenizer that skips the dummy prefix before a leading space, which run.c does not.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    return {
        HF_TOKENIZER_FILE: hf_tokenizer.to_str(pretty=False),
        TOKENIZER_CONFIG_FILE: _json_text(config),
        SPECIAL_TOKENS_MAP_FILE: _json_text(special_tokens_map(config)),
    }


def derived_tokenizer_files(model_dir: str | Path, model_max_length: int | None) -> dict[str, str]:
    """HF tokenizer files ``model_dir`` lacks but implies: all three from ``tokenizer_llama2c.json``
    (models imported before ``import --llama2c`` wrote them), ``special_tokens_map.json`` from
    ``tokenizer_config.json`` (transformers 5 no longer saves it; older engines read it)."""
    model_dir = Path(model_dir)
    if (model_dir / HF_TOKENIZER_FILE).is_file():
        config_path = model_dir / TOKENIZER_CONFIG_FILE
        if (model_dir / SPECIAL_TOKENS_MAP_FILE).is_file() or not config_path.is_file():
            return {}
        mapping = special_tokens_map(read_json_object(config_path))
        return {SPECIAL_TOKENS_MAP_FILE: _json_text(mapping)} if mapping else {}
    if (model_dir / LLAMA2C_TOKENIZER_FILE).is_file():
        return llama2c_hf_files(Llama2cTokenizer.from_file(model_dir / LLAMA2C_TOKENIZER_FILE), model_max_length)
    return {}
