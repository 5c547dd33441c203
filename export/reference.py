"""Reference forward pass of a Llama-architecture model in float32 numpy.

Readable rather than fast: it is the ground truth the exported graphs are checked against. Weights
use Hugging Face conventions (W is [out, in]; rotate-half rotary), as export/checkpoint.py presents them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from splitllm.services.common.manifest import ModelConfig
from splitllm.services.common.rope import cos_sin

KV = list[tuple[np.ndarray, np.ndarray]]  # per layer: keys, values [kv_heads, T, head_dim]


def as_float(w: object) -> np.ndarray:
    """float32 view of a weight, dequantizing quantized ones."""
    return w if isinstance(w, np.ndarray) else w.dequantize()  # type: ignore[attr-defined]


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [heads, S, head_dim]; cos/sin [S, head_dim/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


class ReferenceModel:
    def __init__(self, cfg: ModelConfig, weight: Callable[[str], object], max_len: int = 4096,
                 cache_dtype: str = "float32") -> None:
        """`cache_dtype`: keys and values are rounded to it as they enter the cache (an artifact's kv.dtype)."""
        self.cfg, self.cache_dtype = cfg, np.dtype(cache_dtype)
        self.w = {}
        names = ["embed", "norm", "lm_head"] + [
            f"layers.{i}.{t}"
            for i in range(cfg.num_layers)
            for t in ("attn_norm", "q", "k", "v", "o", "ffn_norm", "gate", "up", "down")
        ]
        for name in names:
            self.w[name] = as_float(weight(name))
        self.cos, self.sin = cos_sin(cfg, max_len)

    def forward(self, ids: list[int], kv: KV | None = None) -> tuple[np.ndarray, KV]:
        """Logits [S, vocab] for `ids` appended after the cached positions, and the grown cache."""
        c, w = self.cfg, self.w
        past = 0 if not kv else kv[0][0].shape[1]
        s = len(ids)
        cos, sin = self.cos[past : past + s], self.sin[past : past + s]
        group = c.num_heads // c.num_kv_heads
        # causal mask over [new positions, all positions]
        mask = np.triu(np.full((s, past + s), -np.inf, dtype=np.float32), k=past + 1)
        x = w["embed"][np.asarray(ids)]
        new_kv: KV = []
        for i in range(c.num_layers):
            p = f"layers.{i}."
            h = rms_norm(x, w[p + "attn_norm"], c.rms_norm_eps)
            q = (h @ w[p + "q"].T).reshape(s, c.num_heads, c.head_dim).transpose(1, 0, 2)
            k = (h @ w[p + "k"].T).reshape(s, c.num_kv_heads, c.head_dim).transpose(1, 0, 2)
            v = (h @ w[p + "v"].T).reshape(s, c.num_kv_heads, c.head_dim).transpose(1, 0, 2)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            k, v = k.astype(self.cache_dtype).astype(np.float32), v.astype(self.cache_dtype).astype(np.float32)
            if kv:
                k = np.concatenate([kv[i][0], k], axis=1)
                v = np.concatenate([kv[i][1], v], axis=1)
            new_kv.append((k, v))
            k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)
            scores = q @ k.transpose(0, 2, 1) / np.sqrt(c.head_dim) + mask
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            attn = (scores / scores.sum(axis=-1, keepdims=True)) @ v
            x = x + attn.transpose(1, 0, 2).reshape(s, -1) @ w[p + "o"].T
            h = rms_norm(x, w[p + "ffn_norm"], c.rms_norm_eps)
            x = x + (silu(h @ w[p + "gate"].T) * (h @ w[p + "up"].T)) @ w[p + "down"].T
        logits = rms_norm(x, w["norm"], c.rms_norm_eps) @ w["lm_head"].T
        return logits.astype(np.float32), new_kv
