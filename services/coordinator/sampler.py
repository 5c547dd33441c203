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

    def distribution(self, logits: Logits, history: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """The candidates (ids ascending) and their probabilities (float64, summing to 1) for temperature > 0."""
        p = self.params
        values = self._penalized(logits, history)
        ids = np.arange(values.size) if logits.ids is None else np.asarray(logits.ids, np.int64)
        truncate = 0 < p.top_k < values.size
        if truncate:
            keep = np.argpartition(-values, p.top_k - 1)[: p.top_k]
            values, ids = values[keep], ids[keep]
        if truncate or logits.ids is not None:
            order = np.argsort(ids, kind="stable")
            values, ids = values[order], ids[order]
        x = values.astype(np.float64)
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        if 0 < p.top_p < 1:  # the smallest set, most probable first, whose mass reaches top_p
            order = np.lexsort((ids, -probs))
            n = min(int(np.searchsorted(np.cumsum(probs[order]), p.top_p)) + 1, order.size)
            keep = np.sort(order[:n])
            x, ids, probs = x[keep], ids[keep], probs[keep]
        if p.min_p > 0:
            keep = probs >= p.min_p * probs.max()
            x, ids = x[keep], ids[keep]
        x = x / p.temperature
        probs = np.exp(x - x.max())
        return ids, probs / probs.sum()

    def sample(self, logits: Logits, history: Sequence[int] = ()) -> int:
        """The next token; history is every token seen so far (prompt + generated), for the penalty."""
        if self.params.temperature == 0:
            i = int(np.argmax(self._penalized(logits, history)))
            return i if logits.ids is None else int(logits.ids[i])
        ids, probs = self.distribution(logits, history)
        cdf = np.cumsum(probs)
        i = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
        return int(ids[min(i, ids.size - 1)])
