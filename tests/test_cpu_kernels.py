"""services/stage/cpu_kernels.c: MatMulQ4_1 and MatMulQ8_0 through ONNX Runtime against the math its header states,
in numpy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from splitllm.export.quantize import NBitsWeight, _pack, q4_1_blocks, q8_0_blocks
from splitllm.services.stage.runtime import session_options

ROOT = Path(__file__).resolve().parent.parent


def q4_1_weight(rng: np.random.Generator, n: int, k: int) -> NBitsWeight:
    """A GGUF-like Q4_1 weight as from_gguf makes it: float16 d and m, offsets m + 8d."""
    nb = k // 32
    d = rng.uniform(0.001, 0.02, (n, nb)).astype(np.float16).astype(np.float32)
    m = (-8 * d + rng.normal(0, 0.003, (n, nb))).astype(np.float16).astype(np.float32)
    codes = rng.integers(0, 16, (n, nb, 32), dtype=np.uint8)
    return NBitsWeight(4, 32, _pack(codes, 4), d, None, np.ascontiguousarray((m + 8 * d).T))


def q8_0_weight(rng: np.random.Generator, n: int, k: int) -> NBitsWeight:
    """A GGUF-like Q8_0 weight as from_gguf makes it: float16 d, codes q + 128."""
    d = rng.uniform(0.001, 0.02, (n, k // 32)).astype(np.float16).astype(np.float32)
    q = rng.integers(-128, 128, (n, k // 32, 32)).astype(np.int8)
    return NBitsWeight(8, 32, q.view(np.uint8) ^ np.uint8(0x80), d)


def session(w: NBitsWeight, threads: int = 2, swiglu: bool = False, pad: int = 0) -> ort.InferenceSession:
    """`pad`: d and m zero-padded to a multiple of `pad` blocks (8: as artifacts exported before 2026-12-07 have)."""
    n, k = w.shape
    blocks = q4_1_blocks(w) if w.bits == 4 else q8_0_blocks(w)
    assert blocks is not None
    names = ("qs", "d", "m") if w.bits == 4 else ("qs", "d")
    arrays = {f: getattr(blocks, f) for f in names}
    if pad:
        arrays.update({f: np.pad(arrays[f], ((0, 0), (0, -arrays[f].shape[1] % pad))) for f in names[1:]})
    inits = [numpy_helper.from_array(a, f) for f, a in arrays.items()]
    op = "MatMulQ4_1" if w.bits == 4 else "MatMulQ8_0"
    attrs = {"K": k, "N": n, **({"swiglu": 1} if swiglu else {})}
    node = helper.make_node(op, ["a", *names], ["y"], domain="ai.splitllm", **attrs)
    graph = helper.make_graph(
        [node], op, [helper.make_tensor_value_info("a", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.splitllm", 1)], ir_version=10
    )
    return ort.InferenceSession(model.SerializeToString(), session_options(threads, spin=True),
                                providers=["CPUExecutionProvider"])


def reference(w: NBitsWeight, a: np.ndarray) -> np.ndarray:
    """The op's math: A rounded per block of 32 to int8 (float32 scale amax / 127, half to even), against W exactly."""
    k = a.shape[-1]
    blocks = a.reshape(-1, k // 32, 32).astype(np.float32)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0))
    rounded = np.rint(blocks * inv).astype(np.float64) * (amax / np.float32(127))
    return (rounded.reshape(-1, k) @ w.dequantize().astype(np.float64).T).reshape(*a.shape[:-1], -1)


def test_q4_1_blocks_hold_the_weight_exactly():
    w = q4_1_weight(np.random.default_rng(0), 5, 96)
    b = q4_1_blocks(w)
    assert b is not None and b.qs.shape == (5, 48) and b.d.shape == b.m.shape == (5, 3)
    codes = np.concatenate([b.qs.reshape(5, 3, 16) & 15, b.qs.reshape(5, 3, 16) >> 4], axis=-1)
    dense = codes * b.d[:, :, None].astype(np.float32) + b.m[:, :, None].astype(np.float32)
    assert np.array_equal(dense.reshape(5, 96), w.dequantize())


def test_q8_0_blocks_hold_the_weight_exactly_in_pair_order():
    w = q8_0_weight(np.random.default_rng(0), 3, 96)  # 3 blocks: the last pair is padded with a zero block
    b = q8_0_blocks(w)
    assert b is not None and b.qs.shape == (3, 128) and b.qs.dtype == np.int8 and b.d.shape == (3, 3)
    halves = b.qs.reshape(3, 2, 2, 2, 16).transpose(0, 1, 3, 2, 4).reshape(3, 4, 32)  # back to block order
    assert np.array_equal((halves[:, :3] * b.d[:, :, None].astype(np.float32)).reshape(3, 96), w.dequantize())
    assert not halves[:, 3].any()
    assert q8_0_blocks(q4_1_weight(np.random.default_rng(0), 3, 96)) is None


def test_q4_1_blocks_refuse_what_they_cannot_hold():
    w = q4_1_weight(np.random.default_rng(0), 4, 64)
    assert q4_1_blocks(NBitsWeight(w.bits, w.block_size, w.packed, w.scales)) is None  # no offsets: not Q4_1
    inexact = NBitsWeight(4, 32, w.packed, w.scales * np.float32(1 + 2**-20), None, w.block_offsets)
    assert q4_1_blocks(inexact) is None  # scales that float16 rounds


def check_against_reference(n: int, k: int) -> None:
    rng = np.random.default_rng(n + k)
    for w in (q4_1_weight(rng, n, k), q8_0_weight(rng, n, k)):
        s = session(w)
        for rows in (1, 2, 3, 4, 5, 64, 65, 130):
            a = rng.normal(0, 1, (rows, k)).astype(np.float32)
            a[:, 3] *= 40  # an outlier channel, as hidden states have
            y = s.run(None, {"a": a})[0]
            want = reference(w, a)
            assert y.shape == (rows, n) and y.dtype == np.float32
            assert np.abs(y - want).max() <= 1e-5 * np.abs(want).max(), (w.bits, rows)


SHAPES = [(7, 64), (65, 96), (33, 160), (9, 224), (200, 576)]  # K / 32 of 2, 3 (odd: a pair of one block), 5, 7, 18


@pytest.mark.parametrize("n,k", SHAPES)
def test_matmul_q4_1_matches_its_math(n, k):
    check_against_reference(n, k)


def with_kernels(kernels: str, code: str) -> str:
    """Runs `code` in a process whose library runs `kernels` (SPLITLLM_CPU_KERNELS; the library picks its kernels once
    per process); returns what it printed."""
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "SPLITLLM_CPU_KERNELS": kernels}, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_the_portable_kernels_match_it_too():
    """The scalar path (CPUs without AVX2), in a process of its own; it reports which kernels it picked."""
    code = (
        "import sys; sys.path.insert(0, 'tests'); from test_cpu_kernels import SHAPES, check_against_reference\n"
        "from splitllm.services.stage.cpu_kernels import kernels\n"
        "for n, k in SHAPES: check_against_reference(n, k)\n"
        "print(kernels())"
    )
    assert with_kernels("scalar", code).split() == ["scalar"]


