#!/usr/bin/env python
"""Same-run A/B of two process environments: the stage graphs in two processes that take turns.

    python bench/env_ab.py --artifacts artifacts/smollm2-ctx2048                      # huge pages off / on
    python bench/env_ab.py --b GLIBC_TUNABLES=glibc.malloc.arena_max=2 --stage 4 --rounds 20

Settings that a process reads when it starts (glibc tunables, allocator and thread-pool variables) cannot be
A/B'd inside one process. This starts one child per environment (this process's, plus --a or --b NAME=VALUE,
repeatable; by default A has huge pages off and B on), each loading the in-process chain of all stages (or one
stage with --stage K), and has them take turns: in each round each child runs a 32-token prompt, 50 decode
steps and a 512-token prompt (one stage: a 128-row chunk), the order alternating by round, and reports its
peak RSS. On a noisy host the pairs share the noise; the table gives each side's median and in how many
rounds B's figure was the lower. Writes bench/results/env_ab.json. Figures, never pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from splitllm.bench.runtimes import peak_rss
from splitllm.services.client.launcher import HUGE_PAGES

RESULTS = Path(__file__).resolve().parent / "results" / "env_ab.json"
FIGURES = ("prompt_32_ms", "decode_us", "prompt_long_ms", "peak_rss_mb")


def child(artifacts: str, stage: int) -> None:
    """A side of the A/B: load, say "ready", then one line of figures per line read."""
    import numpy as np

    from splitllm.services.common.manifest import load_manifest
    from splitllm.services.stage.chain import LocalChain
    from splitllm.services.stage.kv import KVPool
    from splitllm.services.stage.runtime import CpuGraph

    manifest, _ = load_manifest(artifacts, verify=[])
    cfg, rng = manifest.model, np.random.default_rng(0)
    if stage:
        plan = manifest.stages[stage - 1]
        g = plan.graph("cpu", "pp")
        graph = CpuGraph(Path(artifacts) / g.file, 2, g.outputs[0].name, spin=True)
        kv = KVPool(range(plan.first_layer, plan.last_layer), cfg.num_kv_heads, manifest.context_length,
                    cfg.head_dim, capacity=2, dtype=graph.kv_dtype)
        rows, long = 32 + 50 + manifest.prefill_length, manifest.prefill_length
        x = (rng.integers(0, cfg.vocab_size, rows, dtype=np.int32) if plan.has_embedding
             else rng.standard_normal((rows, cfg.hidden_size)).astype(np.float32))

        def run(sid: str, position: int, n: int) -> None:
            s = kv.sessions.get(sid) or kv.create(sid)
            graph.run(kv, s.slot, x[position : position + n], np.array([position + n - 1], np.int32))

        release = kv.release
    else:
        chain = LocalChain(artifacts, kv_capacity=2, threads=2, spin=True)
        long = 512
        ids = rng.integers(0, cfg.vocab_size, 32 + 50 + long).astype(np.int32)

        def run(sid: str, position: int, n: int) -> None:
            for p in range(position, position + n, chain.prefill):  # chunks of the prefill length
                chain.step(sid, p, ids[p : min(p + chain.prefill, position + n)])

        release = chain.release
    print("ready", flush=True)
    clock = time.perf_counter
    for n, _ in enumerate(sys.stdin):
        sid = f"s{n}"
        t0 = clock()
        run(sid, 0, 32)
        t1 = clock()
        steps = []
        for p in range(32, 82):
            t = clock()
            run(sid, p, 1)
            steps.append(clock() - t)
        t2 = clock()
        run(sid, 82, long)
        t3 = clock()
        release(sid)
        figures = [(t1 - t0) * 1e3, statistics.median(steps) * 1e6, (t3 - t2) * 1e3, peak_rss() / 2**20]
        print(json.dumps(figures), flush=True)


def compare(name: str, xa: list[float], xb: list[float]) -> dict:
    """Side A's and B's medians of one figure, sampled in the same rounds; the median of the rounds' B/A ratios (the
    two sides of a round share its minute of the host, so the paired ratio resolves finer than the two medians);
    and in how many rounds B's was the lower. Prints them as a line of the table."""
    ma, mb = statistics.median(xa), statistics.median(xb)
    paired = statistics.median(vb / va for va, vb in zip(xa, xb, strict=True))
    wins = sum(vb < va for va, vb in zip(xa, xb, strict=True))
    print(f"  {name:15s} A {ma:9.2f}  B {mb:9.2f}  {mb / ma - 1:+6.1%}  paired {paired - 1:+6.1%}  "
          f"(B lower in {wins}/{len(xa)} rounds)")
    return {"A": ma, "B": mb, "change": mb / ma - 1, "paired_change": paired - 1, "b_lower_rounds": wins}


def environment(pairs: list[str]) -> dict[str, str]:
    env = dict(os.environ)
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"--a/--b take NAME=VALUE, got {pair!r}")
        env[name] = value
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", default="artifacts/smollm2-ctx2048")
    ap.add_argument("--a", action="append", default=None, help="NAME=VALUE for side A (default: huge pages off)")
    ap.add_argument("--b", action="append", default=None, help=f"NAME=VALUE for side B (default: {HUGE_PAGES})")
    ap.add_argument("--stage", type=int, default=0, help="1-based; 0 (default): the chain of every stage")
    ap.add_argument("--rounds", type=int, default=14)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.artifacts, a.stage)
    sides = {"A": a.a or ["GLIBC_TUNABLES=glibc.malloc.hugetlb=0"], "B": a.b or [f"GLIBC_TUNABLES={HUGE_PAGES}"]}
    cmd = [sys.executable, __file__, "--child", "--artifacts", a.artifacts, "--stage", str(a.stage)]
    kids = {s: subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=environment(e))
            for s, e in sides.items()}
    try:
        for s, k in kids.items():
            if k.stdout.readline().strip() != "ready":
                raise SystemExit(f"side {s} did not start (exit code {k.wait()})")
        samples: dict[str, list[list[float]]] = {s: [] for s in kids}
        for r in range(a.rounds):
            for s in ("A", "B") if r % 2 == 0 else ("B", "A"):
                kids[s].stdin.write("go\n")
                kids[s].stdin.flush()
                samples[s].append(json.loads(kids[s].stdout.readline()))
    finally:
        for k in kids.values():
            k.kill()
            k.wait()
    what = f"stage {a.stage}" if a.stage else "chain"
    print(f"{what}, {a.rounds} rounds; A: {' '.join(sides['A'])}; B: {' '.join(sides['B'])}")
    summary = {name: compare(name, [x[i] for x in samples["A"]], [x[i] for x in samples["B"]])
               for i, name in enumerate(FIGURES)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"what": what, "rounds": a.rounds, "sides": sides, "medians": summary,
                                   "samples": samples, "figures": FIGURES}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
