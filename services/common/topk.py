"""The k largest logits of a vocabulary, fast: the last stage sends only these when sampling allows, and the sampler
takes its top_k with the same rule, so a pipeline and the chain draw from the same candidates even at a tie."""

from __future__ import annotations

import numpy as np

CHUNK = 128


def largest(values: np.ndarray, k: int) -> np.ndarray:
    """Ascending positions of the k largest of a 1-D array (k < its size); at a tie on the boundary the lower
    positions."""
    boundary = np.partition(values, values.size - k)[values.size - k]
    above = np.flatnonzero(values > boundary)
    return np.sort(np.concatenate([above, np.flatnonzero(values == boundary)[: k - above.size]]))


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(values, int32 ids, ascending) of the k largest logits of a 1-D array, the lower ids at a tie on the boundary;
    (logits, None) when k is 0 or covers the whole vocabulary.

    np.argpartition over a 49k vocabulary costs ~430 us, a twentieth of a decode step. Greedy (k = 1)
    is an argmax (~4 us). Otherwise the chunks whose maxima reach the k-th largest maximum hold every element >= the
    k-th largest (a chunk without any has a maximum below it, and fewer than k chunks have one above it), ties
    included, so the selection runs over about k * CHUNK candidates instead of the vocabulary."""
    n = logits.shape[-1]
    if k <= 0 or k >= n:
        return logits, None
    if k == 1:
        i = int(np.argmax(logits))  # the first of a tie
        return logits[i : i + 1], np.array([i], np.int32)
    whole = n // CHUNK * CHUNK
    if k * CHUNK * 4 > whole:
        ids = largest(logits, k)
    else:
        maxima = logits[:whole].reshape(-1, CHUNK).max(axis=1)
        chunks = np.flatnonzero(maxima >= np.partition(maxima, maxima.size - k)[maxima.size - k])
        cand = np.concatenate([(chunks[:, None] * CHUNK + np.arange(CHUNK)).ravel(), np.arange(whole, n)])
        ids = cand[largest(logits[cand], k)]
    return logits[ids], ids.astype(np.int32)


def top_k_rows(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray | None]:
    """top_k of logits [n], or of each row of logits [rows, n] (stacked: [rows, k] values and ids)."""
    if logits.ndim == 1:
        return top_k(logits, k)
    picks = [top_k(row, k) for row in logits]
    return np.stack([v for v, _ in picks]), None if picks[0][1] is None else np.stack([i for _, i in picks])