def outputs_of(kernels: str, path: Path) -> str:
    """Runs `outputs` of both kinds of weight in a process whose library runs `kernels` (SPLITLLM_CPU_KERNELS);
    returns the kernels it reports."""
    code = (
        "import sys; sys.path.insert(0, 'tests'); import numpy as np; from test_cpu_kernels import *\n"
        "from splitllm.services.stage.cpu_kernels import kernels\n"
        "rng, out = np.random.default_rng(7), {}\n"
        "for n, k in [(9, 32), (13, 64), (11, 96), (33, 160), (21, 224), (17, 288), (200, 576), (130, 1536)]:\n"
        "    for w in (q4_1_weight(rng, n, k), q8_0_weight(rng, n, k)):\n"
        "        s = session(w)\n"
        "        for rows in (1, 2, 3, 4, 5, 8, 65):\n"
        "            a = rng.normal(0, 1, (rows, k)).astype(np.float32)\n"
        "            out[f'{w.bits}-{n}-{k}-{rows}'] = s.run(None, {'a': a})[0]\n"
        f"np.savez({str(path)!r}, **out); print(kernels())"
    )
    return with_kernels(kernels, code).strip()


def test_the_avx512_kernels_give_the_avx2_kernels_bits(tmp_path):
    """Where the CPU has AVX-512 with VNNI the library runs kernels of their own; SPLITLLM_CPU_KERNELS=avx2 forces the
    AVX2 ones. Both sum the same int32 lanes in the same order, so a model's outputs do not depend on which ran."""
    if outputs_of("", tmp_path / "default.npz") != "avx512":
        pytest.skip("this CPU has no AVX-512 with VNNI")
    assert outputs_of("avx2", tmp_path / "avx2.npz") == "avx2"
    fast, avx2 = np.load(tmp_path / "default.npz"), np.load(tmp_path / "avx2.npz")
    assert sorted(fast.files) == sorted(avx2.files)
    for name in fast.files:
        assert np.array_equal(fast[name], avx2[name]), name


