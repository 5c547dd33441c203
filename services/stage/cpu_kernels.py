"""Where splitllm's own ONNX Runtime CPU kernels are (cpu_kernels.c, built into the package by pip), and which of
them this CPU runs.

The CPU stage graphs run GGUF Q4_1 and Q8_0 weights as ai.splitllm MatMulQ4_1 and MatMulQ8_0; every session that
may load one registers the library first (runtime.session_options does).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
from functools import cache
from pathlib import Path


@cache
def library_path() -> str:
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_cpu_kernels{suffix}"
        if path.exists():
            return str(path)
    raise FileNotFoundError(
        f"splitllm's CPU kernel library is not built in {here} (looked for _cpu_kernels with the suffixes "
        f"{', '.join(importlib.machinery.EXTENSION_SUFFIXES)}): reinstall the package (pip install -e .), "
        "which compiles services/stage/cpu_kernels.c"
    )


@cache
def kernels() -> str:
    """Which kernels the library runs in this process: "avx512" (AVX-512 with VNNI: the matrix products; the rest
    as "avx2"), "avx2", or "scalar" (portable C; CPUs without AVX2). SPLITLLM_CPU_KERNELS=avx2 or scalar forces one."""
    lib = ctypes.CDLL(library_path())
    lib.splitllm_kernels.restype = ctypes.c_char_p
    return lib.splitllm_kernels().decode()
