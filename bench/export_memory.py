#!/usr/bin/env python
"""Export memory at Llama-3-8B's shapes: peak RSS must not grow with depth.

    python bench/export_memory.py                   # 2 and 4 layers; table + bench/results/export_memory.json
    python bench/export_memory.py --layers 2 4 8    # other depths
    python bench/export_memory.py --work DIR        # keep the synthetic checkpoints in DIR (else a temp dir)

Writes one synthetic checkpoint of Llama-3-8B's shapes (hidden 4096, MLP 14336, 32 heads, 8 KV heads,
vocab 128256, llama3 rope scaling, untied lm_head; random bf16 weights, one safetensors shard per layer,
streamed row block by row block so the writer stays small) with the deepest layer count, and for each
depth a directory whose config.json says that depth and whose shards are links to the first ones. Each
depth is exported by `splitllm export` in a child process (4 stages when there are 4 layers or more,
else 2): peak RSS (the child's ru_maxrss) and wall time. One layer's working set is the float32 of the
largest fused matrix (gate|up, 2 x 14336 x 4096) plus its 4-bit form.

Where the peak is (RSS sampled per tensor): the 8-bit embedding and lm_head, 1.2 GiB, which is their
quantized row pieces plus the concatenated table (590 MiB each); a layer stays under 0.5 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import write_tokenizer_dir  # noqa: E402  (the tests' tiny Llama-3 tokenizer)

RESULTS = Path(__file__).resolve().parent / "results" / "export_memory.json"
DTYPE_BYTES = {"F32": 4, "BF16": 2, "F16": 2}
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "max_position_embeddings": 8192,
    "torch_dtype": "bfloat16",
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
}


def write_safetensors(path: Path, specs: list[tuple[str, str, tuple[int, ...]]], chunks: Iterable[bytes]) -> None:
    """A safetensors file from (name, dtype, shape) specs and the tensors' bytes, streamed in spec order."""
    header, offset = {}, 0
    for name, dtype, shape in specs:
        size = DTYPE_BYTES[dtype] * int(np.prod(shape))
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    written = 0
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for c in chunks:
            f.write(c)
            written += len(c)
    if written != offset:
        raise ValueError(f"{path}: wrote {written} tensor bytes, the header says {offset}")


def bf16_blocks(rng: np.random.Generator, shape: tuple[int, ...], mean: float, std: float) -> Iterator[bytes]:
    """Random normal bf16 bytes (float32 truncated to its high half), 2048 rows at a time."""
    for r in range(0, shape[0], 2048):
        x = rng.standard_normal((min(2048, shape[0] - r), *shape[1:]), dtype=np.float32)
        x *= std
        x += mean
        yield (x.view(np.uint32) >> 16).astype(np.uint16).tobytes()


def write_checkpoint(path: Path, layers: int, seed: int = 0) -> None:
    """Llama-3-8B's shapes with random bf16 weights: one shard for the tables, one per layer."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(LLAMA3_8B | {"num_hidden_layers": layers}, indent=1))
    write_tokenizer_dir(path)
    c, rng = LLAMA3_8B, np.random.default_rng(seed)
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    shards = {
        "model-tables.safetensors": {
            "model.embed_tokens.weight": (v, h),
            "model.norm.weight": (h,),
            "lm_head.weight": (v, h),
        }
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        shards[f"model-layer{i:03d}.safetensors"] = {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        }
    for file, tensors in shards.items():
        specs = [(name, "BF16", shape) for name, shape in tensors.items()]
        chunks = (
            b
            for name, shape in tensors.items()
            for b in bf16_blocks(rng, shape, *((1.0, 0.1) if len(shape) == 1 else (0.0, shape[1] ** -0.5)))
        )
        write_safetensors(path / file, specs, chunks)


def shallower(full: Path, path: Path, layers: int) -> None:
    """A checkpoint of the first `layers` layers of `full`: its own config.json, the shards linked."""
    path.mkdir(parents=True, exist_ok=True)
    for f in full.iterdir():
        deeper = f.name.startswith("model-layer") and int(f.stem.removeprefix("model-layer")) >= layers
        if f.name != "config.json" and not deeper:
            (path / f.name).symlink_to(f.resolve())
    cfg = json.loads((full / "config.json").read_text()) | {"num_hidden_layers": layers}
    (path / "config.json").write_text(json.dumps(cfg, indent=1))


def run_export(src: Path, out: Path, stages: int) -> dict:
    """`splitllm export` in a child process: its own peak RSS (wait4) and wall time."""
    cmd = [sys.executable, "-m", "splitllm.services.client.cli", "export", str(src), "--out", str(out)]
    t = time.perf_counter()
    child = subprocess.Popen([*cmd, "--stages", str(stages)], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    if child.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {child.returncode}")
    weights = sum(f.stat().st_size for f in out.glob("*.weights"))
    return {
        "stages": stages,
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "wall_s": round(wall, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "artifact_weights_mib": round(weights / 2**20, 1),
    }


def layer_working_set_mib() -> float:
    """float32 of the largest fused matrix (gate|up) + its 4-bit form (codes, scales, uint8 zero points)."""
    n, k = 2 * LLAMA3_8B["intermediate_size"], LLAMA3_8B["hidden_size"]
    return (n * k * 4 + n * k // 2 + n * (k // 32) * 4 + n * (k // 64)) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--work", type=Path, help="keep the synthetic checkpoints here (else a temp dir)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or Path(tmp)
        deepest = max(a.layers)
        full = work / f"llama3-8b-shapes-{deepest}l"
        if not (full / "config.json").exists():
            t = time.perf_counter()
            write_checkpoint(full, deepest)
            print(f"wrote {full} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        runs = {}
        for n in sorted(a.layers):
            src = full if n == deepest else work / f"llama3-8b-shapes-{n}l"
            if n != deepest and not src.exists():
                shallower(full, src, n)
            runs[n] = run_export(src, work / f"art-{n}l", 4 if n >= 4 else 2)
            print(f"{n} layers: {runs[n]}", file=sys.stderr)
            shutil.rmtree(work / f"art-{n}l")
    ws = layer_working_set_mib()
    lo, hi = runs[min(runs)], runs[max(runs)]
    diff = hi["peak_rss_mib"] - lo["peak_rss_mib"]
    per_layer = (hi["wall_s"] - lo["wall_s"]) / (max(runs) - min(runs))
    print(f"{'layers':>6s} {'stages':>6s} {'peak RSS MiB':>12s} {'wall s':>7s} {'cpu s':>7s} {'weights MiB':>11s}")
    for n, r in runs.items():
        print(
            f"{n:6d} {r['stages']:6d} {r['peak_rss_mib']:12.0f} {r['wall_s']:7.0f} {r['cpu_s']:7.0f} "
            f"{r['artifact_weights_mib']:11.0f}"
        )
    print(
        f"peak RSS difference {max(runs)} - {min(runs)} layers: {diff:.0f} MiB; one layer's working set {ws:.0f} MiB;"
        f" budget 4096 MiB; {per_layer:.1f} s per layer"
    )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "model": "Llama-3-8B shapes, random bf16",
                "runs": {str(n): r for n, r in runs.items()},
                "peak_rss_difference_mib": round(diff, 1),
                "layer_working_set_mib": round(ws, 1),
                "wall_s_per_layer": round(per_layer, 1),
                "budget_mib": 4096,
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            },
            indent=1,
        )
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