def check_padded_scales_give_the_same_bits() -> None:
    """d and m padded to a multiple of 8 blocks (older artifacts) or not: the same products, the same bits."""
    rng = np.random.default_rng(11)
    for n, k in [(9, 96), (33, 160), (200, 576), (130, 1536)]:
        for w in (q4_1_weight(rng, n, k), q8_0_weight(rng, n, k)):
            pairs = [(session(w), session(w, pad=8))]
            if w.bits == 4 and n % 2 == 0:
                pairs.append((session(w, swiglu=True), session(w, swiglu=True, pad=8)))
            for tight, padded in pairs:
                for rows in (1, 2, 3, 4, 5, 65):
                    a = rng.normal(0, 1, (rows, k)).astype(np.float32)
                    y, want = tight.run(None, {"a": a})[0], padded.run(None, {"a": a})[0]
                    assert np.array_equal(y, want), (w.bits, n, k, rows)


@pytest.mark.parametrize("kernels", ["", "avx2", "scalar"])
def test_scales_padded_or_not_give_the_same_bits(kernels):
    with_kernels(kernels, "import sys; sys.path.insert(0, 'tests')\n"
                 "from test_cpu_kernels import check_padded_scales_give_the_same_bits\n"
                 "check_padded_scales_give_the_same_bits()")


def test_matmul_q4_1_refuses_scales_of_another_width():
    s = session(q4_1_weight(np.random.default_rng(3), 16, 96), pad=4)  # 3 blocks a row, d and m of 4: neither shape
    with pytest.raises(Exception, match=r"weight input 2 is not \[16, 8\] .*d and m: \[N, K/32\] or \[N, 8\]"):
        s.run(None, {"a": np.ones((1, 96), np.float32)})


def test_swiglu_returns_silu_of_the_gate_rows_times_the_up_rows():
    rng = np.random.default_rng(4)
    w = q4_1_weight(rng, 2 * 150, 576)  # rows 0..149 the gate, 150..299 the up projection
    s = session(w, swiglu=True)
    for rows in (1, 3, 70):
        a = rng.normal(0, 1, (rows, 576)).astype(np.float32)
        y = s.run(None, {"a": a})[0]
        full = reference(w, a)
        gate, up = full[:, :150], full[:, 150:]
        want = gate / (1 + np.exp(-gate)) * up
        assert y.shape == (rows, 150)
        assert np.abs(y - want).max() <= 1e-5 * np.abs(want).max(), rows
    alone = np.concatenate([s.run(None, {"a": a[i : i + 1]})[0] for i in range(len(a))])
    assert np.array_equal(alone, s.run(None, {"a": a})[0])


def test_swiglu_needs_q4_1_and_an_even_n():
    with pytest.raises(Exception, match="swiglu = 1 needs MatMulQ4_1 and an even N"):
        session(q4_1_weight(np.random.default_rng(5), 33, 64), swiglu=True)


def test_matmul_q4_1_leading_dims_zero_rows_and_a_zero_block():
    rng = np.random.default_rng(1)
    w = q4_1_weight(rng, 33, 128)
    s = session(w)
    a = rng.normal(0, 1, (2, 3, 128)).astype(np.float32)
    a[0, 1, 32:64] = 0  # amax 0: the block scales to 0, no division by zero
    y = s.run(None, {"a": a})[0]
    assert y.shape == (2, 3, 33)
    assert np.abs(y - reference(w, a)).max() <= 1e-5 * np.abs(y).max()
    assert s.run(None, {"a": np.zeros((0, 128), np.float32)})[0].shape == (0, 33)


def test_a_row_gives_the_same_bits_alone_and_in_a_batch():
    """Decode batching and prompt chunking never change a session's results: each row's arithmetic is the same."""
    rng = np.random.default_rng(2)
    w = q4_1_weight(rng, 300, 576)
    s = session(w)
    a = rng.normal(0, 1, (133, 576)).astype(np.float32)
    whole = s.run(None, {"a": a})[0]
    alone = np.concatenate([s.run(None, {"a": a[i : i + 1]})[0] for i in range(len(a))])
    for k in (3, 5, 6):  # 5 and 6 rows take one pass of their own over the weights (AVX-512)
        parts = np.concatenate([s.run(None, {"a": a[i : i + k]})[0] for i in range(0, len(a), k)])
        assert np.array_equal(whole, parts), k
    assert np.array_equal(whole, alone)


def test_matmul_q4_1_refuses_an_input_of_the_wrong_width():
    s = session(q4_1_weight(np.random.default_rng(3), 16, 64))
    with pytest.raises(Exception, match="MatMulQ4_1: A's last dimension is 96; the weights take K = 64"):
        s.run(None, {"a": np.zeros((1, 96), np.float32)})
    assert s.run(None, {"a": np.ones((1, 64), np.float32)})[0].shape == (1, 16)  # the session still serves
