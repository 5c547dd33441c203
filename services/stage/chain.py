"""The stage graphs chained in one process, without gRPC: the baseline the pipeline is measured against,
and the engine of `splitllm eval`."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from splitllm.services.stage.runtime import Entry, StageRuntime

_ids = itertools.count()


class LocalChain:
    def __init__(
        self,
        artifacts: str | Path,
        backend: str = "cpu",
        kv_capacity: int = 4,
        threads: int | None = None,
        spin: bool = False,
    ) -> None:
        first = StageRuntime(artifacts, 0, backend, kv_capacity, threads, spin=spin)
        self.stages = [first] + [
            StageRuntime(artifacts, k, backend, kv_capacity, threads, spin=spin)
            for k in range(1, first.manifest.num_stages)
        ]
        self.manifest = first.manifest
        self.prefill = self.manifest.prefill_length

    def step(self, session_id: str, position: int, tokens: np.ndarray, logit_rows: int = 1) -> np.ndarray:
        """Run up to P tokens through every stage; logits [vocab] of the last one ([logit_rows, vocab] of the last
        logit_rows when more than 1)."""
        x: np.ndarray = tokens.astype(np.int32)
        for stage in self.stages:
            x = stage.forward(Entry(session_id, position, x, logit_rows))
        return x

    def prefill_tokens(self, session_id: str, tokens: list[int]) -> np.ndarray:
        """Prompt processing in chunks of P from position 0; logits after the last token."""
        logits = None
        for start in range(0, len(tokens), self.prefill):
            logits = self.step(session_id, start, np.asarray(tokens[start : start + self.prefill], np.int32))
        assert logits is not None, "empty prompt"
        return logits

    def greedy(self, tokens: list[int], max_new: int, stop_ids: set[int] | None = None) -> list[int]:
        sid = f"local-{next(_ids)}"
        try:
            logits = self.prefill_tokens(sid, tokens)
            out: list[int] = []
            for _ in range(max_new):
                t = int(np.argmax(logits))
                out.append(t)
                if stop_ids and t in stop_ids or len(tokens) + len(out) >= self.manifest.context_length:
                    break
                logits = self.step(sid, len(tokens) + len(out) - 1, np.array([t], np.int32))
            return out
        finally:
            self.release(sid)

    def release(self, session_id: str) -> None:
        for s in self.stages:
            s.release(session_id)
