"""QDQ quantization of the QNN stage graphs: 16-bit activations, 4-bit weights, 8-bit where it matters, and the
residual stream in float (fp16 on HTP).

The prompt graph (S = P) is calibrated on real hidden states; its activation encodings are copied by tensor name
into the token graph (S = 1), whose own few calibration runs would clip badly, so both graphs agree on every
encoding, the KV cache's included. 4-bit weights are symmetric int4 in blocks along the input dimension with float
scales (a checkpoint's own 4-bit blocks are kept exactly); 8-bit ones are per output channel. Weight quantization
depends on the weights only, so both graphs' quantized weights are identical and share_weights() stores them once.

The residual stream stays float, as in Qualcomm's mixed-precision LLM exports: the residual Adds and the RMSNorms
that read it, hence the stage I/O hidden_in / hidden_out (fp16 on HTP, max 65504). SmolLM2's first position
carries ~25000 in a few residual channels (an attention sink) while other tokens' are ~1-100: one uint16 encoding
per tensor had a step of ~0.39 on every residual Add of layers 11-28. The MatMuls, attention and MLP stay QDQ
(w4a16 / w8a16); their outputs are dequantized into the float Adds, the norms' outputs quantized into the next
MatMuls. Measured on SmolLM2 (QDQ on the CPU EP, with the last stage's calibration fix of graph_qnn): first-token
logits 1 - cos vs the float graphs 2.7e-4 / 0.7e-4 / 1.1e-4 on the three reference prompts against 5.0e-4 / 1.8e-4
/ 2.9e-4 with a uint16 residual; perplexity 13.20 against 13.34 (2 windows).
"""

from __future__ import annotations

import fnmatch
import hashlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper

W8_DEFAULT = ("embed", "lm_head")  # a 4-bit lm_head costs ~1% cosine on SmolLM2's logits (scratch/qnn findings)
ACTIVATIONS = "uint16"
BLOCK = 64  # rows of a 4-bit weight block quantized here (checkpoint 4-bit weights keep their own blocks)
FLOAT_READERS = ("RMSNormalization", "Identity")  # float ops reading the residual stream (Identity: the one that
# names the last residual Add's output hidden_out)
Exact = dict[str, tuple[np.ndarray, np.ndarray]]  # weight name -> (int4 codes [K, N], block scales [K/b, N])


class Feeds:
    """onnxruntime.quantization CalibrationDataReader over recorded graph inputs."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds, self.it = feeds, iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.it, None)

    def rewind(self) -> None:
        self.it = iter(self.feeds)


def residual_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes of the residual stream, kept float: the residual Adds (outputs named
    layers.{i}.residual_attn / residual_mlp), and the RMSNormalization and Identity (-> hidden_out) nodes that
    read the stream: hidden_in, the embedding Gather's output or a residual Add's output."""
    stream = {"hidden_in"}
    for n in model.graph.node:
        embedding = n.op_type == "Gather" and n.input[0] == "embed"
        if embedding or n.output[0].endswith((".residual_attn", ".residual_mlp")):
            stream.add(n.output[0])
    return [
        n.name
        for n in model.graph.node
        if (n.op_type == "Add" and n.output[0] in stream) or (n.op_type in FLOAT_READERS and n.input[0] in stream)
    ]


def float_gathers(model: onnx.ModelProto, floats: list[str]) -> None:
    """Gather nodes that read a Q/DQ pair of a float node's output read the float tensor instead (fp16 on HTP);
    their output keeps its encoding. The last stage picks its last row so: a uint16 Gather after the float final
    norm fails to finalize on the HTP simulator (QNN_COMMON_ERROR_MEM_ALLOC), an fp16 one runs."""
    g, names = model.graph, set(floats)
    producer = {o: n for n in g.node for o in n.output}
    uses: dict[str, int] = {}
    for n in g.node:
        for t in n.input:
            uses[t] = uses.get(t, 0) + 1
    drop = set()
    for n in g.node:
        dq = producer.get(n.input[0]) if n.op_type == "Gather" else None
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        src = producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
        if src is None or src.name not in names:
            continue
        n.input[0] = q.input[0]
        if uses[dq.output[0]] == 1 and uses[q.output[0]] == 1:
            drop |= {dq.name, q.name}
    keep = [n for n in g.node if n.name not in drop]
    del g.node[:]
    g.node.extend(keep)


