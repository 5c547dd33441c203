"""What the coordinator needs of the stages: run a step of a session, release it, describe the route.

Two implementations: LocalPipeline (the stage graphs in this process; tests and the overhead baseline)
and the gRPC one in services/coordinator/remote.py. Both raise ServiceError with a gRPC status code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from splitllm.services.common.errors import ServiceError, invalid
from splitllm.services.common.manifest import Manifest
from splitllm.services.common.topk import top_k_rows


@dataclass(frozen=True)
class Logits:
    """Full logits (ids is None) or the top-k values with their token ids."""

    values: np.ndarray
    ids: np.ndarray | None = None

    def row(self, i: int) -> Logits:
        """Row i of a step's logits for several rows ([rows, n] values and ids)."""
        return Logits(self.values[i], None if self.ids is None else self.ids[i])


Pending = Callable[[], Logits]
"""A submitted step: calling it waits for the logits, or raises the step's ServiceError."""


def failed(error: ServiceError) -> Pending:
    def wait() -> Logits:
        raise error

    return wait


class Pipeline(Protocol):
    manifest: Manifest
    multi_row_logits: bool  # submit takes logit_rows > 1 (every stage's graph answers logits for several rows)

    def submit(self, session_id: str, position: int, tokens: np.ndarray, top_k: int = 0,
               last: bool = False, logit_rows: int = 1) -> Pending:
        """Start `tokens` (int32, 1..P of them) of a session from `position` through every stage. Never
        raises: errors come out of the Pending. The coordinator streams token n to its client while
        the stages run step n + 1. `last`: the session's last step, which may free it on the stages as it
        goes (release is still called, and is then cheaper). `logit_rows` > 1: logits [logit_rows, n] of the last
        rows (a speculative step); a position before the session's end drops its tokens from there on."""
        ...

    def prefill(self, session_id: str, tokens: np.ndarray, top_k: int = 0, last: bool = False) -> Logits:
        """Prompt processing from position 0 in chunks of P; the logits after the last token. `last`: as
        submit's, for the last chunk (the session ends after its first token)."""
        ...

    def release(self, session_id: str, then: Callable[[], None] | None = None) -> None:
        """Free the session on every stage of its route; never raises. May return before the stages have
        answered; `then` runs (in any thread) once all of them have, whether they freed it or failed."""
        ...

    def addresses(self) -> list[str]: ...


def top_k_logits(logits: np.ndarray, k: int) -> Logits:
    """Logits [n] or [rows, n] as the last stage answers them: the top k of each row, or all."""
    return Logits(*top_k_rows(logits, k))


class LocalPipeline:
    """The in-process chain behind the Pipeline interface."""

    def __init__(self, artifacts: str, kv_capacity: int = 16, threads: int | None = None) -> None:
        from splitllm.services.stage.chain import LocalChain

        self.chain = LocalChain(artifacts, kv_capacity=kv_capacity, threads=threads)
        self.manifest = self.chain.manifest
        self.multi_row_logits = all(s.multi_row_logits for s in self.chain.stages)

    def submit(self, session_id: str, position: int, tokens: np.ndarray, top_k: int = 0,
               last: bool = False, logit_rows: int = 1) -> Pending:
        """Runs the step now, in the caller's thread: the chain is in this process (release costs no calls,
        so `last` changes nothing)."""
        try:
            if tokens.size == 0:
                raise invalid("a step needs at least one token")
            logits = top_k_logits(self.chain.step(session_id, position, tokens, logit_rows), top_k)
        except ServiceError as e:
            return failed(e)
        return lambda: logits

    def prefill(self, session_id: str, tokens: np.ndarray, top_k: int = 0, last: bool = False) -> Logits:
        return top_k_logits(self.chain.prefill_tokens(session_id, list(tokens)), top_k)

    def release(self, session_id: str, then: Callable[[], None] | None = None) -> None:
        self.chain.release(session_id)
        if then is not None:
            then()

    def addresses(self) -> list[str]:
        return ["local"] * len(self.chain.stages)
