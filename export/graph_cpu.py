"""The CPU stage graph: a slice of decoder layers with our own ops (MatMulQ4_1 / Q8_0, Attention) and ONNX Runtime's.

One graph serves prompt processing and token generation (the sequence length is dynamic), so a
stage holds one copy of its weights. Activations are 2-D [S, H] inside the graph (Gemm wants 2-D, and
every node counts: a decode step runs ~6 nodes per layer at a few microseconds each). Per layer:

    h, x = SkipSimplifiedLayerNorm(delta, x)          residual add fused into the norm
    qkv  = MatMulQ4_1(h, Wqkv)                         fused Q/K/V: GGUF Q4_1 blocks as they are, int8 activations
           or MatMulNBits(h, Wqkv)                     other weights, and every weight at accuracy level 0 (float);
           [Gemm(blocksum(h), Oqkv, qkv)]              then for Q4_1 also the exact minimum term (block sums of h)
    a    = Attention(qkv, past KV, rotary)             ours (services/stage/cpu_attention.c), rows in and out;
           or GroupQueryAttention(...)                 with --kernels onnxruntime. Both write the KV in place
                                                       (past and present share a buffer)
    ...  o projection, SwiGLU MLP with fused gate/up (and with the activation inside MatMulQ4_1)

Inputs: input_ids int32 [B, S] (first stage) or hidden_in float32 [B, S, H]; seqlens_k int32 [B]
(= position + S - 1 per sequence); total_sequence_length int32 [] (the largest; GroupQueryAttention's, unused by
ours); past_key.{i}/past_value.{i} [B, kv_heads, C, head_dim], float16 for our Attention, float32 for
GroupQueryAttention (whose float16 cache is ~3x slower on the CPU); logit_rows int64 [1] (last stage: how many of
each sequence's last rows get logits, 1 but for a speculative step's draft tokens). Outputs: hidden_out [B, S, H], or
logits [B * logit_rows, vocab] (last stage); present_key.{i}/present_value.{i} (the same buffers as past when bound
in place). B is 1 for a prompt chunk; B > 1 runs one token of each of B sessions whose KV are
consecutive slots of one buffer (decode batching: the weights are read once for all B tokens).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from splitllm.export.onnx_writer import GraphBuilder
from splitllm.export.quantize import (
    NBitsWeight,
    RowQuantized,
    block_sum_rows,
    concat,
    concat_rows,
    q4_1_blocks,
    q8_0_blocks,
    split_rows,
)
from splitllm.services.common.manifest import LOGIT_ROWS, ModelConfig, TensorSpec
from splitllm.services.common.rope import cos_sin

MS = "com.microsoft"
SPLITLLM = "ai.splitllm"  # our own CPU kernels (services/stage/cpu_kernels.c)
# ONNX Runtime prepacks a MatMulNBits weight into the heap while its file-mapped original is resident, so at
# load a weight costs twice its size. Bigger weights go in row pieces of at most this size (SmolLM2's
# 8-bit lm_head: 4 pieces; stage 4's peak while loading 124 -> 102 MB; the same logits and decode time).
PIECE_BYTES = 8 << 20


class CpuStageGraph:
    def __init__(
        self, b: GraphBuilder, cfg: ModelConfig, context: int, accuracy_level: int, own_kernels: bool = True
    ) -> None:
        self.b, self.cfg, self.context, self.accuracy_level = b, cfg, context, accuracy_level
        self.own_kernels = own_kernels and accuracy_level == 4  # our matmuls' math is level 4's: int8 activations
        self.own_attention = own_kernels  # float32 arithmetic at every level
        self.kv_dtype = "float16" if own_kernels else "float32"
        self.batch_shapes: dict[int, str] = {}

    def batched(self, x: str, n: int) -> str:
        """Rows [B*S, n] -> [B, S, n], B read off seqlens_k (one shape per width n, shared by every layer)."""
        if n not in self.batch_shapes:
            b = self.b
            self.batch_shapes[n] = b.op("Concat", [b.op("Shape", ["seqlens_k"]), b.const([-1, n], "rows")], axis=0)
        return self.b.op("Reshape", [x, self.batch_shapes[n]])

    def own_op(self, x: str, w: NBitsWeight, name: str, swiglu: bool = False) -> str | None:
        """Our MatMulQ4_1 or MatMulQ8_0 for a weight that GGUF's Q4_1 or Q8_0 holds exactly (when own_kernels), else
        None. Read in place: no row pieces. swiglu: w stacks gate and up rows, and the op returns silu(gate) * up."""
        if not self.own_kernels:
            return None
        op, blocks = "MatMulQ4_1", q4_1_blocks(w)
        if blocks is None and not swiglu:
            op, blocks = "MatMulQ8_0", q8_0_blocks(w)
        if blocks is None:
            return None
        n, k = w.shape
        inputs = [x] + [self.b.weight(f"{name}.{f.name}", getattr(blocks, f.name)) for f in dataclasses.fields(blocks)]
        return self.b.op(op, inputs, domain=SPLITLLM, K=k, N=n, **({"swiglu": 1} if swiglu else {}))

    def linear(self, x: str, w: NBitsWeight, name: str) -> str:
        if (y := self.own_op(x, w, name)) is not None:
            return y
        parts = -(-w.nbytes // PIECE_BYTES)
        if parts == 1:
            return self._linear(x, w, name)
        pieces = [self._linear(x, p, f"{name}.{i}") for i, p in enumerate(split_rows(w, parts))]
        return self.b.op("Concat", pieces, axis=-1)

    def _linear(self, x: str, w: NBitsWeight, name: str) -> str:
        b = self.b
        n, k = w.shape
        blocks = k // w.block_size
        offsets = w.block_offsets
        if offsets is not None:  # the same op also sums x over each block: extra output rows of ones
            w = concat([dataclasses.replace(w, block_offsets=None), block_sum_rows(k, w.block_size)])
        inputs = [x, b.weight(name + ".qweight", w.packed), b.weight(name + ".scales", w.scales.reshape(-1))]
        if w.zero_points is not None:
            inputs.append(b.weight(name + ".zero_points", w.zero_points.reshape(-1)))
        y = b.op(
            "MatMulNBits",
            inputs,
            domain=MS,
            K=k,
            N=w.shape[0],
            bits=w.bits,
            block_size=w.block_size,
            accuracy_level=self.accuracy_level,
        )
        if offsets is None:
            return y
        y, sums = b.op("Split", [y, b.const([n, blocks], "split")], n_out=2, axis=-1)
        return b.op("Gemm", [sums, b.weight(name + ".block_offsets", offsets), y])

    def embedding(self, ids: str, e: RowQuantized) -> str:
        b = self.b
        vals = b.op("Cast", [b.op("Gather", [b.weight("embed.values", e.values), ids])], to=1)
        nblk = e.scales.shape[1]
        blocks = b.op("Reshape", [vals, b.const([0, 0, nblk, -1], "blocks")])
        if e.zero_points is not None:
            zp = b.op("Gather", [b.weight("embed.zero_points", e.zero_points.astype(np.float32)), ids])
            blocks = b.op("Sub", [blocks, b.op("Unsqueeze", [zp, b.const([-1], "axis")])])
        scale = b.op(
            "Unsqueeze", [b.op("Gather", [b.weight("embed.scales", e.scales), ids]), b.const([-1], "axis")]
        )
        x = b.op("Mul", [blocks, scale])
        return b.op("Reshape", [x, b.const([-1, self.cfg.hidden_size], "hidden")])

    def norm(self, x: str, w: np.ndarray, name: str) -> str:
        return self.b.op(
            "SimplifiedLayerNormalization",
            [x, self.b.weight(name, w)],
            axis=-1,
            epsilon=self.cfg.rms_norm_eps,
            stash_type=1,
        )

    def skip_norm(self, delta: str, residual: str, w: np.ndarray, name: str) -> tuple[str, str]:
        """(norm(residual + delta), residual + delta)."""
        b = self.b
        outs = [b.fresh("normed"), "", "", b.fresh("residual")]
        b.op(
            "SkipSimplifiedLayerNormalization",
            [residual, delta, b.weight(name, w)],
            outputs=outs,
            domain=MS,
            epsilon=self.cfg.rms_norm_eps,
        )
        return outs[0], outs[3]

    def layer(
        self,
        i: int,
        x: str,
        delta: str | None,
        weight: Callable[[str], object],
        rope: tuple[str, str],
        seqlens: str,
        total: str,
    ) -> tuple[str, str]:
        """Layer i on rows x [B*S, H]; returns (residual, delta) whose sum is the layer's output."""
        b, c, p = self.b, self.cfg, f"layers.{i}."
        attn_norm = weight(p + "attn_norm")
        h, x = (
            (self.norm(x, attn_norm, p + "attn_norm"), x)
            if delta is None
            else self.skip_norm(delta, x, attn_norm, p + "attn_norm")
        )
        q, k, v = (weight(p + t) for t in "qkv")
        qkv = concat_rows([q, k, v])
        parts = [(qkv, "qkv")] if qkv is not None else [(q, "q"), (k, "k"), (v, "v")]
        rows = [(self.linear(h, w, p + t), w.shape[0]) for w, t in parts]  # (name, width)
        attn, kv = b.fresh("attn"), [f"past_key.{i}", f"past_value.{i}"]
        outs = [attn, f"present_key.{i}", f"present_value.{i}"]
        heads = dict(num_heads=c.num_heads, kv_num_heads=c.num_kv_heads)
        if self.own_attention:  # rows in, rows out
            x_qkv = rows[0][0] if len(rows) == 1 else b.op("Concat", [r for r, _ in rows], axis=-1)
            b.op("Attention", [x_qkv, *kv, seqlens, *rope], outputs=outs, domain=SPLITLLM, **heads)
        else:  # GroupQueryAttention wants [B, S, width] and gives [B, S, heads * head_dim]
            gqa_in = [self.batched(r, n) for r, n in rows] + ["", ""] * (len(rows) == 1)
            b.op("GroupQueryAttention", gqa_in + [*kv, seqlens, total, *rope], outputs=outs, domain=MS,
                 do_rotary=1, rotary_interleaved=0, **heads)
            attn = b.op("Reshape", [attn, b.const([-1, c.num_heads * c.head_dim], "tokens")])
        o = self.linear(attn, weight(p + "o"), p + "o")
        h, x = self.skip_norm(o, x, weight(p + "ffn_norm"), p + "ffn_norm")
        gate_w, up_w = weight(p + "gate"), weight(p + "up")
        gu_w = concat_rows([gate_w, up_w])
        if gu_w is not None and (act := self.own_op(h, gu_w, p + "gate_up", swiglu=True)) is not None:
            return x, self.linear(act, weight(p + "down"), p + "down")
        if gu_w is not None:
            gate, up = b.op(
                "Split",
                [self.linear(h, gu_w, p + "gate_up"), b.const([c.intermediate_size] * 2, "split")],
                n_out=2,
                axis=-1,
            )
        else:
            gate, up = self.linear(h, gate_w, p + "gate"), self.linear(h, up_w, p + "up")
        act = b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate])]), up])
        return x, self.linear(act, weight(p + "down"), p + "down")

    def build(
        self,
        first: int,
        last: int,
        has_embedding: bool,
        has_lm_head: bool,
        weight: Callable[[str], object],
        on_layer: Callable[[], None] = lambda: None,
    ) -> tuple[list[TensorSpec], list[TensorSpec]]:
        b, c, C = self.b, self.cfg, self.context
        B, S, H = "batch", "sequence", c.hidden_size
        kv_shape = [B, c.num_kv_heads, C, c.head_dim]
        ins = [
            TensorSpec("input_ids", "int32", [B, S])
            if has_embedding
            else TensorSpec("hidden_in", "float32", [B, S, H]),
            TensorSpec("seqlens_k", "int32", [B]),
            TensorSpec("total_sequence_length", "int32", []),
            *([TensorSpec(LOGIT_ROWS, "int64", [1])] if has_lm_head else []),
        ]
        for i in range(first, last):
            ins += [
                TensorSpec(f"past_key.{i}", self.kv_dtype, kv_shape),
                TensorSpec(f"past_value.{i}", self.kv_dtype, kv_shape),
            ]
        for t in ins:
            b.input(t.name, t.dtype, t.shape)
        x = (
            self.embedding("input_ids", weight("embed"))
            if has_embedding
            else b.op("Reshape", ["hidden_in", b.const([-1, H], "tokens")])
        )
        cos, sin = cos_sin(c, C)
        rope = (b.weight("rope.cos", cos), b.weight("rope.sin", sin))
        delta = None
        for i in range(first, last):
            x, delta = self.layer(i, x, delta, weight, rope, "seqlens_k", "total_sequence_length")
            on_layer()
        x = b.op("Add", [x, delta])  # every stage holds at least one layer
        x = self.batched(x, H)
        if has_lm_head:  # logits of each sequence's last logit_rows rows only: slice before the final norm and lm_head
            start = b.op("Neg", [LOGIT_ROWS])
            x = b.op("Slice", [x, start, b.const([2**62], "end"), b.const([1], "axis")])
            x = b.op("Reshape", [x, b.const([-1, H], "tokens")])
            y = self.linear(self.norm(x, weight("norm"), "norm"), weight("lm_head"), "lm_head")
            out = TensorSpec("logits", "float32", ["logit_rows_total", c.vocab_size])
            b.output(y, out.name, out.dtype, out.shape)
        else:
            out = TensorSpec("hidden_out", "float32", [B, S, H])
            b.output(x, out.name, out.dtype, out.shape)
        outs = [out]
        for i in range(first, last):
            for kind in ("key", "value"):
                spec = TensorSpec(f"present_{kind}.{i}", self.kv_dtype, kv_shape)
                b.output(spec.name, spec.name, spec.dtype, spec.shape)
                outs.append(spec)
        return ins, outs
