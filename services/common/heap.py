"""Giving freed heap pages back to the system after start-up work (glibc keeps them otherwise)."""

from __future__ import annotations

import ctypes


def trim() -> None:
    """malloc_trim(0). Loading the tokenizer frees many small blocks among live ones; glibc keeps those
    pages resident (~17 MB in the coordinator with SmolLM2's tokenizer) until asked. No-op without glibc."""
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    malloc_trim(0)