def weight_bits(name: str, w8: tuple[str, ...]) -> int:
    """8 for names matching a w8 pattern (fnmatch on canonical names: 'lm_head', 'layers.0.*', '*.down')."""
    return 8 if any(fnmatch.fnmatchcase(name, p) for p in w8) else 4


def weight_overrides(model: onnx.ModelProto, w8: tuple[str, ...]) -> dict[str, list[dict[str, Any]]]:
    from onnxruntime.quantization import QuantType

    out: dict[str, list[dict[str, Any]]] = {}
    for t in model.graph.initializer:
        if t.name == "embed":  # a Gather table: one encoding for the whole table (QNN Gather keeps it)
            out[t.name] = [{"quant_type": QuantType.QUInt8}]
        elif t.name.endswith("norm"):
            out[t.name] = [{"quant_type": QuantType.QUInt16}]
        elif len(t.dims) == 2:  # MatMul operands [in, out]: per output channel (4-bit ones go block-wise later)
            eight = weight_bits(t.name, w8) == 8 or t.name.endswith(".offsets")  # Q4_1 block minimums
            qt = QuantType.QInt8 if eight else QuantType.QInt4
            out[t.name] = [{"axis": 1, "quant_type": qt, "symmetric": True}]
    return out


def block_quantize(w: np.ndarray, block: int, steps: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 codes [K, N] and float scales [K/block, N] of a MatMul operand w [K, N] in blocks of
    `block` rows along K; each block's clipping range is the one of a grid (max |w| shrunk by up to 45%) with
    the least squared error."""
    k, n = w.shape
    blocks = w.reshape(k // block, block, n)
    amax = np.maximum(np.abs(blocks).max(axis=1), 1e-12)  # [K/block, N]
    best, best_err = amax / 7, np.full(amax.shape, np.inf)
    for r in np.linspace(1.0, 0.55, steps):
        s = amax * r / 7
        err = ((np.clip(np.round(blocks / s[:, None]), -8, 7) * s[:, None] - blocks) ** 2).sum(axis=1)
        better = err < best_err
        best, best_err = np.where(better, s, best), np.where(better, err, best_err)
    best = best.astype(np.float32)
    return np.clip(np.round(blocks / best[:, None]), -8, 7).astype(np.int8).reshape(k, n), best


def int4_tensor(name: str, codes: np.ndarray) -> TensorProto:
    flat = codes.astype(np.uint8).ravel() & 0xF
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    t = TensorProto(name=name, dims=list(codes.shape), data_type=TensorProto.INT4)
    t.raw_data = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
    return t


def to_blocks(model: onnx.ModelProto, weights: dict[str, np.ndarray], block: int, exact: Exact) -> None:
    """Replace each per-channel int4 weight's DequantizeLinear by a block-wise one (block_size along K, float
    scales): the checkpoint's own codes and scales where it had them (`exact`), else block_quantize()."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    drop = set()
    for node in g.node:
        name = node.input[0].removesuffix("_quantized") if node.op_type == "DequantizeLinear" else ""
        t, w = inits.get(node.input[0]), weights.get(name)
        if t is None or w is None or t.data_type != TensorProto.INT4 or (name not in exact and w.shape[0] % block):
            continue
        codes, scales = exact[name] if name in exact else block_quantize(w, block)
        drop.update(node.input)
        g.initializer.extend(
            [
                int4_tensor(name + "_q4", codes),
                numpy_helper.from_array(scales, name + "_block_scale"),
                int4_tensor(name + "_q4_zero", np.zeros(scales.shape, np.int8)),
            ]
        )
        node.input[:] = [name + "_q4", name + "_block_scale", name + "_q4_zero"]
        del node.attribute[:]
        size = w.shape[0] // scales.shape[0]
        node.attribute.extend([helper.make_attribute("axis", 0), helper.make_attribute("block_size", size)])
    keep = [t for t in g.initializer if t.name not in drop]
    del g.initializer[:]
    g.initializer.extend(keep)


