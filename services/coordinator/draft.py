"""Draft tokens for speculative decoding, by prompt lookup: what followed the last n-gram when it came before.

A token step through the pipeline costs its hops (~3 ms through four stages here) whatever its rows, and a stage's
compute grows slowly with them (4 rows cost 1.5x one). So the coordinator feeds the new token and a few guesses after
it, gets logits for every row, and keeps the guesses the sampler would have picked anyway, plus the token it picks
after the last kept one: the same tokens as one step at a time, fewer steps where text repeats itself (a summary,
code, a list, a model's own loops). Guesses come from the sequence itself (prompt and generated), as llama.cpp's
lookup decoding and vLLM's n-gram speculation make them: no draft model.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from splitllm.services.coordinator.pipeline import Logits
from splitllm.services.coordinator.sampler import Sampler

NGRAM = 3  # tokens that must repeat before their continuation is guessed (2 guessed more and kept fewer)


class PromptLookup:
    """A sequence and, for every n-gram in it, where its latest occurrence ends: appending a token and drafting
    cost a dict lookup each, whatever the length."""

    def __init__(self, tokens: Iterable[int] = (), ngram: int = NGRAM) -> None:
        self.tokens: list[int] = []
        self.ngram = ngram
        self.ends: dict[tuple[int, ...], int] = {}  # n-gram -> the end of its latest occurrence
        self.match: int | None = None  # the end of the latest occurrence of the last n-gram before it
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        n, seq = self.ngram, self.tokens
        for t in tokens:
            seq.append(t)
            if len(seq) >= n:
                key = tuple(seq[-n:])
                self.match = self.ends.get(key)
                self.ends[key] = len(seq)

    def draft(self, k: int) -> list[int]:
        """Up to k tokens that followed the last n-gram's previous occurrence; none if it has none."""
        if self.match is None or k <= 0:
            return []
        return self.tokens[self.match : self.match + k]


def accept(sampler: Sampler, logits: Logits, drafts: list[int], history: list[int], stop_ids: Collection[int] = (),
           end: int | None = None) -> list[int]:
    """The tokens a step yields, appended to `history`: the one sampled after the step's first row, and while it
    matches the guess fed after that row, the one sampled after the guess's row, and so on. The tokens and the
    sampler's draws are those of one step at a time. Stops at a stop id and at `end` tokens of history. `logits`: one
    row per token fed ([rows, n]) when there are drafts, else the last row's."""
    tokens: list[int] = []
    for i in range(len(drafts) + 1):
        token = sampler.sample(logits.row(i) if drafts else logits, history)
        history.append(token)
        tokens.append(token)
        if i == len(drafts) or token != drafts[i] or token in stop_ids or (end is not None and len(history) >= end):
            break
    return tokens
