"""A stage's KV cache: a bounded pool of per-session buffers, written in place by the graphs.

Each session's buffers are views of one anonymous memory mapping of its own: pages are committed only
as positions are written, and releasing the session unmaps them at once. (np.zeros would not do: once
glibc has raised its mmap threshold, it serves big blocks from the heap and zeroes them, so they are
resident at once and stay resident after release.)
"""

from __future__ import annotations

import mmap
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from splitllm.services.common.errors import exhausted, invalid, not_found


@dataclass
class Session:
    id: str
    buffers: dict[
        str, np.ndarray
    ]  # graph input name (past_key.i / past_value.i) -> [1, kv_heads, C, head_dim]
    length: int = 0  # positions written
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    binding: object = None  # the runtime's reusable I/O binding for these buffers


def mapped_zeros(shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Zeroed float32 arrays carved from one private anonymous mapping (freed when the last view goes)."""
    sizes = {name: int(np.prod(shape)) for name, shape in shapes.items()}
    area = mmap.mmap(-1, max(4 * sum(sizes.values()), 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    flat = np.frombuffer(area, dtype=np.float32)
    out, at = {}, 0
    for name, shape in shapes.items():
        out[name] = flat[at : at + sizes[name]].reshape(shape)
        at += sizes[name]
    return out


class KVPool:
    def __init__(
        self,
        layers: range,
        kv_heads: int,
        context: int,
        head_dim: int,
        capacity: int,
        shapes: dict[str, tuple[int, ...]] | None = None,
    ) -> None:
        """`shapes`: buffer name -> shape when the graphs want another layout (qnn); default past_key.{i} and
        past_value.{i} [1, kv_heads, context, head_dim]."""
        if capacity < 1:
            raise ValueError(f"KV capacity must be at least 1 session (got {capacity})")
        self.layers, self.capacity = layers, capacity
        shape = (1, kv_heads, context, head_dim)
        self.shapes = shapes or {f"past_{kind}.{i}": shape for i in layers for kind in ("key", "value")}
        self.bytes_per_session = sum(4 * int(np.prod(s)) for s in self.shapes.values())
        self.sessions: dict[str, Session] = {}
        self.lock = threading.Lock()

    @property
    def in_use(self) -> int:
        return len(self.sessions)

    @property
    def bytes_in_use(self) -> int:
        return self.in_use * self.bytes_per_session

    @property
    def bytes_capacity(self) -> int:
        return self.capacity * self.bytes_per_session

    def create(self, session_id: str) -> Session:
        if not session_id:
            raise invalid("session_id is empty: every entry needs a non-empty session id")
        with self.lock:
            if session_id in self.sessions:
                raise invalid(f"session {session_id!r} already exists (position 0 starts a new session only)")
            if len(self.sessions) >= self.capacity:
                raise exhausted(f"no KV capacity: {self.capacity} sessions in use on this stage; retry later")
            buffers = mapped_zeros(self.shapes)
            s = self.sessions[session_id] = Session(session_id, buffers)
            return s

    def get(self, session_id: str) -> Session:
        s = self.sessions.get(session_id)
        if s is None:
            raise not_found(
                f"session {session_id!r} is unknown on this stage (never started, released or expired)"
            )
        return s

    def release(self, session_id: str) -> bool:
        with self.lock:
            return self.sessions.pop(session_id, None) is not None

    def expire(self, ttl: float, now: float | None = None) -> list[str]:
        """Drop sessions idle for more than `ttl` seconds (and not running); returns their ids."""
        now = time.monotonic() if now is None else now
        with self.lock:
            old = [sid for sid, s in self.sessions.items() if now - s.last_used > ttl and not s.lock.locked()]
            for sid in old:
                del self.sessions[sid]
        return old
