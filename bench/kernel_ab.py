#!/usr/bin/env python
"""Same-run A/B of two builds of splitllm's CPU kernels (services/stage/cpu_kernels.c), in one process.

    python bench/kernel_ab.py --b /tmp/wt/services/stage/cpu_kernels.c          # this checkout's build against a C file
    python bench/kernel_ab.py --a a.so --b b.so --rows 1,128 --rounds 40

Each side is a library: a built .so, or a .c file that this compiles with the .c files beside it, with gcc as pip
does (Python's CFLAGS, then pyproject.toml's extra-compile-args).
Both are registered in one process (ONNX Runtime keeps a library per path, so the two builds' kernels live side by
side) under serve's session settings (2 threads that spin 50 us), each running the same graph: MatMulQ4_1 nodes of
SmolLM2's shapes for 8 layers (qkv 960 x 576, o 576 x 576, gate_up 3072 x 576, down 576 x 1536) and its
MatMulQ8_0 lm_head (49152 x 576), on random weights. The two take turns, the order alternating by round; the table
gives each side's median and in how many rounds B was the faster. The outputs must agree (to int8 rounding).
Writes bench/results/kernel_ab.json. Figures, never pass/fail.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tomllib
from onnx import TensorProto, helper, numpy_helper

from splitllm.services.stage import cpu_kernels
from splitllm.services.stage.runtime import session_options

RESULTS = Path(__file__).resolve().parent / "results" / "kernel_ab.json"
LAYER = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (N, K) of SmolLM2's fused qkv, o, gate_up, down
LM_HEAD = (49152, 576)


def package_flags() -> list[str]:
    """The compiler flags pip builds the package's kernels with: Python's CFLAGS, then the extension's own."""
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    ext = next(e for e in project["tool"]["setuptools"]["ext-modules"] if e["name"].endswith("_cpu_kernels"))
    return [*(sysconfig.get_config_var("CFLAGS") or "").split(), *ext["extra-compile-args"]]


def build(source: str, out_dir: Path) -> str:
    """A library path: `source` itself if built, else compiled from a .c file and the .c files beside it (the
    library's other ops)."""
    if not source.endswith(".c"):
        return str(Path(source).resolve())
    out = out_dir / f"{len(list(out_dir.iterdir()))}_{Path(source).stem}.so"
    sources = sorted({str(p) for p in Path(source).parent.glob("*.c")} | {source})
    subprocess.run(["gcc", *package_flags(), "-fPIC", "-shared", *sources, "-o", str(out), "-lm"], check=True)
    return str(out)


def graph(layers: int, rng: np.random.Generator) -> bytes:
    nodes, inits, outs = [], [], []

    def add(op: str, x: str, n: int, k: int, arrays: dict[str, np.ndarray]) -> None:
        tag = f"{op}_{len(nodes)}"
        inits.extend(numpy_helper.from_array(a, f"{tag}.{name}") for name, a in arrays.items())
        nodes.append(helper.make_node(op, [x, *(f"{tag}.{name}" for name in arrays)], [tag], domain="ai.splitllm",
                                      K=k, N=n))
        outs.append(tag)

    for _ in range(layers):
        for n, k in LAYER:
            nbp = -(-k // 256) * 8
            add("MatMulQ4_1", "h" if k == 576 else "act", n, k, {
                "qs": rng.integers(0, 256, (n, k // 2), dtype=np.uint8),
                "d": rng.uniform(0.001, 0.02, (n, nbp)).astype(np.float16),
                "m": rng.uniform(-0.16, 0, (n, nbp)).astype(np.float16),
            })
    n, k = LM_HEAD
    add("MatMulQ8_0", "h", n, k, {
        "qs": rng.integers(-127, 128, (n, k), dtype=np.int8),
        "d": rng.uniform(0.001, 0.02, (n, -(-k // 256) * 8)).astype(np.float16),
    })
    g = helper.make_graph(
        nodes, "kernels",
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, [None, 576]),
         helper.make_tensor_value_info("act", TensorProto.FLOAT, [None, 1536])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs], inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.splitllm", 1)]
    return helper.make_model(g, opset_imports=opsets, ir_version=10).SerializeToString()


def session(model: bytes, library: str) -> ort.InferenceSession:
    return ort.InferenceSession(model, session_options(2, spin=True, kernels=library),
                                providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", default=None, help="library or .c file (default: this checkout's build)")
    ap.add_argument("--b", required=True, help="library or .c file")
    ap.add_argument("--rows", default="1,32,128", help="rows of A per run, comma-separated")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=24)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    model = graph(a.layers, rng)
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"A": build(a.a or cpu_kernels.library_path(), Path(tmp)), "B": build(a.b, Path(tmp))}
        if libs["A"] == libs["B"]:
            sys.exit("A and B are the same library")
        sessions = {side: session(model, lib) for side, lib in libs.items()}
        results = {}
        print(f"A: {libs['A']}\nB: {libs['B']}\n{a.layers} layers of MatMulQ4_1 and the MatMulQ8_0 lm_head, "
              f"{a.rounds} rounds")
        for rows in (int(r) for r in a.rows.split(",")):
            feed = {"h": rng.normal(0, 1, (rows, 576)).astype(np.float32),
                    "act": rng.normal(0, 1, (rows, 1536)).astype(np.float32)}
            outs = {side: s.run(None, feed) for side, s in sessions.items()}
            for x, y in zip(outs["A"], outs["B"], strict=True):
                if not np.allclose(x, y, rtol=1e-3, atol=1e-2 * float(np.abs(x).max())):
                    sys.exit(f"the two builds disagree at {rows} rows")
            times: dict[str, list[float]] = {"A": [], "B": []}
            for r in range(a.rounds):
                for side in ("A", "B") if r % 2 == 0 else ("B", "A"):
                    t0 = time.perf_counter()
                    sessions[side].run(None, feed)
                    times[side].append(time.perf_counter() - t0)
            med = {side: statistics.median(t) * 1e3 for side, t in times.items()}
            wins = sum(b < x for x, b in zip(times["A"], times["B"], strict=True))
            print(f"  {rows:5d} rows   A {med['A']:9.3f} ms   B {med['B']:9.3f} ms   {med['B'] / med['A'] - 1:+6.1%}"
                  f"   (B faster in {wins}/{a.rounds} rounds)")
            results[rows] = {"a_ms": med["A"], "b_ms": med["B"], "b_faster_rounds": wins}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"a": a.a, "b": a.b, "layers": a.layers, "rounds": a.rounds, "rows": results},
                                  indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
