"""Token sampling: validated parameters and a per-request sampler over (possibly top-k) logits.

The chain is llama.cpp's default order: repetition penalty, top_k, top_p, min_p, then temperature and
the draw. Because top_k comes first, top_p and min_p only ever see the top_k candidates, so the last stage
may send just those (top_k_needed) and the result is the same as over the full vocabulary: candidates
are put in token id order before the draw, whatever order they arrived in.
"""

from __future__ import annotations

import functools
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from splitllm.services.common.errors import invalid
from splitllm.services.common.topk import largest
from splitllm.services.coordinator.pipeline import Logits


def _off(penalty: float) -> bool:
    return penalty in (0.0, 1.0)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 0 or 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 0 or 1 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        def check(name: str, value: float, ok: bool, allowed: str) -> None:
            if not (ok and math.isfinite(value)):
                raise invalid(f"sampling.{name} must be {allowed}; got {value}")

        check("temperature", self.temperature, self.temperature >= 0, "a number >= 0 (0 = greedy)")
        check("top_k", self.top_k, self.top_k >= 0, "an integer >= 0 (0 = off)")
        check("top_p", self.top_p, 0 <= self.top_p <= 1, "in [0, 1] (0 or 1 = off)")
        check("min_p", self.min_p, 0 <= self.min_p <= 1, "in [0, 1] (0 = off)")
        check("repetition_penalty", self.repetition_penalty, self.repetition_penalty >= 0,
              "a number >= 0 (0 or 1 = off)")

    @staticmethod
    def from_proto(msg) -> SamplingParams:
        """From coordinator.proto's SamplingParams; raises INVALID_ARGUMENT naming the bad field."""
        return SamplingParams(msg.temperature, msg.top_k, msg.top_p, msg.min_p, msg.repetition_penalty,
                              msg.seed if msg.HasField("seed") else None)


def top_k_needed(params: SamplingParams) -> int:
    """How many logits the sampler needs from the last stage: 0 = the full vocabulary."""
    if not _off(params.repetition_penalty):
        return 0  # a penalized token may leave (or, below 1, enter) the top candidates
    if params.temperature == 0:
        return 1
    return params.top_k


def nucleus(weights: np.ndarray, ids: np.ndarray | None, top_p: float) -> np.ndarray:
    """Ascending indices of top_p's nucleus: the smallest set, most probable first (ties: the lower id first), whose
    weights reach top_p of their sum. `ids` None: the indices are the ids. Sorts only the largest weights, 64 of them
    and 8 times more while they fall short: they are a prefix of the full order, so the sums along it are a full
    sort's."""
    target, n, k = top_p * weights.sum(dtype=np.float64), weights.size, 64
    while True:
        top = np.flatnonzero(weights >= np.partition(weights, n - k)[n - k]) if k < n else np.arange(n)
        order = top[np.lexsort((top if ids is None else ids[top], -weights[top]))]
        i = int(np.searchsorted(np.cumsum(weights[order], dtype=np.float64), target))
        if i < order.size or k >= n:
            return np.sort(order[: i + 1])
        k *= 8


DRAW_BLOCK = 512  # weights summed a block at a time: a draw sums the vocabulary once and walks one block


def draw(weights: np.ndarray, u: float) -> int:
    """The index whose span of the weights' cumulative sum holds u (in [0, 1)) of their total: inverse transform
    sampling through block sums, where a float64 cumulative sum of the whole vocabulary took ~0.2 ms and its array's
    page faults as much again."""
    n = weights.size
    full = n - n % DRAW_BLOCK
    sums = weights[:full].reshape(-1, DRAW_BLOCK).sum(axis=1, dtype=np.float64)
    if full < n:
        sums = np.append(sums, weights[full:].sum(dtype=np.float64))
    ends = np.cumsum(sums)
    target = u * ends[-1]
    block = int(np.searchsorted(ends, target, side="right"))  # its sum is > 0: ends[block - 1] <= target < ends[block]
    if block == ends.size:  # u at the very end, past the total by rounding: the last token with weight
        return int(np.flatnonzero(weights)[-1])
    start = block * DRAW_BLOCK
    within = np.cumsum(weights[start : start + DRAW_BLOCK], dtype=np.float64)
    i = int(np.searchsorted(within, target - (ends[block - 1] if block else 0.0), side="right"))
    if i == within.size:  # the block's own sums came out below its total by rounding
        i = int(np.flatnonzero(weights[start : start + DRAW_BLOCK])[-1])
    return start + i


