#!/usr/bin/env python
"""Same-run A/B of two pipelines: `splitllm serve`'s five processes twice, taking turns.

    python bench/pipeline_ab.py --artifacts artifacts/smollm2-ctx2048            # huge pages off (A) / on (B)
    python bench/pipeline_ab.py --a X=1 --b-python /tmp/vb/bin/python            # this checkout against another
    python bench/pipeline_ab.py --a X=1 --a-artifacts OLD --b-artifacts NEW      # two exports
    python bench/pipeline_ab.py --b PYTHONMALLOC=malloc --rounds 20
    python bench/pipeline_ab.py --a X=1 --sampled                                # temperature 0.7, top_p 0.9

On this project's noisy 2-core hosts a change to the serving path moves TPOT by less than the host moves it
from minute to minute, so two full `splitllm bench` runs cannot tell it. Here two bench runners
(bench/runner.py) each start a pipeline of their own on free ports and stay up; round after round, in turns
whose order alternates, each answers a 32-token prompt (--prompt-tokens) with max_tokens=1 (TTFT at the client)
and then generates --tokens greedy tokens after it (TPOT). Each side has its own environment (this process's plus
NAME=VALUE pairs, repeatable; the stages get it through the launcher) and may run another interpreter
(--a-python / --b-python: a venv whose editable install is another checkout, for a same-run code A/B).
Prints each side's medians, the median of the rounds' B/A ratios, in how many rounds B's figure was the lower,
and each side's peak RSS; writes bench/results/pipeline_ab.json. Figures, never pass/fail.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from splitllm.bench.env_ab import compare, environment
from splitllm.bench.suite import Child, reference_tokens

RESULTS = Path(__file__).resolve().parent / "results" / "pipeline_ab.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", default="artifacts/smollm2-ctx2048")
    ap.add_argument("--a", action="append", default=None,
                    help="NAME=VALUE for side A (default: GLIBC_TUNABLES=glibc.malloc.hugetlb=0, huge pages off)")
    ap.add_argument("--b", action="append", default=None, help="NAME=VALUE for side B (default: none)")
    ap.add_argument("--a-artifacts", help="side A's artifact directory (default: --artifacts)")
    ap.add_argument("--b-artifacts", help="side B's artifact directory (default: --artifacts): an export A/B")
    ap.add_argument("--a-python", default=sys.executable)
    ap.add_argument("--b-python", default=sys.executable)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens a round (TPOT)")
    ap.add_argument("--prompt-tokens", type=int, default=32,
                    help="the prompt's tokens (of ppl_text.txt), for TTFT and before the generated tokens")
    ap.add_argument("--no-spin", dest="spin", action="store_false", help="(default: spin, as serve's stages)")
    ap.add_argument("--one-token-a-step", dest="call", action="store_const", const="generate_plain",
                    default="generate", help="generate through a coordinator that does not speculate (a side that "
                    "runs a checkout from before speculative decoding has no such call: use its default there)")
    ap.add_argument("--sampled", dest="call", action="store_const", const="generate_sampled",
                    help="sampled tokens (bench/report.py's SAMPLED: temperature 0.7, top_p 0.9) instead of greedy")
    a = ap.parse_args()
    sides = {"A": a.a if a.a is not None else ["GLIBC_TUNABLES=glibc.malloc.hugetlb=0"], "B": a.b or []}
    python = {"A": a.a_python, "B": a.b_python}
    prompt = reference_tokens(Path(a.artifacts))[: a.prompt_tokens]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    artifacts = {"A": a.a_artifacts or a.artifacts, "B": a.b_artifacts or a.artifacts}
    kids = {s: Child("pipeline", RESULTS.parent / f"pipeline_ab_{s}.log", "--artifacts", artifacts[s],
                     *(["--spin"] if a.spin else []), python=python[s], env=environment(pairs))
            for s, pairs in sides.items()}
    samples: dict[str, dict[str, list[float]]] = {s: {"ttft_ms": [], "tpot_ms": []} for s in kids}
    try:
        for k in kids.values():
            k.ready()
        for r in range(a.rounds):
            for s in ("A", "B") if r % 2 == 0 else ("B", "A"):
                samples[s]["ttft_ms"].append(kids[s].call("ttft", tokens=prompt)["value"] * 1e3)
                tokens, times = kids[s].call(a.call, tokens=prompt, n=a.tokens)["value"]
                samples[s]["tpot_ms"].append((times[-1] - times[0]) / (len(times) - 1) * 1e3)
            print(f"round {r + 1}/{a.rounds}: TPOT A {samples['A']['tpot_ms'][-1]:.2f}, "
                  f"B {samples['B']['tpot_ms'][-1]:.2f} ms", flush=True)
        rss = {s: k.call("rss")["value"]["total"] / 1e6 for s, k in kids.items()}
    finally:
        for k in kids.values():
            k.close()
    print(f"{a.rounds} rounds; A: {' '.join(sides['A']) or '-'} ({python['A']}, {artifacts['A']}); "
          f"B: {' '.join(sides['B']) or '-'} ({python['B']}, {artifacts['B']})")
    medians = {name: compare(name, samples["A"][name], samples["B"][name]) for name in ("ttft_ms", "tpot_ms")}
    print(f"  peak RSS A {rss['A']:.0f} MB, B {rss['B']:.0f} MB")
    RESULTS.write_text(json.dumps({"rounds": a.rounds, "tokens": a.tokens, "sides": sides, "python": python,
                                   "artifacts": artifacts,
                                   "medians": medians, "samples": samples, "peak_rss_mb": rss}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
