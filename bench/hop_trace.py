#!/usr/bin/env python
"""Where a pipeline token's time goes: a timestamp trace of every hop, from `splitllm serve`'s processes.

    python bench/hop_trace.py                          # stages as serve starts them, 200 greedy tokens
    python bench/hop_trace.py --stage-threads 1 --no-spin
    python bench/hop_trace.py --ttft 20                # 20 calls of max_tokens=1: where a TTFT goes

Starts the pipeline with SPLITLLM_TRACE_DIR set (services/common/trace.py), generates --tokens greedy
tokens after a 32-token prompt, and lines up the events of each decode step across the five processes
(one CLOCK_MONOTONIC for the host). Prints the median of every gap along a step, grouped into stage
compute, Python around the runs, hand-offs to gRPC's sending thread, transport, and the coordinator;
writes bench/results/hop_trace.json. With --ttft N it makes N calls of max_tokens=1 instead, times each
at the client too, and lines up every event inside each call, from the client's call to its first (and
only) message (bench/results/hop_trace_ttft.json). Figures, never pass/fail.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "hop_trace.json"
KIND = {  # (event, next event) -> what the gap is
    ("submitted", "sent"): "hand-off", ("handed_off", "sent"): "hand-off",
    ("sent", "received"): "transport", ("answered", "answer_in"): "transport",
    ("received", "run"): "python", ("ran", "handed_off"): "python", ("handed_off", "answered"): "hand-off",
    ("run", "ran"): "compute", ("answer_in", "answer_taken"): "coordinator",
    ("call", "submitted"): "call", ("answer_taken", "got"): "reply",
}


def load(trace_dir: Path) -> dict[int, list[tuple[int, int, str]]]:
    steps: dict[int, list[tuple[int, int, str]]] = collections.defaultdict(list)
    for f in trace_dir.glob("*.txt"):
        pid = int(f.stem)
        for line in f.read_text().splitlines():
            step, name, ns = line.split()
            steps[int(step)].append((int(ns), pid, name))
    return {s: sorted(e) for s, e in steps.items() if s}


def process_names(events: list[tuple[int, int, str]]) -> dict[int, str]:
    """pid -> "coordinator" (it submits steps) or "stage k", k in the order the stages first run in `events`
    (time-ordered)."""
    names = {next(pid for _, pid, name in events if name == "submitted"): "coordinator"}
    for _, pid, name in events:
        if name == "run" and pid not in names:
            names[pid] = f"stage {len(names)}"
    return names


def analyse(steps: dict[int, list[tuple[int, int, str]]]) -> dict:
    ids = sorted(steps)[2:-2]  # the edges: warm-up overlap and the final step
    names = process_names(steps[ids[len(ids) // 2]])
    seqs = {s: [(ns, f"{names.get(pid, '?')}:{name}") for ns, pid, name in steps[s]] for s in ids}
    rows, matched = line_up(list(seqs.values()))
    taken = {s: ns for s, seq in seqs.items() for ns, label in seq if label.endswith(":answer_taken")}
    submitted = {s: ns for s, seq in seqs.items() for ns, label in seq if label.endswith(":submitted")}
    between = [(submitted[s + 1] - taken[s]) / 1000 for s in ids if s in taken and s + 1 in submitted]
    rows.append({"from": "coordinator:answer_taken", "to": "coordinator:submitted (next step)",
                 "kind": "coordinator", "median_us": statistics.median(between)})
    kinds = by_kind(rows)
    steps_ns = sorted(submitted.values())
    per_token = statistics.median(b - a for a, b in zip(steps_ns, steps_ns[1:], strict=False)) / 1000
    return {"steps": len(ids), "matched": matched, "rows": rows, "by_kind_us": kinds,
            "sum_of_medians_us": sum(kinds.values()), "median_step_interval_us": per_token}


def line_up(seqs: list[list[tuple[int, str]]]) -> tuple[list[dict], int]:
    """The median of every gap along the most common event order, over the sequences that follow it; rows in that
    order, and how many sequences followed it."""
    shape = collections.Counter(tuple(label for _, label in seq) for seq in seqs).most_common(1)[0][0]
    gaps: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for seq in seqs:
        if tuple(label for _, label in seq) == shape:
            for (a_ns, a), (b_ns, b) in zip(seq, seq[1:], strict=False):
                gaps[(a, b)].append((b_ns - a_ns) / 1000)
    rows = [{"from": a, "to": b, "kind": KIND.get((a.split(":")[1], b.split(":")[1]), "other"),
             "median_us": statistics.median(v)} for (a, b), v in gaps.items()]
    rows.sort(key=lambda r: shape.index(r["from"]))
    return rows, len(next(iter(gaps.values())))


def by_kind(rows: list[dict]) -> dict[str, float]:
    kinds: dict[str, float] = collections.defaultdict(float)
    for r in rows:
        kinds[r["kind"]] += r["median_us"]
    return dict(kinds)


def analyse_calls(steps: dict[int, list[tuple[int, int, str]]], calls: list[tuple[int, int]]) -> dict:
    """Every event inside each client call (t_call, t_got), lined up call by call: the gaps of a TTFT."""
    events = sorted(e for es in steps.values() for e in es)
    names = process_names(events)
    seqs = []
    for t0, t1 in calls:
        inside = [(ns, f"{names.get(pid, '?')}:{name}") for ns, pid, name in events if t0 <= ns <= t1]
        seqs.append([(t0, "client:call"), *inside, (t1, "client:got")])
    rows, matched = line_up(seqs)
    kinds = by_kind(rows)
    return {"calls": len(calls), "matched": matched, "rows": rows, "by_kind_us": kinds,
            "sum_of_medians_us": sum(kinds.values()),
            "median_ttft_us": statistics.median((t1 - t0) / 1000 for t0, t1 in calls)}


def trace_ttft(client, calls: int, prompt: list[int], gap: float) -> list[tuple[int, int]]:
    """`calls` calls of max_tokens=1, `gap` s apart; each one's (start, first message) on CLOCK_MONOTONIC."""
    out = []
    for _ in range(calls):
        time.sleep(gap)
        t0 = time.monotonic_ns()
        for _ in client.stream(token_ids=prompt, max_tokens=1):
            pass
        out.append((t0, time.monotonic_ns()))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", default="artifacts/smollm2", help="exported with `splitllm export`")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--stage-threads", type=int, help="default: splitllm serve's (launcher.STAGE_THREADS)")
    ap.add_argument("--spin", action=argparse.BooleanOptionalAction, default=None,
                    help="stages' threads spin within a step or sleep (default: as splitllm serve starts them)")
    ap.add_argument("--ttft", type=int, metavar="CALLS", help="trace CALLS calls of max_tokens=1 instead")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="--ttft: prompt length (tokens of ppl_text.txt)")
    ap.add_argument("--gap", type=float, default=0.0, help="--ttft: seconds between calls (0: back to back)")
    ap.add_argument("--out", help="default bench/results/hop_trace.json, or hop_trace_ttft.json with --ttft")
    a = ap.parse_args()
    a.out = a.out or str(RESULTS.with_name("hop_trace_ttft.json") if a.ttft else RESULTS)
    trace_dir = Path(tempfile.mkdtemp(prefix="splitllm-trace-"))
    os.environ["SPLITLLM_TRACE_DIR"] = str(trace_dir)  # before anything is imported or started

    from splitllm.bench.runtimes import free_port_block
    from splitllm.services.client.client import Client
    from splitllm.services.client.launcher import STAGE_THREADS, Pipeline

    base = free_port_block(5)
    a.stage_threads = a.stage_threads or STAGE_THREADS
    # one token a step: the breakdown is of a token step (a speculative step's rows cost more compute, the same hops)
    processes = Pipeline(a.artifacts, base_port=base, coordinator_port=base + 4, metrics_base=None,
                         stage_threads=a.stage_threads, stage_spin=a.spin,
                         extra_coordinator_args=["--draft-tokens", "0"]).start()
    a.spin = processes.stage_spin
    try:
        with Client(processes.coordinator.address) as client:
            prompt = list(range(100, 132))
            if a.ttft:
                from splitllm.bench.suite import reference_tokens

                prompt = reference_tokens(a.artifacts)[: a.prompt_tokens]  # the bench's prompt of that length
            for _ in range(3 if a.ttft else 1):  # warm-up
                for _ in client.stream(token_ids=prompt, max_tokens=32):
                    pass
            for f in trace_dir.glob("*.txt"):
                f.write_text("")
            if a.ttft:
                calls = trace_ttft(client, a.ttft, prompt, a.gap)
            else:
                n = sum(len(m.token_ids) for m in client.stream(token_ids=prompt, max_tokens=a.tokens))
    finally:
        processes.stop()
    if a.ttft:
        result = analyse_calls(load(trace_dir), calls)
        result.update(prompt_tokens=len(prompt), gap=a.gap)
        print(f"{a.ttft} calls of max_tokens=1, {len(prompt)}-token prompt; {result['matched']} have the usual "
              f"event order; median TTFT at the client {result['median_ttft_us'] / 1000:.2f} ms")
    else:
        result = analyse(load(trace_dir))
        result.update(tokens=n)
        print(f"{n} tokens; {result['matched']} of {result['steps']} steps have the usual event order")
    result.update(stage_threads=a.stage_threads, spin=a.spin, artifacts=a.artifacts)
    for r in result["rows"]:
        print(f"  {r['from']:>26s} -> {r['to']:<36s} {r['kind']:>12s} {r['median_us']:8.1f} us")
    print("by kind: " + ", ".join(f"{k} {v / 1000:.2f} ms" for k, v in result["by_kind_us"].items()))
    print(f"sum of medians {result['sum_of_medians_us'] / 1000:.2f} ms"
          + ("" if a.ttft else f"; median step interval {result['median_step_interval_us'] / 1000:.2f} ms"))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
