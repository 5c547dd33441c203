#!/usr/bin/env python
"""What speculative decoding gives chat answers, greedy and sampled: one pipeline, two coordinators on its stages.

    python bench/speculation_ab.py --rounds 3

The bench's pipeline (bench/runtimes.py): `splitllm serve`'s processes, plus a second coordinator on the same stages
with `--draft-tokens 0` (one token a step). For each round, chat prompt and sampling setting, both coordinators
answer the same request (max --max-tokens tokens, the round's seed) in turns whose order alternates. Prints, per
sampling setting, the median of the answers' time ratios (speculating / one token a step) and how many answers had
the same tokens on both sides (all of them should: a kept guess is the token the sampler draws anyway, with the same
draws). Writes bench/results/speculation_ab.json. Figures, never pass/fail.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from splitllm.bench.runtimes import Pipeline
from splitllm.services.client.launcher import STAGE_THREADS, spins_by_default

RESULTS = Path(__file__).resolve().parent / "results" / "speculation_ab.json"
SAMPLING = {"greedy": {}, "temperature 0.7, top_k 40": {"temperature": 0.7, "top_k": 40},
            "temperature 0.7, top_p 0.9": {"temperature": 0.7, "top_p": 0.9},
            "temperature 0.7, top_k 40, top_p 0.9": {"temperature": 0.7, "top_k": 40, "top_p": 0.9}}
PROMPTS = ["List the planets of the solar system.", "Write a Python function that reverses a list.",
           "Write a short poem about the sea.", "where is California?",
           "Summarize: The cat sat on the mat. The cat sat on the mat. The dog sat on the log."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", default="artifacts/smollm2-ctx2048")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    a = ap.parse_args()
    pipeline = Pipeline(a.artifacts, spin=spins_by_default(STAGE_THREADS))  # as `splitllm serve` starts the stages
    try:
        clients = {"speculating": pipeline.client, "one token a step": pipeline.plain_client}
        rows = []
        for r in range(a.rounds):
            for prompt in PROMPTS:
                for name, sampling in SAMPLING.items():
                    seconds, tokens = {}, {}
                    for side in list(clients)[:: 1 if r % 2 else -1]:
                        t0 = time.perf_counter()
                        out = clients[side].generate(prompt=prompt, max_tokens=a.max_tokens, seed=r, **sampling)
                        seconds[side], tokens[side] = time.perf_counter() - t0, list(out.token_ids)
                    rows.append({"round": r, "prompt": prompt, "sampling": name, "seconds": seconds,
                                 "tokens": len(tokens["speculating"]),
                                 "same_tokens": tokens["speculating"] == tokens["one token a step"]})
            print(f"round {r + 1}/{a.rounds}", flush=True)
    finally:
        pipeline.close()
    print(f"{a.rounds} rounds x {len(PROMPTS)} chat prompts, max {a.max_tokens} tokens; time speculating / one token "
          "a step, median (min-max), answers with the same tokens:")
    summary = {}
    for name in SAMPLING:
        mine = [x for x in rows if x["sampling"] == name]
        ratios = [x["seconds"]["speculating"] / x["seconds"]["one token a step"] for x in mine]
        summary[name] = {"ratio_median": statistics.median(ratios), "same_tokens": sum(x["same_tokens"] for x in mine),
                         "answers": len(mine)}
        print(f"  {name:38s} {statistics.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f}), "
              f"same tokens {summary[name]['same_tokens']}/{len(mine)}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rounds": a.rounds, "max_tokens": a.max_tokens, "summary": summary,
                                   "answers": rows}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