def activation_encodings(model: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    """Scale and zero point of every quantized activation (QuantizeLinear of a non-initializer), and of a float
    Gather's input (float_gathers: its output took the input's encoding; the token graph quantizes that input)."""
    inits = {t.name: t for t in model.graph.initializer}
    enc = {}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits and n.input[1] in inits:
            name = n.input[0].removesuffix("_QuantizeLinear_Input")  # graph outputs get renamed so
            scale, zp = numpy_helper.to_array(inits[n.input[1]]), numpy_helper.to_array(inits[n.input[2]])
            enc[name] = [{"scale": scale.astype(np.float32), "zero_point": zp}]
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    for n in model.graph.node:
        if n.op_type == "Gather" and n.output[0] in enc and n.input[0] not in {*enc, *inits, *dequantized}:
            enc[n.input[0]] = enc[n.output[0]]
    return enc


def io_params(model: onnx.ModelProto) -> dict[str, dict[str, Any]]:
    """The encoding of every float graph input and output: the QuantizeLinear right after an input, the
    DequantizeLinear right before an output."""
    inits = {t.name: t for t in model.graph.initializer}
    ins, outs = {i.name for i in model.graph.input}, {o.name for o in model.graph.output}
    params = {}
    for n in model.graph.node:
        name = (
            n.input[0]
            if n.op_type == "QuantizeLinear" and n.input[0] in ins
            else n.output[0]
            if n.op_type == "DequantizeLinear" and n.output[0] in outs
            else None
        )
        if name and name not in params:
            scale, zp = (numpy_helper.to_array(inits[t]) for t in n.input[1:3])
            params[name] = {"scale": float(scale), "zero_point": int(zp), "dtype": str(zp.dtype)}
    return params


def quantize_graph(
    src: Path,
    feeds: list[dict[str, np.ndarray]],
    w8: tuple[str, ...],
    encodings: dict[str, list[dict[str, Any]]] | None = None,
    exact: Exact | None = None,
    block: int = BLOCK,
    float_residual: bool = True,
) -> onnx.ModelProto:
    """The QDQ model of the float graph `src`, in memory (share_weights writes it). `encodings` fix activation
    scales and zero points by tensor name; `block` 0 leaves 4-bit weights per output channel; `float_residual`
    False quantizes the residual stream too (uint16 per tensor, as before the float residual)."""
    from onnxruntime.quantization import CalibrationMethod, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    float_model = onnx.load(str(src))
    floats = residual_nodes(float_model) if float_residual else []
    overrides = weight_overrides(float_model, w8)
    if floats:  # the norms' weights stay float with their nodes
        overrides = {k: v for k, v in overrides.items() if not k.endswith("norm")}
    overrides.update(encodings or {})
    cfg = get_qnn_qdq_config(
        str(src),
        Feeds(feeds),
        calibrate_method=CalibrationMethod.MinMax,
        activation_type=QuantType.QUInt16,
        weight_type=QuantType.QUInt8,
        per_channel=True,
        init_overrides=overrides,
        nodes_to_exclude=floats,
    )
    # a Gather quantizes its float input (the last stage's final_norm, every row) and shares that encoding:
    # lm_head's input is not calibrated on the last rows alone (float_gathers() then drops that input's Q/DQ)
    cfg.extra_options["ForceQuantizeNoInputCheck"] = True
    with tempfile.TemporaryDirectory(dir=src.parent) as tmp:
        quantize(str(src), f"{tmp}/q.onnx", cfg)
        model = onnx.load(f"{tmp}/q.onnx")
    float_gathers(model, floats)
    if block:
        weights = {t.name: numpy_helper.to_array(t) for t in float_model.graph.initializer if len(t.dims) == 2}
        to_blocks(model, weights, block, exact or {})
    return model


def share_weights(models: dict[Path, onnx.ModelProto], weights: Path, min_bytes: int = 1024) -> None:
    """Write the models with their large initializers moved into one external file, each distinct tensor
    stored once (the prompt and token graphs quantize their weights identically)."""
    seen: dict[tuple[str, str], tuple[int, int]] = {}
    with open(weights, "wb") as f:
        for path, model in models.items():
            for t in model.graph.initializer:
                if t.data_location == TensorProto.EXTERNAL or len(t.raw_data) < min_bytes:
                    continue
                key = (t.name, hashlib.sha256(t.raw_data).hexdigest())
                if key not in seen:
                    f.write(b"\0" * (-f.tell() % 4096))
                    seen[key] = (f.tell(), len(t.raw_data))
                    f.write(t.raw_data)
                offset, length = seen[key]
                external_data_helper.set_external_data(t, weights.name, offset, length)
                t.ClearField("raw_data")
            path.write_bytes(model.SerializeToString())
