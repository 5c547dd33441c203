"""Per-step timestamps across processes: where a pipeline token's time goes (bench/hop_trace.py).

Off unless SPLITLLM_TRACE_DIR is set in the environment a process starts with; then the process appends
"step_id event monotonic_ns" lines to DIR/<pid>.txt. CLOCK_MONOTONIC is one clock for the whole host, so
the lines of every process line up. Off, an event costs one function call.
"""

from __future__ import annotations

import os
import time

_DIR = os.environ.get("SPLITLLM_TRACE_DIR")
_fd: int | None = None


def event(step_id: int, name: str) -> None:
    global _fd
    if _DIR is None:
        return
    if _fd is None:
        _fd = os.open(os.path.join(_DIR, f"{os.getpid()}.txt"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(_fd, f"{step_id} {name} {time.monotonic_ns()}\n".encode())
