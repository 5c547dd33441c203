#!/usr/bin/env python
"""Our Attention op (services/stage/cpu_attention.c) against ONNX Runtime's GroupQueryAttention, the op it replaced.

    python bench/attention_speed.py                 # table + bench/results/attention_speed.json
    python bench/attention_speed.py --rounds 10 --threads 1

One attention node of SmolLM2's heads (9 query heads, 3 kv heads, head size 64) and of Llama 3 8B's (32, 8, 128),
context 2048, the KV cache bound in place as a stage binds it, under serve's session settings: one-row decode steps at
positions 160, 600 and 1000, and the eight 128-row chunks of a 1024-token prompt (their sum: one layer's attention of
such a prompt). The two ops take turns, the order alternating by round; figures are medians in microseconds. The
graphs around GroupQueryAttention reshape its rows as the CPU graphs did. Figures, never pass/fail.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from splitllm.services.stage.runtime import session_options

RESULTS = Path(__file__).resolve().parent / "results" / "attention_speed.json"
OPS = ("Attention", "GroupQueryAttention")
KV_DTYPE = {"Attention": np.float16, "GroupQueryAttention": np.float32}  # as the CPU graphs of each bind them
HEADS = {"smollm2": (9, 3, 64), "llama3-8b": (32, 8, 128)}  # (num_heads, kv_num_heads, head_dim)


def tables(d: int, context: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """Rotary cos and sin [context, d / 2]."""
    angle = np.outer(np.arange(context), theta ** -(np.arange(0, d, 2) / d))
    return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def model(op: str, h: int, g: int, d: int, context: int) -> bytes:
    """One attention node over rows qkv [B*S, (h + 2g) d] -> y [B*S, h d]; GroupQueryAttention gets the [B, S, ...]
    reshapes around it that the CPU graphs had. Our cache is float16, GroupQueryAttention's float32 (KV_DTYPE)."""
    f, cache = TensorProto.FLOAT, helper.np_dtype_to_tensor_dtype(np.dtype(KV_DTYPE[op]))
    ins = [helper.make_tensor_value_info("qkv", f, [None, None]),
           helper.make_tensor_value_info("past_key", cache, [None, g, context, d]),
           helper.make_tensor_value_info("past_value", cache, [None, g, context, d]),
           helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [None]),
           helper.make_tensor_value_info("total", TensorProto.INT32, []),
           helper.make_tensor_value_info("cos", f, [context, d // 2]),
           helper.make_tensor_value_info("sin", f, [context, d // 2])]
    outs = [helper.make_tensor_value_info("y", f, None), helper.make_tensor_value_info("present_key", cache, None),
            helper.make_tensor_value_info("present_value", cache, None)]
    kv = ["past_key", "past_value", "seqlens_k"]
    if op == "Attention":
        nodes = [helper.make_node("Attention", ["qkv", *kv, "cos", "sin"], ["y", "present_key", "present_value"],
                                  domain="ai.splitllm", num_heads=h, kv_num_heads=g)]
    else:
        def const(name: str, values: list[int]) -> helper.NodeProto:
            return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64,
                                                                                     [len(values)], values))
        nodes = [
            helper.make_node("Shape", ["seqlens_k"], ["b"]),
            const("rest", [-1, (h + 2 * g) * d]),
            helper.make_node("Concat", ["b", "rest"], ["shape"], axis=0),
            helper.make_node("Reshape", ["qkv", "shape"], ["qkv3"]),
            helper.make_node("GroupQueryAttention", ["qkv3", "", "", *kv, "total", "cos", "sin"],
                             ["y3", "present_key", "present_value"], domain="com.microsoft", num_heads=h,
                             kv_num_heads=g, do_rotary=1, rotary_interleaved=0),
            const("flat", [-1, h * d]),
            helper.make_node("Reshape", ["y3", "flat"], ["y"]),
        ]
    graph = helper.make_graph(nodes, op, ins, outs)
    opsets = [helper.make_opsetid(domain, 1) for domain in ("ai.splitllm", "com.microsoft")]
    opsets.append(helper.make_opsetid("", 17))
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def bound_run(session: ort.InferenceSession, feed: dict[str, np.ndarray]) -> ort.IOBinding:
    """An I/O binding as a stage makes it: past and present KV one buffer."""
    b = session.io_binding()
    for name in ("past_key", "past_value"):
        value = ort.OrtValue.ortvalue_from_numpy(feed[name])
        b.bind_ortvalue_input(name, value)
        b.bind_ortvalue_output(name.replace("past_", "present_"), value)
    for name in ("qkv", "seqlens_k", "total", "cos", "sin"):
        b.bind_cpu_input(name, feed[name])
    b.bind_output("y")
    return b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=2048)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    results: dict[str, dict[str, dict[str, float]]] = {}
    print(f"microseconds, median of {a.rounds} rounds; {a.threads} threads; context {a.context}")
    for model_name, (h, g, d) in HEADS.items():
        sessions = {op: ort.InferenceSession(model(op, h, g, d, a.context), session_options(a.threads, spin=True),
                                             providers=["CPUExecutionProvider"]) for op in OPS}
        cos, sin = tables(d, a.context)
        kv = rng.normal(0, 1, (2, 1, g, a.context, d))
        caches = {op: kv.astype(KV_DTYPE[op]) for op in OPS}  # each op's, shared by a prompt's chunks
        cases = [(f"decode at {p}", [(p, 1)]) for p in (160, 600, 1000)]
        cases.append(("1024-token prompt", [(127 + 128 * i, 128) for i in range(8)]))
        rows = results[model_name] = {}
        for label, steps in cases:
            bindings = []
            for last, n in steps:
                feed = {"qkv": rng.normal(0, 1, (n, (h + 2 * g) * d)).astype(np.float32),
                        "seqlens_k": np.array([last], np.int32), "total": np.array(last + 1, np.int32), "cos": cos,
                        "sin": sin}
                bindings.append({op: bound_run(s, {**feed, "past_key": caches[op][0], "past_value": caches[op][1]})
                                 for op, s in sessions.items()})
            times: dict[str, list[float]] = {op: [] for op in OPS}
            for r in range(a.rounds):
                for op in OPS if r % 2 == 0 else OPS[::-1]:
                    t0 = time.perf_counter()
                    for b in bindings:
                        sessions[op].run_with_iobinding(b[op])
                    times[op].append(time.perf_counter() - t0)
            med = {op: statistics.median(t) * 1e6 for op, t in times.items()}
            rows[label] = {"ours_us": med["Attention"], "gqa_us": med["GroupQueryAttention"]}
            print(f"  {model_name:10s} {label:18s} ours {med['Attention']:9.1f}   GroupQueryAttention "
                  f"{med['GroupQueryAttention']:9.1f}   {med['GroupQueryAttention'] / med['Attention']:5.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rounds": a.rounds, "threads": a.threads, "context": a.context,
                                   "results": results}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
