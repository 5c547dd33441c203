"""The QNN stage graph: float, static shapes, standard ONNX operators, in the layout of Qualcomm's Llama export.

qnn_quantize.py turns it into QDQ form. S is P (prompt graph) or 1 (token graph); L = C - S past slots.

    input_ids int32 [1, S] (first stage) or hidden_in float32 [1, S, H]
    attention_mask float32 [1, 1, S, C]   additive (0 or MASK_VALUE); columns 0..L-1 are the past slots,
                                           L..C-1 the S new tokens
    position_cos, position_sin float32 [1, 1, S, head_dim/2]   rotary tables of the S positions
    past_key_{i}_in [kv, 1, head_dim, L] (keys transposed), past_value_{i}_in [kv, 1, L, head_dim]
    last_index int32 [1]                  last stage, prompt graph: the row whose logits are returned
outputs:
    hidden_out [1, S, H], or logits [1, vocab] (last stage)
    past_key_{i}_out [kv, 1, head_dim, S], past_value_{i}_out [kv, 1, S, head_dim]   the new entries only

Attention is grouped-query as one broadcast MatMul per layer ([kv, group, S, hd] x [kv, 1, hd, C]), which the
HTP backend takes whole; RMSNorm is one op; 1/sqrt(head_dim) is folded into Wq. The last stage normalizes every
row and picks the last valid one after the final norm (its encoding then sees every calibration row).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from onnx import helper

from splitllm.export.onnx_writer import GraphBuilder
from splitllm.export.quantize import NBitsWeight
from splitllm.export.quantize import _unpack as unpack
from splitllm.export.reference import as_float
from splitllm.services.common.manifest import ModelConfig, TensorSpec

OPSET = 23  # RMSNormalization; QDQ with 4- and 16-bit types needs QuantizeLinear >= 21
LINEAR = ("q", "k", "v", "o", "gate", "up", "down")


def io_specs(
    cfg: ModelConfig, layers: range, context: int, seq: int, first: bool, last: bool
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    kv, hd, past, h = cfg.num_kv_heads, cfg.head_dim, context - seq, cfg.hidden_size
    ins = [
        TensorSpec("input_ids", "int32", [1, seq]) if first else TensorSpec("hidden_in", "float32", [1, seq, h]),
        TensorSpec("attention_mask", "float32", [1, 1, seq, context]),
        TensorSpec("position_cos", "float32", [1, 1, seq, hd // 2]),
        TensorSpec("position_sin", "float32", [1, 1, seq, hd // 2]),
    ]
    out = ("logits", [1, cfg.vocab_size]) if last else ("hidden_out", [1, seq, h])
    outs = [TensorSpec(out[0], "float32", out[1])]
    for i in layers:
        ins += [
            TensorSpec(f"past_key_{i}_in", "float32", [kv, 1, hd, past]),
            TensorSpec(f"past_value_{i}_in", "float32", [kv, 1, past, hd]),
        ]
        outs += [
            TensorSpec(f"past_key_{i}_out", "float32", [kv, 1, hd, seq]),
            TensorSpec(f"past_value_{i}_out", "float32", [kv, 1, seq, hd]),
        ]
    if last and seq > 1:
        ins.append(TensorSpec("last_index", "int32", [1]))
    return ins, outs


class QnnStageGraph:
    def __init__(self, b: GraphBuilder, cfg: ModelConfig, context: int, seq: int) -> None:
        self.b, self.cfg, self.context, self.seq = b, cfg, context, seq
        # weight name -> (int4 codes [K, N], float block scales [K/block, N]) of checkpoint weights that are
        # already 4-bit (GGUF Q4_0/Q4_1): qnn_quantize keeps them exactly instead of quantizing them again
        self.exact: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def norm(self, x: str, w: object, name: str, out: str | None = None) -> str:
        """One RMSNormalization op, not its decomposition: the first position's residual reaches ~25000 in
        SmolLM2 (an attention sink), so x*x would need a range of ~6e8 and round every other token's squares
        to zero. QNN's RmsNorm keeps that inside the op (float, with the residual stream: qnn_quantize)."""
        w = self.b.weight(name, as_float(w).astype(np.float32))
        outs = [out] if out else None
        return self.b.op("RMSNormalization", [x, w], outputs=outs, axis=-1, epsilon=self.cfg.rms_norm_eps)

    def rope(self, x: str, cos: str, sin: str) -> str:
        b, half = self.b, self.cfg.head_dim // 2
        x1, x2 = b.op("Split", [x, b.const([half, half], "split")], n_out=2, axis=-1)
        re = b.op("Sub", [b.op("Mul", [x1, cos]), b.op("Mul", [x2, sin])])
        im = b.op("Add", [b.op("Mul", [x2, cos]), b.op("Mul", [x1, sin])])
        return b.op("Concat", [re, im], axis=-1)

    def linear(self, x: str, w: object, name: str, scale: float = 1.0, out: str | None = None) -> str:
        """x @ W.T * scale for a checkpoint weight W [out, in]; stored as the MatMul operand [in, out].

        A GGUF 4-bit weight (d * (q - 8) per block, Q4_1 plus a per-block offset) stays exact: its codes and
        scales are recorded for the quantizer, and the offsets become blocksum(x) @ offsets [K/block, N].
        `out` names the result."""
        b, outs = self.b, [out] if out else None
        if not (isinstance(w, NBitsWeight) and w.bits == 4 and w.zero_points is None):
            weight = b.weight(name, np.ascontiguousarray(as_float(w).T * scale, np.float32))
            return b.op("MatMul", [x, weight], outputs=outs)
        n, k = w.shape
        codes = (unpack(w.packed, 4).astype(np.int8) - 8).reshape(n, k).T  # [K, N]
        scales = np.ascontiguousarray(w.scales.T * scale, np.float32)  # [K/block, N]
        self.exact[name] = (np.ascontiguousarray(codes), scales)
        dense = (codes.reshape(-1, w.block_size, n) * scales[:, None]).reshape(k, n)
        y = b.op("MatMul", [x, b.weight(name, dense)], outputs=None if w.block_offsets is not None else outs)
        if w.block_offsets is None:
            return y
        blocks = b.op("Reshape", [x, b.const([0, 0, k // w.block_size, w.block_size], "blocks")])
        sums = b.op("ReduceSum", [blocks, b.const([-1], "axis")], keepdims=0)
        offsets = b.weight(name + ".offsets", np.ascontiguousarray(w.block_offsets * scale, np.float32))
        return b.op("Add", [y, b.op("MatMul", [sums, offsets])], outputs=outs)

    def layer(self, i: int, x: str, weight: Callable[[str], object]) -> str:
        b, c, S, p = self.b, self.cfg, self.seq, f"layers.{i}."
        kv, g, hd = c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim
        h = self.norm(x, weight(p + "attn_norm"), p + "attn_norm")
        q = self.linear(h, weight(p + "q"), p + "q", 1 / np.sqrt(hd))
        k, v = self.linear(h, weight(p + "k"), p + "k"), self.linear(h, weight(p + "v"), p + "v")
        heads = lambda t, n, m: b.op(  # noqa: E731  [1, S, n*m*hd] -> [n, m, S, hd]
            "Transpose", [b.op("Reshape", [t, b.const([S, n, m, hd], "shape")])], perm=[1, 2, 0, 3]
        )
        cos, sin = "position_cos", "position_sin"
        k_new = b.op("Transpose", [self.rope(heads(k, kv, 1), cos, sin)], perm=[0, 1, 3, 2])
        v_new = heads(v, kv, 1)
        b.op("Identity", [k_new], outputs=[f"past_key_{i}_out"])
        b.op("Identity", [v_new], outputs=[f"past_value_{i}_out"])
        keys = b.op("Concat", [f"past_key_{i}_in", k_new], axis=3)  # [kv, 1, hd, C]
        values = b.op("Concat", [f"past_value_{i}_in", v_new], axis=2)  # [kv, 1, C, hd]
        scores = b.op("Add", [b.op("MatMul", [self.rope(heads(q, kv, g), cos, sin), keys]), "attention_mask"])
        attn = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), values])  # [kv, g, S, hd]
        attn = b.op("Reshape", [b.op("Transpose", [attn], perm=[2, 0, 1, 3]), b.const([1, S, -1], "shape")])
        x = b.op("Add", [x, self.linear(attn, weight(p + "o"), p + "o")], outputs=[p + "residual_attn"])
        h = self.norm(x, weight(p + "ffn_norm"), p + "ffn_norm")
        gate, up = self.linear(h, weight(p + "gate"), p + "gate"), self.linear(h, weight(p + "up"), p + "up")
        act = b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate])]), up])
        return b.op("Add", [x, self.linear(act, weight(p + "down"), p + "down")], outputs=[p + "residual_mlp"])

    def build(
        self, layers: range, first: bool, last: bool, weight: Callable[[str], object]
    ) -> tuple[list[TensorSpec], list[TensorSpec]]:
        b, c = self.b, self.cfg
        ins, outs = io_specs(c, layers, self.context, self.seq, first, last)
        for t in ins:
            b.input(t.name, t.dtype, t.shape)
        x = "hidden_in"
        if first:
            x = b.op("Gather", [b.weight("embed", as_float(weight("embed"))), "input_ids"], axis=0)
        for i in layers:
            x = self.layer(i, x, weight)
        if last:
            # the final norm runs on every row and the last valid one is picked after it, so lm_head's input
            # encoding is calibrated on every row of the calibration runs. Picked before the norm, one row per run
            # set the ranges and clipped SmolLM2's outlier channels (a last row's -404 to -275, a norm output's 40.6
            # to 31.6, and to 13.4 in the token graph, whose generated names differed so it calibrated its own few
            # runs): QDQ greedy text left llama.cpp's after 4-6 tokens, perplexity 16.4 (cpu target 13.2).
            # Named tensors: the token graph (no Gather) copies their encodings.
            x = self.norm(x, weight("norm"), "norm", out="final_norm")
            if self.seq > 1:
                x = b.op("Gather", [x, "last_index"], axis=1, outputs=["last_row"])  # [1, 1, H]
            y = self.linear(x, weight("lm_head"), "lm_head", out="lm_head_out")
            x = b.op("Reshape", [y, b.const([1, c.vocab_size], "shape")])
        b.output(x, outs[0].name, outs[0].dtype, outs[0].shape)
        for t in outs[1:]:
            b.output(t.name, t.name, t.dtype, t.shape)
        return ins, outs


def save(b: GraphBuilder, path: Path) -> None:
    for n in b.nodes:  # named after their first output, so fallback logs and errors can name them
        n.name = n.name or n.output[0]
    graph = helper.make_graph(b.nodes, b.name, b.inputs, b.outputs, list(b.initializers.values()))
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10, producer_name="splitllm"
    )
    path.write_bytes(model.SerializeToString())
