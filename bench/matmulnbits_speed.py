#!/usr/bin/env python
"""MatMulNBits speed on CPU: which weight layout should the CPU graphs use?

    python bench/matmulnbits_speed.py            # table + bench/results/matmulnbits_speed.json
    python bench/matmulnbits_speed.py --quick    # fewer repeats
    python bench/matmulnbits_speed.py --threads 1 --cpu-clock   # steady figures on a busy machine

SmolLM2 shapes (K=576/N=1536 gate|up, K=1536/N=576 down, K=576/N=960 fused QKV), M=1 (a decode step)
and M=128 (a prefill chunk), intra-op threads 2 and 1. Variants, each at accuracy_level 0 (fp32 compute)
and 4 (int8 activations):
  q4         4-bit, no zero points (the op's default 8)      q4_zp_u8   uint8 zero points (packed)
  q4_zp_f32  float zero points                               q8         8-bit, no zero points (128)
  q4_off     q4 + blocksum(x) @ block_offsets (Reshape, ReduceSum, MatMul, Add: the exact Q4_1 term)
  fp32       plain MatMul with dense weights, for scale
Each graph holds 8 independent copies of the layer on one input, so per-run overhead is amortised and
the weights are not all cache-resident; the figures are microseconds per layer, median (min) of the
repeats, the variants taking turns so that load from other processes falls on all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from splitllm.export.quantize import NBitsWeight, quantize

RESULTS = Path(__file__).resolve().parent / "results" / "matmulnbits_speed.json"
SHAPES = [(576, 1536), (1536, 576), (576, 960)]  # (K, N)
COPIES = 8
VARIANTS = ["fp32", "q4", "q4_zp_u8", "q4_zp_f32", "q8", "q4_off"]


def layer(i: int, variant: str, w: np.ndarray, level: int) -> tuple[list, list]:
    """Nodes and initializers computing y{i} = x @ w.T in the given layout."""
    n, k = w.shape
    p = f"l{i}."
    if variant == "fp32":
        wt = numpy_helper.from_array(np.ascontiguousarray(w.T), p + "w")
        return [helper.make_node("MatMul", ["x", wt.name], [f"y{i}"])], [wt]
    q: NBitsWeight = quantize(w, 8 if variant == "q8" else 4)
    inits = [numpy_helper.from_array(q.packed, p + "B"), numpy_helper.from_array(q.scales.reshape(-1), p + "s")]
    if variant == "q4_zp_u8":
        inits.append(numpy_helper.from_array(q.zero_points.reshape(-1), p + "zp"))
    elif variant == "q4_zp_f32":
        zp = np.stack([q.zero_points & 15, q.zero_points >> 4], -1).reshape(n, -1)[:, : k // 32]
        inits.append(numpy_helper.from_array(zp.astype(np.float32).reshape(-1), p + "zp"))
    out = p + "mm" if variant == "q4_off" else f"y{i}"
    nodes = [
        helper.make_node(
            "MatMulNBits",
            ["x"] + [t.name for t in inits],
            [out],
            domain="com.microsoft",
            K=k,
            N=n,
            bits=q.bits,
            block_size=q.block_size,
            accuracy_level=level,
        )
    ]
    if variant == "q4_off":
        offsets = numpy_helper.from_array(np.random.default_rng(i).standard_normal((k // 32, n), np.float32), p + "off")
        inits.append(offsets)
        nodes += [
            helper.make_node("Reshape", ["x", "blocks"], [p + "xb"]),
            helper.make_node("ReduceSum", [p + "xb", "last"], [p + "bsum"], keepdims=0),
            helper.make_node("MatMul", [p + "bsum", offsets.name], [p + "o"]),
            helper.make_node("Add", [out, p + "o"], [f"y{i}"]),
        ]
    return nodes, inits


def session(variant: str, k: int, n: int, level: int, threads: int) -> ort.InferenceSession:
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    if variant == "q4_off":
        inits += [
            numpy_helper.from_array(np.array([0, 0, k // 32, 32], np.int64), "blocks"),
            numpy_helper.from_array(np.array([-1], np.int64), "last"),
        ]
    for i in range(COPIES):
        nd, it = layer(i, variant, (rng.standard_normal((n, k)) * 0.02).astype(np.float32), level)
        nodes += nd
        inits += it
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, k])
    ys = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, None, n]) for i in range(COPIES)]
    graph = helper.make_graph(nodes, variant, [x], ys, inits)
    model = helper.make_model(
        graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def time_us(
    sessions: dict[str, ort.InferenceSession], x: np.ndarray, repeats: int, budget_s: float, clock=time.perf_counter
) -> dict[str, tuple[float, float]]:
    """(median, min) per session of the mean time per layer over repeats of ~budget_s each.

    The sessions take turns within each repeat, so load from other processes hits them alike."""
    loops = {}
    for c, sess in sessions.items():
        for _ in range(3):
            sess.run(None, {"x": x})
        t0 = clock()
        sess.run(None, {"x": x})
        loops[c] = max(1, int(budget_s / max(clock() - t0, 1e-6)))
    samples: dict[str, list[float]] = {c: [] for c in sessions}
    for _ in range(repeats):
        for c, sess in sessions.items():
            t0 = clock()
            for _ in range(loops[c]):
                sess.run(None, {"x": x})
            samples[c].append((clock() - t0) / loops[c] / COPIES * 1e6)
    return {c: (statistics.median(v), min(v)) for c, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5 repeats instead of 15 (each ~5 ms)")
    ap.add_argument("--threads", default="2,1", help="intra-op thread counts, comma separated")
    ap.add_argument(
        "--cpu-clock",
        action="store_true",
        help="time 1-thread runs by the thread's CPU time (steady on a loaded machine: ORT computes on the "
        "calling thread then)",
    )
    args = ap.parse_args()
    repeats, budget = (5 if args.quick else 15), 0.005
    cols = ["fp32"] + [f"{v}/{lv}" for v in VARIANTS[1:] for lv in (0, 4)]
    rows = []
    print(f"onnxruntime {ort.__version__}; us per layer, median (min) of {repeats}; columns: variant/accuracy_level")
    print(f"{'K':>5} {'N':>5} {'M':>4} {'thr':>3} " + " ".join(f"{c:>13}" for c in cols))
    for threads in map(int, args.threads.split(",")):
        for k, n in SHAPES:
            sessions = {
                c: session(c.split("/")[0], k, n, int(c.split("/")[1]) if "/" in c else 0, threads) for c in cols
            }
            for m in (1, 128):
                x = np.random.default_rng(1).standard_normal((1, m, k)).astype(np.float32)
                clock = time.thread_time if args.cpu_clock and threads == 1 else time.perf_counter
                t = time_us(sessions, x, repeats, budget, clock)
                rows.append(
                    {
                        "K": k,
                        "N": n,
                        "M": m,
                        "threads": threads,
                        "us_median": {c: round(v[0], 1) for c, v in t.items()},
                        "us_min": {c: round(v[1], 1) for c, v in t.items()},
                    }
                )
                print(
                    f"{k:>5} {n:>5} {m:>4} {threads:>3} "
                    + " ".join(f"{f'{v[0]:.0f}({v[1]:.0f})':>13}" for v in t.values()),
                    flush=True,
                )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "onnxruntime": ort.__version__,
                "cpu": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(),
                "load_avg": os.getloadavg(),
                "copies_per_graph": COPIES,
                "repeats": repeats,
                "unit": "microseconds per layer",
                "clock": "thread CPU time for 1 thread" if args.cpu_clock else "wall",
                "rows": rows,
            },
            indent=1,
        )
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
