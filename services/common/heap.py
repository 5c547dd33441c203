"""A process's memory: its /proc figures, giving freed heap pages back to the system after start-up work (glibc
keeps them otherwise), and keeping them during serving."""

from __future__ import annotations

import ctypes
from pathlib import Path


def trim() -> None:
    """malloc_trim(0). Loading the tokenizer frees many small blocks among live ones; glibc keeps those
    pages resident (~17 MB in the coordinator with SmolLM2's tokenizer) until asked. No-op without glibc."""
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    malloc_trim(0)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def keep_freed(mmap_threshold: int = 4 << 20, trim_threshold: int = 32 << 20) -> None:
    """Serve blocks up to `mmap_threshold` from the heap and keep up to `trim_threshold` of freed heap, instead of
    glibc's dynamic thresholds. The coordinator's per-token arrays over the vocabulary (196 KB each) otherwise came
    from fresh mmaps or a just-trimmed heap top, with their page faults: the sampler at top_p 0.95 with a repetition
    penalty took 0.62-0.66 ms a token with 113 page faults, 0.19-0.32 ms with none (bench/PERFORMANCE.md). No-op
    without glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, mmap_threshold)
    mallopt(M_TRIM_THRESHOLD, trim_threshold)


def proc_bytes(path: str, key: str) -> int | None:
    """A "Key:   N kB" figure of a /proc file (status, smaps_rollup), in bytes; None where the file or the key is
    missing."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) << 10 for line in text.splitlines() if line.startswith(key + ":")), None)
