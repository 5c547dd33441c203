"""export/quantize.py: exact GGUF mappings and the MatMulNBits layout, checked against ONNX Runtime."""

import numpy as np
import onnxruntime as ort
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants
from onnx import TensorProto, helper, numpy_helper

from splitllm.export.quantize import NBitsWeight, from_gguf, quantize, quantize_rows, rows_from_gguf

rng = np.random.default_rng(0)


def ort_linear(w: NBitsWeight, x: np.ndarray, accuracy_level: int = 0) -> np.ndarray:
    """Run x @ W.T through MatMulNBits (+ blocksum(x) @ block_offsets) in ONNX Runtime."""
    n, k = w.shape
    nb = k // w.block_size
    inits = [numpy_helper.from_array(w.packed, "B"), numpy_helper.from_array(w.scales.reshape(-1), "scales")]
    if w.zero_points is not None:
        inits.append(numpy_helper.from_array(w.zero_points.reshape(-1), "zp"))
    out = "y" if w.block_offsets is None else "y0"
    nodes = [
        helper.make_node(
            "MatMulNBits",
            ["x"] + [t.name for t in inits],
            [out],
            domain="com.microsoft",
            K=k,
            N=n,
            bits=w.bits,
            block_size=w.block_size,
            accuracy_level=accuracy_level,
        )
    ]
    if w.block_offsets is not None:
        inits += [
            numpy_helper.from_array(np.array([0, 0, nb, w.block_size], np.int64), "blocks"),
            numpy_helper.from_array(np.array([-1], np.int64), "axis"),
            numpy_helper.from_array(w.block_offsets, "offsets"),
        ]
        nodes += [
            helper.make_node("Reshape", ["x", "blocks"], ["xb"]),
            helper.make_node("ReduceSum", ["xb", "axis"], ["bsum"], keepdims=0),
            helper.make_node("MatMul", ["bsum", "offsets"], ["off"]),
            helper.make_node("Add", ["y0", "off"], ["y"]),
        ]
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, k])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None, n])
    graph = helper.make_graph(nodes, "linear", [x_info], [y_info], inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=10
    )
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def check_ort(w: NBitsWeight, dense: np.ndarray) -> None:
    """Exact at accuracy_level 0 (fp32 compute); level 4 (int8 activations, the fast path) to ~1%."""
    x = rng.standard_normal((1, 5, dense.shape[1])).astype(np.float32)
    ref = x @ dense.T
    np.testing.assert_allclose(ort_linear(w, x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    np.testing.assert_allclose(ort_linear(w, x, accuracy_level=4), ref, atol=0.02 * np.abs(ref).max())


def weights(n: int, k: int) -> np.ndarray:
    return (rng.standard_normal((n, k)) * rng.uniform(0.2, 2, (n, 1))).astype(np.float32)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0], ids=lambda t: t.name)
def test_gguf_blocks_are_exact_in_onnx_runtime(qtype: T) -> None:
    n, k = 48, 96  # 3 blocks per row: odd, so packed zero points would need padding
    w = weights(n, k)
    w[0, :32] = 0.25  # a constant block (Q4_1: d == 0)
    raw = quants.quantize(w, qtype)
    ref = quants.dequantize(raw, qtype)
    nw = from_gguf(raw, qtype, (n, k))
    assert isinstance(nw, NBitsWeight) and nw.packed.shape == (n, 3, 32 * nw.bits // 8)
    np.testing.assert_allclose(nw.dequantize(), ref, rtol=1e-6, atol=1e-6)
    check_ort(nw, ref)
    rows = rows_from_gguf(raw, qtype, (n, k))
    assert rows.values.dtype == np.int8 and rows.scales.shape == (n, 3)
    np.testing.assert_allclose(rows.dequantize(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_gguf_floats_come_back_as_float32(qtype: T) -> None:
    w = weights(4, 64)
    raw = quants.quantize(w, qtype) if qtype != T.BF16 else (w.view(np.uint32) >> 16).astype(np.uint16)
    got = from_gguf(raw.view(np.uint8), qtype, (4, 64))
    assert got.dtype == np.float32 and got.shape == (4, 64)
    np.testing.assert_allclose(got, w, rtol=1e-2)
    assert rows_from_gguf(raw, qtype, (4, 64)).shape == (4, 64)
    assert from_gguf(w[0], T.F32, (64,)).shape == (64,)


def test_unsupported_type_names_it_and_the_supported_ones() -> None:
    supported = "supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1"
    with pytest.raises(ValueError, match=f"Q4_K is not supported; {supported}"):
        from_gguf(np.zeros(144, np.uint8), T.Q4_K, (1, 256))
    with pytest.raises(ValueError, match="Q5_0"):
        rows_from_gguf(np.zeros(22, np.uint8), T.Q5_0, (1, 32))


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_runs_in_onnx_runtime(bits: int) -> None:
    w = weights(40, 160)
    w[1, 32:64] = 0  # an all-zero block
    nw = quantize(w, bits)
    dense = nw.dequantize()
    check_ort(nw, dense)
    err = np.abs(dense - w).max() / np.abs(w).max()
    assert err < (0.1 if bits == 4 else 0.01)


def rtn(w: np.ndarray, block: int = 32) -> np.ndarray:
    """Round-to-nearest asymmetric 4-bit over the block's [min, max] (with 0), the baseline."""
    x = w.reshape(w.shape[0], -1, block)
    lo = np.minimum(x.min(-1, keepdims=True), 0)
    s = (np.maximum(x.max(-1, keepdims=True), 0) - lo) / 15
    z = np.clip(np.rint(-lo / s), 0, 15)
    return (s * (np.clip(np.rint(x / s + z), 0, 15) - z)).reshape(w.shape)


@pytest.mark.parametrize("dist", ["normal", "student_t3"])
def test_quantize_beats_round_to_nearest(dist: str) -> None:
    shape = (256, 512)
    w = (rng.standard_normal(shape) if dist == "normal" else rng.standard_t(3, shape)).astype(np.float32)
    ours = np.mean((quantize(w).dequantize() - w) ** 2)
    base = np.mean((rtn(w) - w) ** 2)
    assert ours < 0.96 * base


def test_quantize_rows() -> None:
    w = weights(10, 64)
    r = quantize_rows(w)
    assert r.values.dtype == np.int8 and r.zero_points is None and r.block_size == 32
    assert np.abs(r.dequantize() - w).max() <= np.abs(w).max() / 254 + 1e-6
