"""`splitllm eval perplexity`: score a text with the exported graphs, as llama.cpp's perplexity tool does.

Non-overlapping windows of `ctx` tokens from an empty cache, no BOS, float64 log-softmax. Two figures:
the llama-perplexity convention (score the second half of each window) and every token of every window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from splitllm.services.stage.chain import LocalChain


@dataclass(frozen=True)
class Perplexity:
    second_half: float
    all_tokens: float
    scored_second_half: int
    scored_all: int
    windows: int


def log_prob(logits: np.ndarray, token: int) -> float:
    x = logits.astype(np.float64)
    m = x.max()
    return float(x[token] - m - math.log(np.exp(x - m).sum()))


def perplexity(chain: LocalChain, tokens: list[int], ctx: int = 512) -> Perplexity:
    if ctx > chain.manifest.context_length:
        raise ValueError(f"--ctx {ctx} is larger than the artifact's context {chain.manifest.context_length}")
    windows = len(tokens) // ctx
    if windows == 0:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than one window of --ctx {ctx}")
    nll_half = nll_all = 0.0
    n_half = n_all = 0
    for w in range(windows):
        chunk = tokens[w * ctx : (w + 1) * ctx]
        sid = f"ppl-{w}"
        try:
            for pos in range(ctx - 1):  # logits at pos predict chunk[pos + 1]
                logits = chain.step(sid, pos, np.array([chunk[pos]], np.int32))
                lp = log_prob(logits, chunk[pos + 1])
                nll_all -= lp
                n_all += 1
                if pos >= ctx // 2:
                    nll_half -= lp
                    n_half += 1
        finally:
            chain.release(sid)
    return Perplexity(math.exp(nll_half / n_half), math.exp(nll_all / n_all), n_half, n_all, windows)
