"""Rotary embedding tables (rotate-half convention), including Llama 3.1's "llama3" frequency scaling."""

from __future__ import annotations

import math

import numpy as np

from splitllm.services.common.manifest import ModelConfig


def inv_freq(cfg: ModelConfig) -> np.ndarray:
    d = cfg.head_dim
    freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    s = cfg.rope_scaling or {}
    kind = s.get("rope_type", s.get("type"))
    if kind == "llama3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / freqs
        scaled = np.where(wavelen > old / low, freqs / factor, freqs)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        freqs = np.where(medium, smoothed, scaled)
    elif kind == "factors":  # GGUF rope_freqs: per-frequency divisors
        freqs = freqs / np.asarray(s["factors"], dtype=np.float64)
    return freqs


def cos_sin(cfg: ModelConfig, length: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 [length, head_dim/2] tables for positions 0..length-1."""
    angles = np.arange(length, dtype=np.float64)[:, None] * inv_freq(cfg)[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
