"""Text handling of the coordinator: chat template, token codec, streaming detokenizer, stop strings."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A chat template rendered the way transformers' apply_chat_template does."""

    def __init__(self, template: str, bos_token: str = "", eos_token: str = ""):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        try:
            self._template = env.from_string(template)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template does not compile: {e}") from e
        self._tokens = {"bos_token": bos_token, "eos_token": eos_token}

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Extra keyword arguments (tools, date_string, ...) are passed to the template."""
        context = {**self._tokens, **kwargs, "messages": messages,
                   "add_generation_prompt": add_generation_prompt}
        try:
            return self._template.render(context)
        except Exception as e:  # the template is data: whatever it raises is a bad template or bad messages
            raise ValueError(f"chat template failed to render these messages: {type(e).__name__}: {e}") from e


class TextCodec:
    """Token ids <-> text with the artifact's tokenizer.json."""

    def __init__(self, tokenizer: Tokenizer, bos_token_id: int | None = None):
        self.tokenizer = tokenizer
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.bos_token_id = bos_token_id

    @classmethod
    def from_file(cls, path: str | Path, bos_token_id: int | None = None) -> TextCodec:
        """The tokenizers library reads the file itself: no Python copy of the JSON (SmolLM2's 1.5 MB file: the
        coordinator's peak RSS at load 80 -> 74 MB)."""
        return cls(Tokenizer.from_file(str(path)), bos_token_id)

    @classmethod
    def from_json(cls, tokenizer_json: str, bos_token_id: int | None = None) -> TextCodec:
        return cls(Tokenizer.from_str(tokenizer_json), bos_token_id)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Special tokens in the text (<|im_start|>, ...) become their ids; the tokenizer's post-processor
        is not applied. add_bos prepends bos_token_id unless the text already starts with it."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_bos and ids[:1] != [self.bos_token_id]:
            if self.bos_token_id is None:
                raise ValueError("add_bos needs the codec's bos_token_id")
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary entries of ids (byte-level pieces such as 'Ġthe'), '' for unknown ids."""
        return [self.tokenizer.id_to_token(i) or "" for i in ids]


class IncrementalDecoder:
    """Streams text token by token without broken characters.

    Decodes a small window: the tokens of the last emitted chunk (context, so decoders that strip a
    leading space or merge bytes see their neighbour) plus the tokens not emitted yet. A window that ends
    in U+FFFD is an incomplete UTF-8 character and waits for more tokens (at most _MAX_PENDING, so an
    invalid byte sequence cannot stall the stream). Special tokens are skipped by default, like llama.cpp
    renders them.
    """

    _MAX_PENDING = 8  # a UTF-8 character has at most 4 bytes, so at most 4 byte-level tokens

    def __init__(self, codec: TextCodec, skip_special: bool = True):
        self._codec, self._skip = codec, skip_special
        self._ids: list[int] = []
        self._read = 0  # self._ids[:self._read] is the context, already emitted
        self._context_text = ""

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._codec.decode(self._ids, self._skip)
        incomplete = text.endswith("\ufffd") and len(self._ids) - self._read < self._MAX_PENDING
        if incomplete or len(text) <= len(self._context_text):
            return ""
        self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        new, self._context_text = text[len(self._context_text):], self._codec.decode(self._ids, self._skip)
        return new

    def flush(self) -> str:
        """Whatever is still pending (possibly with U+FFFD for an unfinished character); resets."""
        text = self._codec.decode(self._ids, self._skip)[len(self._context_text):]
        self._ids, self._read, self._context_text = [], 0, ""
        return text


@dataclass(frozen=True)
class StopMatch:
    text: str  # may be emitted now
    stop: str | None = None  # the stop string that completed (never in text): generation ends


class StopMatcher:
    """Holds back streamed text that might be the start of a stop string."""

    def __init__(self, stop_strings: Iterable[str]):
        self.stop_strings = [s for s in dict.fromkeys(stop_strings) if s]
        self.stopped: str | None = None
        self._held = ""

    def push(self, delta: str) -> StopMatch:
        if self.stopped is not None:
            return StopMatch("", self.stopped)
        text = self._held + delta
        hits = [(i, s) for s in self.stop_strings if (i := text.find(s)) >= 0]
        if hits:
            start, self.stopped = min(hits)
            self._held = ""
            return StopMatch(text[:start], self.stopped)
        keep = self._partial(text)
        self._held = text[len(text) - keep:]
        return StopMatch(text[:len(text) - keep])

    def flush(self) -> str:
        """The held-back text, at the end of a stream that did not stop on a string."""
        held, self._held = self._held, ""
        return held

    def _partial(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
