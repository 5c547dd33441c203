"""Input-channel importance for the 4-bit search: mean square activations of the model on random tokens.

A few channels of a Llama's layer inputs carry most of the activation energy (massive activations: in
SmolLM2's attention inputs five of 576 channels carry half to three quarters of it), so a weight error
there costs far more than elsewhere; the squared weight error (plain, or weighted by the weights'
magnitudes or by the norm gains) cannot see that. These channels show up on any input, so the float
model is run on random token ids: no calibration text. SmolLM2 re-quantized from float: perplexity 14.6,
against 16.5 for the unweighted search and 15.9 for round-to-nearest (bench/quantizer_quality.py).

The forward runs lazily, layer by layer as the export asks for them, reading each tensor in row blocks:
memory is one block plus activations of a few hundred tokens.
"""

from __future__ import annotations

import numpy as np

from splitllm.export.checkpoint import Checkpoint
from splitllm.export.reference import as_float, rms_norm, rotate, silu
from splitllm.services.common.rope import cos_sin

TOKENS = 128
BLOCK_BYTES = 64 << 20  # its own row blocks, so the statistics never depend on the export's chunking
INPUTS = {"q": "attn", "k": "attn", "v": "attn", "o": "o", "gate": "mlp", "up": "mlp", "down": "down"}


class ActivationStats:
    def __init__(self, ckpt: Checkpoint, tokens: int = TOKENS, seed: int = 0) -> None:
        self.ckpt, self.cfg = ckpt, ckpt.config
        self.ids = np.random.default_rng(seed).integers(0, self.cfg.vocab_size, tokens)
        self.cos, self.sin = cos_sin(self.cfg, tokens)
        self.x: np.ndarray | None = None  # residual stream entering layer len(self.layers)
        self.layers: list[dict[str, np.ndarray]] = []

    def __call__(self, name: str) -> np.ndarray:
        """Mean square of each input channel of linear layer `name` ("layers.{i}.{q,k,v,o,gate,up,down}")."""
        _, i, short = name.split(".")
        while len(self.layers) <= int(i):
            self._layer()
        return self.layers[int(i)][INPUTS[short]]

    def _blocks(self, name: str):
        return (as_float(w) for w in self.ckpt.row_chunks(name, BLOCK_BYTES))

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        return np.concatenate([x @ w.T for w in self._blocks(name)], axis=-1)

    def _embed(self) -> np.ndarray:
        x, row = np.empty((len(self.ids), self.cfg.hidden_size), np.float32), 0
        for w in self._blocks("embed"):
            hit = (self.ids >= row) & (self.ids < row + len(w))
            x[hit] = w[self.ids[hit] - row]
            row += len(w)
        return x

    def _layer(self) -> None:
        c, p = self.cfg, f"layers.{len(self.layers)}."
        x = self._embed() if self.x is None else self.x
        t, group = len(x), c.num_heads // c.num_kv_heads
        stats = {}
        h = rms_norm(x, as_float(self.ckpt.tensor(p + "attn_norm")), c.rms_norm_eps)
        stats["attn"] = np.mean(h * h, axis=0)
        q = self._linear(h, p + "q").reshape(t, c.num_heads, c.head_dim).transpose(1, 0, 2)
        k = self._linear(h, p + "k").reshape(t, c.num_kv_heads, c.head_dim).transpose(1, 0, 2)
        v = self._linear(h, p + "v").reshape(t, c.num_kv_heads, c.head_dim).transpose(1, 0, 2)
        q, k = rotate(q, self.cos, self.sin), np.repeat(rotate(k, self.cos, self.sin), group, axis=0)
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(c.head_dim) + np.triu(np.full((t, t), -np.inf, np.float32), 1)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        a = ((scores / scores.sum(axis=-1, keepdims=True)) @ np.repeat(v, group, axis=0)).transpose(1, 0, 2)
        a = a.reshape(t, -1)
        stats["o"] = np.mean(a * a, axis=0)
        x = x + self._linear(a, p + "o")
        h = rms_norm(x, as_float(self.ckpt.tensor(p + "ffn_norm")), c.rms_norm_eps)
        stats["mlp"] = np.mean(h * h, axis=0)
        act = silu(self._linear(h, p + "gate")) * self._linear(h, p + "up")
        stats["down"] = np.mean(act * act, axis=0)
        self.x = x + self._linear(act, p + "down")
        self.layers.append(stats)
