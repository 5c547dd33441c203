"""A process's memory: its /proc figures, and giving freed heap pages back to the system after start-up work (glibc
keeps them otherwise)."""

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


def proc_bytes(path: str, key: str) -> int | None:
    """A "Key:   N kB" figure of a /proc file (status, smaps_rollup), in bytes; None where the file or the key is
    missing."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) << 10 for line in text.splitlines() if line.startswith(key + ":")), None)
