"""Checkpoint tokenizer -> the artifact's tokenizer: a Hugging Face `tokenizers` JSON plus special ids."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_NAMES = ("llama-bpe", "llama3", "llama-v3")  # llama.cpp: also ignore_merges and add_bos by default
# llama.cpp's (llama-vocab.cpp) regexes per tokenizer.ggml.pre; each splits the pieces of the previous one.
# llama.cpp knows GPT-2's as "gpt-2"; any name it does not know ("gpt2" too) gets "default".
PRE_TOKENIZER_REGEXES: dict[str, list[str]] = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
    "gpt-2": [_GPT2],
    "smollm": [r"\p{N}", _GPT2],
    **dict.fromkeys(_LLAMA3_NAMES, [_LLAMA3]),
}
# Token names that end a turn (the ones of llama.cpp's end-of-generation list that Llama-family chats use).
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<|end|>",
    "<end_of_turn>",
)
# GGUF token types (llama.cpp): 2 unknown and 3 control are special, 4 user-defined is a plain added token.
_SPECIAL_TYPES, _USER_DEFINED = (2, 3), 4


@dataclass
class TokenizerBundle:
    tokenizer_json: str
    chat_template: str | None
    bos_token_id: int
    eos_token_id: int
    stop_token_ids: list[int]
    add_bos: bool
    bos_token: str
    eos_token: str


def compact_merges(tokenizer_json: str) -> str:
    """The BPE merges as "a b" strings instead of ["a", "b"] pairs, when no merged token has a space.

    Both forms load to the same tokenizer, but `tokenizers` buffers the pair form as a tree of small
    values while it parses: the coordinator's peak RSS at load is ~19 MB lower with the strings (49k
    merges, SmolLM2). Byte-level BPE spells a space as "Ġ", so the strings are unambiguous there.
    """
    data = json.loads(tokenizer_json)
    merges = data.get("model", {}).get("merges")
    if not merges or isinstance(merges[0], str) or any(" " in t for pair in merges for t in pair):
        return tokenizer_json
    data["model"]["merges"] = [" ".join(pair) for pair in merges]
    return json.dumps(data, ensure_ascii=False)


def _stop_ids(tok: Tokenizer, first: list[int]) -> list[int]:
    named = [tok.token_to_id(t) for t in END_OF_TURN_TOKENS]
    return list(dict.fromkeys([*first, *(i for i in named if i is not None)]))


def tokenizer_from_gguf(reader: gguf.GGUFReader) -> TokenizerBundle:
    """Byte-level BPE rebuilt from GGUF metadata; encodes like llama.cpp (parse_special=True)."""

    def field(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    model, pre = field("tokenizer.ggml.model"), field("tokenizer.ggml.pre", "default")
    if model != "gpt2" or pre not in PRE_TOKENIZER_REGEXES:
        raise ValueError(
            f"unsupported GGUF tokenizer: tokenizer.ggml.model={model!r}, tokenizer.ggml.pre={pre!r}; "
            f"supported: model 'gpt2' (byte-level BPE) with pre one of {sorted(PRE_TOKENIZER_REGEXES)}"
        )
    tokens: list[str] = field("tokenizer.ggml.tokens")
    types: list[int] = field("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges", [])]

    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre in _LLAMA3_NAMES))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), "isolated") for r in PRE_TOKENIZER_REGEXES[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k in _SPECIAL_TYPES
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == _USER_DEFINED
        ]
    )

    bos, eos = int(field("tokenizer.ggml.bos_token_id")), int(field("tokenizer.ggml.eos_token_id"))
    eot = [
        int(v)
        for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
        if (v := field(k)) is not None
    ]
    return TokenizerBundle(
        tokenizer_json=tok.to_str(),
        chat_template=field("tokenizer.chat_template"),
        bos_token_id=bos,
        eos_token_id=eos,
        stop_token_ids=_stop_ids(tok, [eos, *eot]),
        add_bos=bool(field("tokenizer.ggml.add_bos_token", pre in _LLAMA3_NAMES)),  # llama.cpp's defaults
        bos_token=tokens[bos],
        eos_token=tokens[eos],
    )


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _content(token: str | dict | None) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as a serialized AddedToken."""
    return token.get("content") if isinstance(token, dict) else token


def _ids(value: int | list[int] | None) -> list[int]:
    return [value] if isinstance(value, int) else list(value or [])


def tokenizer_from_hf_dir(path: str | Path) -> TokenizerBundle:
    """Hugging Face layout (Llama-3-8B-Instruct): tokenizer.json, tokenizer_config.json and, when present,
    generation_config.json."""
    path = Path(path)
    tokenizer_json = (path / "tokenizer.json").read_text(encoding="utf-8")
    tok = Tokenizer.from_str(tokenizer_json)
    config, gen = _read_json(path / "tokenizer_config.json"), _read_json(path / "generation_config.json")

    def token_id(name: str, gen_key: str) -> tuple[str, int]:
        text, ids = _content(config.get(name)), _ids(gen.get(gen_key))
        tid = tok.token_to_id(text) if text else (ids[0] if ids else None)
        if tid is None:
            raise ValueError(f"{path}: no tokenizer_config.json {name}, no generation_config.json {gen_key}")
        return tok.id_to_token(tid), tid

    bos_token, bos = token_id("bos_token", "bos_token_id")
    eos_token, eos = token_id("eos_token", "eos_token_id")
    add_bos = config.get("add_bos_token")
    if add_bos is None:  # Llama 3 adds BOS through the tokenizer.json post-processor
        add_bos = tok.encode("a", add_special_tokens=True).ids[:1] == [bos]
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return TokenizerBundle(
        tokenizer_json=tokenizer_json,
        chat_template=template,
        bos_token_id=bos,
        eos_token_id=eos,
        stop_token_ids=_stop_ids(tok, [eos, *_ids(gen.get("eos_token_id"))]),
        add_bos=bool(add_bos),
        bos_token=bos_token,
        eos_token=eos_token,
    )
