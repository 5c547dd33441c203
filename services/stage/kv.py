"""A stage's KV cache: a bounded pool of session slots, written in place by the graphs.

Each KV buffer of the stage (past_key.i, past_value.i) is one anonymous memory mapping of `capacity` slots;
a session owns one slot of every buffer. Consecutive slots are one contiguous array, so one graph run can
take the decode steps of several sessions (batch dimension = slots lo..hi; `move` brings a batch's
sessions together). Pages are committed only as positions are written; releasing a session gives its
slot's pages back at once (madvise DONTNEED), and a new session takes the lowest free slot.
(np.zeros would not do: once glibc has raised its mmap threshold, it serves big blocks from the heap and
zeroes them, so they are resident at once and stay resident after release.)
"""

from __future__ import annotations

import heapq
import mmap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from splitllm.services.common.errors import exhausted, invalid, not_found


@dataclass
class Session:
    id: str
    slot: int
    buffers: dict[str, np.ndarray]  # buffer name -> this session's slot of it (the graph's KV shape)
    length: int = 0  # positions written
    last_used: float = field(default_factory=time.monotonic)


class SlotBuffer:
    """[capacity, *shape] of `dtype` carved from a private anonymous mapping: one slot per session."""

    def __init__(self, capacity: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.itemsize = np.dtype(dtype).itemsize
        self.slot_bytes = self.itemsize * int(np.prod(shape))
        self.area = mmap.mmap(-1, max(capacity * self.slot_bytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.array = np.frombuffer(self.area, dtype=dtype).reshape(capacity, *shape)

    def clear(self, slot: int) -> None:
        """Zero a slot and give its whole pages back to the system."""
        start, end = slot * self.slot_bytes, (slot + 1) * self.slot_bytes
        first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
        if first < last:
            self.area.madvise(mmap.MADV_DONTNEED, first, last - first)
        flat = self.array.reshape(-1)
        for a, b in ((start, min(first, end)), (max(last, start), end)):  # partial pages at the edges
            if a < b:
                flat[a // self.itemsize : b // self.itemsize] = 0


class KVPool:
    def __init__(
        self,
        layers: range,
        kv_heads: int,
        context: int,
        head_dim: int,
        capacity: int,
        shapes: dict[str, tuple[int, ...]] | None = None,
        dtype: np.dtype | type = np.float32,
    ) -> None:
        """`shapes`: buffer name -> one session's shape when the graphs want another layout (qnn); default
        past_key.{i} and past_value.{i} [1, kv_heads, context, head_dim]. `dtype`: the graphs' cache type."""
        if capacity < 1:
            raise ValueError(f"KV capacity must be at least 1 session (got {capacity})")
        self.layers, self.capacity = layers, capacity
        shape = (1, kv_heads, context, head_dim)
        self.shapes = shapes or {f"past_{kind}.{i}": shape for i in layers for kind in ("key", "value")}
        self.buffers = {name: SlotBuffer(capacity, s, np.dtype(dtype)) for name, s in self.shapes.items()}
        self.bytes_per_session = sum(b.slot_bytes for b in self.buffers.values())
        self.sessions: dict[str, Session] = {}
        self.free = list(range(capacity))  # a heap: the lowest free slot first
        self.on_move: Callable[[], None] | None = None  # called after each `move` (a metrics counter)
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

    def slots(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        """Every buffer's slots lo..hi-1 as one array [hi - lo, *shape[1:]] (the graph's batch dimension)."""
        return {n: b.array[lo:hi].reshape(hi - lo, *b.array.shape[2:]) for n, b in self.buffers.items()}

    def create(self, session_id: str) -> Session:
        if not session_id:
            raise invalid("session_id is empty: every entry needs a non-empty session id")
        with self.lock:
            if session_id in self.sessions:
                raise invalid(f"session {session_id!r} already exists (position 0 starts a new session only)")
            if not self.free:
                raise exhausted(f"no KV capacity: {self.capacity} sessions in use on this stage; retry later")
            slot = heapq.heappop(self.free)
            s = self.sessions[session_id] = Session(session_id, slot, self._views(slot))
            return s

    def get(self, session_id: str) -> Session:
        s = self.sessions.get(session_id)
        if s is None:
            raise not_found(
                f"session {session_id!r} is unknown on this stage (never started, released or expired)"
            )
        return s

    def move(self, s: Session, slot: int) -> None:
        """Give session `s` the slot `slot`, swapping KV with the session there (or taking it when free).
        Copies only the positions written; for the [1, kv_heads, context, head_dim] layout (cpu)."""
        with self.lock:
            other = next((o for o in self.sessions.values() if o.slot == slot), None)
            n = max(s.length, other.length if other else 0)
            for b in self.buffers.values():
                mine, theirs = b.array[s.slot][:, :, :n], b.array[slot][:, :, :n]
                held = theirs.copy()
                theirs[...] = mine
                mine[...] = held
            if other is None:
                self.free.remove(slot)
                heapq.heapify(self.free)
                self._free(s)  # the slot it leaves
            else:
                other.slot, other.buffers = s.slot, self._views(s.slot)
            s.slot, s.buffers = slot, self._views(slot)
        if self.on_move:
            self.on_move()

    def release(self, session_id: str) -> bool:
        with self.lock:
            s = self.sessions.pop(session_id, None)
            if s is None:
                return False
            self._free(s)
            return True

    def _views(self, slot: int) -> dict[str, np.ndarray]:
        return {name: b.array[slot] for name, b in self.buffers.items()}

    def _free(self, s: Session) -> None:
        for b in self.buffers.values():
            b.clear(s.slot)
        heapq.heappush(self.free, s.slot)

    def expire(self, ttl: float, now: float | None = None) -> list[str]:
        """Drop sessions idle for more than `ttl` seconds; returns their ids (the runtime calls it between runs)."""
        now = time.monotonic() if now is None else now
        with self.lock:
            old = [s for s in self.sessions.values() if now - s.last_used > ttl]
            for s in old:
                del self.sessions[s.id]
                self._free(s)
        return [s.id for s in old]
