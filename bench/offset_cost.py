#!/usr/bin/env python
"""What the exact Q4_1 offset term costs a stage: its CPU graph as exported against two variants without it.

    python bench/offset_cost.py --artifacts artifacts/smollm2-ctx2048             # stage 2, 2 threads
    python bench/offset_cost.py --artifacts artifacts/smollm2-ctx2048 --stage 4 --threads 1

GGUF Q4_1 weights are d * q + m per block; MatMulNBits has no fast kernel for the m term, so the export adds it
exactly: each MatMulNBits also returns the input's block sums, and a Split and a Gemm add blocksum(x) @
block_offsets (export/quantize.py). The variants, timing only (their outputs are not the model's):
  exported        the graph as the stage runs it
  no_gemm         the Gemms dropped (the Splits and the block-sum columns kept)
  no_offsets      plain 4-bit MatMulNBits: no block-sum columns, Split or Gemm
Each variant runs a 64-token prompt, then --steps decode steps (their median is a sample) and one 128-row chunk;
the variants take turns --reps times, so load from other processes falls on all of them alike. Prints medians
and writes bench/results/offset_cost.json. Figures, never pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from splitllm.services.common.manifest import load_manifest
from splitllm.services.stage.kv import KVPool
from splitllm.services.stage.runtime import CpuGraph

RESULTS = Path(__file__).resolve().parent / "results" / "offset_cost.json"
VARIANTS = ("exported", "no_gemm", "no_offsets")


def without_offsets(model: onnx.ModelProto, variant: str) -> None:
    """Rewrite `model` in place into `variant`."""
    if variant == "exported":
        return
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    rename: dict[str, str] = {}
    drop: list[onnx.NodeProto] = []
    for gemm in [n for n in g.node if n.op_type == "Gemm" and n.input[1].endswith("block_offsets")]:
        split = producer[gemm.input[0]]  # Split(matmul) -> (main, block sums); Gemm(block sums, offsets, C=main)
        drop.append(gemm)
        if variant == "no_gemm":
            rename[gemm.output[0]] = gemm.input[2]
            continue
        mm = producer[split.input[0]]
        attrs = {a.name: a for a in mm.attribute}
        blocks = attrs["K"].i // attrs["block_size"].i
        n = attrs["N"].i - blocks  # the block-sum rows come last
        packed, scales = inits[mm.input[1]], inits[mm.input[2]]
        packed.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(packed)[:n], packed.name))
        s = numpy_helper.to_array(scales).reshape(n + blocks, -1)[:n]
        scales.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(s).reshape(-1), scales.name))
        attrs["N"].i = n
        rename[gemm.output[0]] = mm.output[0]
        drop.append(split)
    for node in drop:
        g.node.remove(node)
    for node in g.node:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
    used = {name for node in g.node for name in node.input}
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)


def build(artifacts: Path, stage: int, out_dir: Path) -> dict[str, Path]:
    """The variants of stage `stage` (0-based) as ONNX files in out_dir."""
    manifest, _ = load_manifest(artifacts, verify=[])
    src = artifacts / manifest.stages[stage].graph("cpu", "pp").file
    paths = {}
    for v in VARIANTS:
        model = onnx.load(str(src))  # with its external weights
        without_offsets(model, v)
        paths[v] = out_dir / f"{v}.onnx"
        onnx.save(model, str(paths[v]), save_as_external_data=True, location=f"{v}.weights")
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", default="artifacts/smollm2-ctx2048")
    ap.add_argument("--stage", type=int, default=2, help="1-based")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-spin", dest="spin", action="store_false", help="(default: spin, as serve's stages)")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--steps", type=int, default=80)
    a = ap.parse_args()
    artifacts, k = Path(a.artifacts), a.stage - 1
    manifest, _ = load_manifest(artifacts, verify=[])
    plan, cfg = manifest.stages[k], manifest.model
    output = plan.graph("cpu", "pp").outputs[0].name
    rng = np.random.default_rng(0)
    rows = 64 + a.steps + manifest.prefill_length
    x = (rng.integers(0, cfg.vocab_size, rows, dtype=np.int32) if plan.has_embedding
         else rng.standard_normal((rows, cfg.hidden_size)).astype(np.float32))
    samples: dict[str, dict[str, list[float]]] = {v: {"decode_us": [], "chunk_ms": []} for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        graphs = {v: CpuGraph(p, a.threads, output, a.spin) for v, p in build(artifacts, k, Path(tmp)).items()}
        layers = range(plan.first_layer, plan.last_layer)
        kv = KVPool(layers, cfg.num_kv_heads, manifest.context_length, cfg.head_dim, capacity=1)
        for _ in range(a.reps):
            for v, graph in graphs.items():
                s = kv.create(v)
                graph.run(kv, s.slot, x[:64], np.array([63], np.int32))
                steps = []
                for i in range(64, 64 + a.steps):
                    t0 = time.perf_counter()
                    graph.run(kv, s.slot, x[i : i + 1], np.array([i], np.int32))
                    steps.append(time.perf_counter() - t0)
                samples[v]["decode_us"].append(statistics.median(steps) * 1e6)
                n, p = 64 + a.steps, manifest.prefill_length
                t0 = time.perf_counter()
                graph.run(kv, s.slot, x[n : n + p], np.array([n + p - 1], np.int32))
                samples[v]["chunk_ms"].append((time.perf_counter() - t0) * 1e3)
                kv.release(v)
    med = {v: {f: statistics.median(s) for f, s in fs.items()} for v, fs in samples.items()}
    base = med["exported"]
    print(f"stage {a.stage} (layers {plan.first_layer}..{plan.last_layer - 1}), {a.threads} thread(s)"
          f"{', spinning' if a.spin else ''}; medians of {a.reps} turns")
    chunk = f"{manifest.prefill_length}-row chunk"
    print(f"{'variant':12s} {'decode step':>14s} {'share':>7s} {chunk:>16s} {'share':>7s}")
    for v in VARIANTS:
        d, c = med[v]["decode_us"], med[v]["chunk_ms"]
        print(f"{v:12s} {d:11.0f} us {1 - d / base['decode_us']:7.1%} {c:13.1f} ms {1 - c / base['chunk_ms']:7.1%}")
    print("share: what the variant takes off the exported graph's time")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "stage": a.stage, "threads": a.threads, "spin": a.spin, "reps": a.reps, "steps": a.steps,
        "onnxruntime": ort.__version__, "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "medians": med, "samples": samples}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