class Sampler:
    def __init__(self, params: SamplingParams, seed: int | None = None) -> None:
        self.params = params
        self.seed = secrets.randbits(64) if seed is None else seed

    @functools.cached_property
    def rng(self) -> np.random.Generator:
        """Made on the first draw: greedy requests never draw, and making one costs ~0.1 ms of their TTFT."""
        return np.random.default_rng(self.seed)

    def _penalized(self, logits: Logits, history: Sequence[int]) -> np.ndarray:
        """llama.cpp/HF repetition penalty over every token seen: positive logits / p, others * p."""
        values = np.asarray(logits.values, np.float32)
        penalty = self.params.repetition_penalty
        if _off(penalty) or not len(history):
            return values
        seen = np.unique(np.asarray(history, np.int64))
        idx = seen[seen < values.size] if logits.ids is None else np.flatnonzero(np.isin(logits.ids, seen))
        values = values.copy()
        v = values[idx]
        values[idx] = np.where(v <= 0, v * penalty, v / penalty)
        return values

    def candidates(self, logits: Logits, history: Sequence[int] = ()) -> tuple[np.ndarray | None, np.ndarray]:
        """What temperature > 0 draws from: the ids (ascending; None: the whole vocabulary in order) and logits
        (float32) left after the penalty, top_k, top_p and min_p. Weights are float32 exponentials (the logits are
        float32: their own rounding is the larger) and top_p sorts only the most probable (nucleus): over the whole
        vocabulary a full sort and float64 exponentials had cost 5.5 ms a token with top_p, 1.5 ms without."""
        p = self.params
        values = self._penalized(logits, history)
        ids = None if logits.ids is None else np.asarray(logits.ids, np.int64)
        if 0 < p.top_k < values.size:
            keep = largest(values, p.top_k)
            values, ids = values[keep], keep if ids is None else ids[keep]
        if 0 < p.top_p < 1 or p.min_p > 0:
            weights = np.exp(values - values.max())  # the largest is 1
            keep = nucleus(weights, ids, p.top_p) if 0 < p.top_p < 1 else np.arange(values.size)
            if p.min_p > 0:
                keep = keep[weights[keep] >= p.min_p]
            values, ids = values[keep], keep if ids is None else ids[keep]
        # An earlier release's stage sent its top k in order of value: put the candidates in order of id.
        if ids is not None and ids.size > 1 and np.any(ids[1:] < ids[:-1]):
            order = np.argsort(ids, kind="stable")
            values, ids = values[order], ids[order]
        return ids, values

    def weights(self, values: np.ndarray) -> np.ndarray:
        """Unnormalized probabilities of candidate logits at the temperature (float32, the largest 1)."""
        w = values - values.max()
        np.divide(w, np.float32(self.params.temperature), out=w)
        return np.exp(w, out=w)

    def distribution(self, logits: Logits, history: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """The candidates (ids ascending) and their probabilities (float64, summing to 1) for temperature > 0."""
        ids, values = self.candidates(logits, history)
        probs = self.weights(values).astype(np.float64)
        return np.arange(values.size) if ids is None else ids, probs / probs.sum()

    def sample(self, logits: Logits, history: Sequence[int] = ()) -> int:
        """The next token; history is every token seen so far (prompt + generated), for the penalty."""
        if self.params.temperature == 0:
            i = int(np.argmax(self._penalized(logits, history)))
            return i if logits.ids is None else int(logits.ids[i])
        ids, values = self.candidates(logits, history)
        i = draw(self.weights(values), self.rng.random())
        return i if ids is None else int(ids[i])
