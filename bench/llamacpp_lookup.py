#!/usr/bin/env python
"""What prompt lookup gives llama.cpp on the bench's generation workload: the like-for-like reference for our
speculating pipeline and chain, which `splitllm bench` compares with llama.cpp one token a step.

    python bench/llamacpp_lookup.py --rounds 10

Two llama-cpp-python contexts on the same GGUF, 2 threads each (spinning, llama.cpp's stock): one generates as
`Llama.generate` does, one token a step; the other with llama-cpp-python's LlamaPromptLookupDecoding at our
settings (the last 3 tokens, up to 3 draft tokens a step; llama-cpp-python then evaluates logits for every row). In
turns whose order alternates, each generates --tokens greedy tokens after the bench's 32-token prompt; prints the
median time per output token of each, the median of the rounds' ratios, and where their tokens first differ.
Writes bench/results/llamacpp_lookup.json. Figures, never pass/fail.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from splitllm.bench.runtimes import timed
from splitllm.bench.suite import first_divergence, reference_tokens
from splitllm.export.sources import smollm2_gguf

RESULTS = Path(__file__).resolve().parent / "results" / "llamacpp_lookup.json"


def tpot(llm: object, prompt: list[int], n: int) -> tuple[float, list[int]]:
    """Seconds per token after the first, and the tokens: greedy through Llama.generate from an empty cache."""
    out, times = timed(llm.generate(prompt, temp=0.0, reset=True), n)  # type: ignore[attr-defined]
    return (times[-1] - times[0]) / (n - 1), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", default="artifacts/smollm2-ctx2048", help="for the bench's prompt tokens")
    ap.add_argument("--gguf", default="", help="default: the embedded SmolLM2 GGUF")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--draft-tokens", type=int, default=3)
    a = ap.parse_args()
    import llama_cpp
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    gguf = a.gguf or str(smollm2_gguf())
    prompt = reference_tokens(a.artifacts)[:32]
    common = dict(model_path=gguf, n_ctx=2048, n_threads=2, n_batch=512, verbose=False)
    sides = {"one token a step": llama_cpp.Llama(**common),
             "prompt lookup": llama_cpp.Llama(**common, draft_model=LlamaPromptLookupDecoding(
                 max_ngram_size=3, num_pred_tokens=a.draft_tokens))}
    names = list(sides)
    samples: dict[str, list[float]] = {s: [] for s in names}
    tokens: dict[str, list[int]] = {}
    for llm in sides.values():  # warm-up
        tpot(llm, prompt, 8)
    for r in range(a.rounds):
        for s in names if r % 2 == 0 else names[::-1]:
            seconds, tokens[s] = tpot(sides[s], prompt, a.tokens)
            samples[s].append(seconds * 1e3)
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{s} {samples[s][-1]:.2f} ms" for s in names), flush=True)
    ratios = [b / x for x, b in zip(samples[names[0]], samples[names[1]], strict=True)]
    medians = {s: statistics.median(v) for s, v in samples.items()}
    differ = first_divergence(tokens[names[0]], tokens[names[1]])
    print(f"{a.rounds} rounds of {a.tokens} tokens, llama.cpp {llama_cpp.__version__}, time per output token: "
          + ", ".join(f"{s} {m:.2f} ms ({1e3 / m:.1f} tok/s)" for s, m in medians.items())
          + f"; paired {statistics.median(ratios):.3f} (lookup lower in {sum(x < 1 for x in ratios)}/{a.rounds}); "
          + ("the same tokens" if differ is None else f"tokens first differ at {differ}"))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rounds": a.rounds, "tokens": a.tokens, "draft_tokens": a.draft_tokens,
                                   "samples_ms": samples, "medians_ms": medians,
                                   "paired_ratio": statistics.median(ratios), "first_difference": differ}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
