"""Weights in ONNX Runtime MatMulNBits form (linear layers), row-quantized form (embedding), and GGUF Q4_1 blocks
for our own MatMulQ4_1 op (q4_1_blocks: the default CPU graphs run Q4_1 layers that way).

A linear layer y = x @ W.T with W [N, K] becomes com.microsoft MatMulNBits:
    W[n, k] = scales[n, b] * (code[n, k] - zero_point[n, b]) (+ block_offsets[b, n]),  b = k // block_size
codes packed low-first along K into uint8 [N, K/block, block*bits/8]; zero points uint8, packed the same
way per row ([N, ceil(K/block * bits / 8)]), or absent for the op's default 2**(bits-1). block_offsets
is an extra exact term y += blocksum(x) @ block_offsets that MatMulNBits cannot express (GGUF Q4_1's
minimum is not an integer number of steps).

GGUF Q4_0, Q4_1 and Q8_0 map exactly (repacked, never quantized twice); float checkpoints are quantized
here with a per-block least-squares search, weighted by input-channel importance (calibrate.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

SUPPORTED = "F32, F16, BF16, Q8_0, Q4_0, Q4_1"
_FLOAT = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
_BLOCKS = (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [..., n] -> bytes [..., ceil(n*bits/8)], element 2j in the low nibble of byte j."""
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), np.uint8)], axis=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return packed
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


@dataclass(frozen=True)
class NBitsWeight:
    """A [N, K] weight in MatMulNBits layout (see the module docstring)."""

    bits: int
    block_size: int
    packed: np.ndarray  # uint8 [N, K/block, block*bits/8]
    scales: np.ndarray  # float32 [N, K/block]
    zero_points: np.ndarray | None = None  # uint8 [N, ceil(K/block*bits/8)]; None: 2**(bits-1)
    block_offsets: np.ndarray | None = None  # float32 [K/block, N]

    @property
    def shape(self) -> tuple[int, int]:
        return self.scales.shape[0], self.scales.shape[1] * self.block_size

    @property
    def nbytes(self) -> int:
        arrays = (self.packed, self.scales, self.zero_points, self.block_offsets)
        return sum(a.nbytes for a in arrays if a is not None)

    def dequantize(self) -> np.ndarray:
        n, nb = self.scales.shape
        codes = _unpack(self.packed, self.bits).astype(np.float32)
        if self.zero_points is None:
            zp = np.float32(1 << (self.bits - 1))
        else:
            zp = _unpack(self.zero_points, self.bits)[:, :nb, None].astype(np.float32)
        w = (codes - zp) * self.scales[..., None]
        if self.block_offsets is not None:
            w += self.block_offsets.T[..., None]
        return w.reshape(n, nb * self.block_size)


@dataclass(frozen=True)
class RowQuantized:
    """Embedding rows: W[v, k] = (values[v, k] - zero_points[v, b]) * scales[v, b], b = k // block_size.

    Gather-friendly: the graph gathers rows of values, scales (and zero points) by token id.
    """

    values: np.ndarray  # int8 [V, K]
    scales: np.ndarray  # float32 [V, K/block]
    zero_points: np.ndarray | None = None  # float32 [V, K/block]; None: 0

    @property
    def block_size(self) -> int:
        return self.values.shape[1] // self.scales.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.values, self.scales, self.zero_points) if a is not None)

    def dequantize(self) -> np.ndarray:
        v, nb = self.scales.shape
        x = self.values.reshape(v, nb, -1).astype(np.float32)
        if self.zero_points is not None:
            x -= self.zero_points[..., None]
        return (x * self.scales[..., None]).reshape(v, -1)


def concat(ws: list) -> np.ndarray | NBitsWeight | RowQuantized:
    """Row pieces of one tensor (float, or quantized piece by piece, same format) stacked along N."""
    first = ws[0]
    if isinstance(first, np.ndarray):
        return np.concatenate(ws)
    fields = {}
    for f in dataclasses.fields(first):
        parts = [getattr(w, f.name) for w in ws]
        if isinstance(parts[0], np.ndarray):  # block_offsets is [K/block, N]
            fields[f.name] = np.concatenate(parts, axis=1 if f.name == "block_offsets" else 0)
    return dataclasses.replace(first, **fields)


def split_rows(w: NBitsWeight, parts: int) -> list[NBitsWeight]:
    """`parts` row ranges of a weight (sizes differ by at most one row): the inverse of concat."""
    bounds = np.linspace(0, w.shape[0], parts + 1).astype(int)

    def rows(a: np.ndarray | None, lo: int, hi: int, axis: int = 0) -> np.ndarray | None:
        return None if a is None else np.ascontiguousarray(a[lo:hi] if axis == 0 else a[:, lo:hi])

    return [
        dataclasses.replace(w, packed=rows(w.packed, lo, hi), scales=rows(w.scales, lo, hi),
                            zero_points=rows(w.zero_points, lo, hi), block_offsets=rows(w.block_offsets, lo, hi, 1))
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def block_sum_rows(k: int, block_size: int) -> NBitsWeight:
    """K/block rows whose product with x is the sum of x over each block (row b: ones in block b), exactly:
    appended to a Q4_1 weight, the same MatMulNBits yields the block sums that its offsets multiply."""
    blocks = k // block_size
    codes = np.full((blocks, blocks, block_size), 8, np.uint8)  # 8: the op's default zero point, value 0
    codes[np.arange(blocks), np.arange(blocks)] = 9  # value 1
    return NBitsWeight(4, block_size, _pack(codes, 4), np.ones((blocks, blocks), np.float32))


@dataclass(frozen=True)
class Q4_1Blocks:
    """A [N, K] weight in the layout of splitllm's MatMulQ4_1 op (services/stage/cpu_kernels.c), GGUF's Q4_1:
    W[n, 32b + j] = d[n, b] * code + m[n, b], code j < 16 in the low nibble of qs[n, 16b + j], j >= 16 in the high
    nibble of qs[n, 16b + j - 16]; d and m float16 (GGUF's 20 bytes a block of 32: the kernels also take d and m
    zero-padded to a multiple of 8 blocks, as artifacts exported before 2026-12-07 have them, 6 % more bytes at
    K = 576)."""

    qs: np.ndarray  # uint8 [N, K/2]
    d: np.ndarray  # float16 [N, K/32]
    m: np.ndarray  # float16 [N, K/32]


def q4_1_blocks(w: NBitsWeight) -> Q4_1Blocks | None:
    """A 4-bit, block-32 weight with block offsets as exact Q4_1 blocks; None when it is not one (other formats, or
    scales and minimums that float16 does not hold exactly: GGUF's Q4_1 always does)."""
    if w.bits != 4 or w.block_size != 32 or w.zero_points is not None or w.block_offsets is None:
        return None
    n, k = w.shape
    nb = k // 32
    d = w.scales.astype(np.float32)
    m = w.block_offsets.T - 8 * d  # the offsets are m + 8d (from_gguf)
    d16, m16 = d.astype(np.float16), m.astype(np.float16)
    if not (np.array_equal(d16.astype(np.float32), d) and np.array_equal(m16.astype(np.float32), m)):
        return None
    codes = _unpack(w.packed, 4).reshape(n, nb, 32)
    qs = (codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8).reshape(n, k // 2)
    return Q4_1Blocks(qs, d16, m16)


@dataclass(frozen=True)
class Q8_0Blocks:
    """A [N, K] weight in the layout of splitllm's MatMulQ8_0 op, GGUF's Q8_0: W[n, 32b + j] = d[n, b] * q[n, b, j].
    q int8 in pairs of blocks: the first halves of blocks 2p and 2p+1, then their second halves (an odd count of
    blocks ends with a zero block); d float16."""

    qs: np.ndarray  # int8 [N, 64 * ceil(K/64)]
    d: np.ndarray  # float16 [N, K/32]


def is_q8_0(w: NBitsWeight) -> bool:
    """8-bit, block 32, the default zero point and float16 scales: GGUF's Q8_0 (export's own 8-bit is too)."""
    return (
        w.bits == 8 and w.block_size == 32 and w.zero_points is None and w.block_offsets is None
        and np.array_equal(w.scales.astype(np.float16).astype(np.float32), w.scales)
    )


def q8_0_blocks(w: NBitsWeight) -> Q8_0Blocks | None:
    """An 8-bit, block-32 weight with the default zero point as exact Q8_0 blocks (GGUF's Q8_0 is one); else None."""
    if not is_q8_0(w):
        return None
    n, k = w.shape
    nb = k // 32
    q = (w.packed.reshape(n, nb, 32) ^ np.uint8(0x80)).view(np.int8)  # codes are q + 128
    if nb % 2:
        q = np.concatenate([q, np.zeros((n, 1, 32), np.int8)], axis=1)
    pairs = q.reshape(n, -1, 2, 2, 16)  # [n, pair, block in pair, half, 16]
    qs = np.ascontiguousarray(pairs.transpose(0, 1, 3, 2, 4)).reshape(n, -1)
    return Q8_0Blocks(qs, w.scales.astype(np.float16))


def concat_rows(ws: list[NBitsWeight]) -> NBitsWeight | None:
    """Stack weights along N (fused QKV, gate/up); None when their formats differ."""
    first = ws[0]
    same = all(
        w.bits == first.bits
        and w.block_size == first.block_size
        and (w.zero_points is None) == (first.zero_points is None)
        and (w.block_offsets is None) == (first.block_offsets is None)
        for w in ws
    )
    return concat(ws) if same else None


def _gguf_type(ggml_type: int) -> GGMLQuantizationType:
    try:
        t = GGMLQuantizationType(int(ggml_type))
    except ValueError:
        t = None
    if t not in _FLOAT + _BLOCKS:
        name = t.name if t is not None else f"type {int(ggml_type)}"
        raise ValueError(f"GGML tensor type {name} is not supported; supported: {SUPPORTED}")
    return t


def _gguf_blocks(
    data: np.ndarray, ggml_type: int, shape: tuple[int, ...]
) -> np.ndarray | tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """float32 array for float types, else (d, m | None, q) with q [N, K/32, 32] in element order
    (uint8 0..15 for Q4, int8 for Q8_0) and d, m float32 [N, K/32]."""
    t = _gguf_type(ggml_type)
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    block, type_size = GGML_QUANT_SIZES[t]
    count = int(np.prod(shape))
    if count % block or raw.size != count // block * type_size:
        raise ValueError(
            f"{t.name} tensor of shape {tuple(shape)} needs {count // block * type_size} bytes, got {raw.size}"
        )
    if t in _FLOAT:
        return np.ascontiguousarray(gguf_dequantize(raw, t), dtype=np.float32).reshape(shape)
    n, k = shape
    blocks = raw.reshape(n, k // block, type_size)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if t == GGMLQuantizationType.Q8_0:
        return d, None, blocks[..., 2:].view(np.int8)
    m = None
    if t == GGMLQuantizationType.Q4_1:
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 2 if m is None else 4 :]
    return d, m, np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # byte j: element j low, j+16 high


def from_gguf(data: np.ndarray, ggml_type: int, shape_nk: tuple[int, ...]) -> NBitsWeight | np.ndarray:
    """A GGUF tensor (ReaderTensor.data bytes) as MatMulNBits weights, exactly; float types as float32."""
    got = _gguf_blocks(data, ggml_type, shape_nk)
    if isinstance(got, np.ndarray):
        return got
    d, m, q = got
    if q.dtype == np.int8:  # Q8_0: w = d*q = d*((q+128) - 128)
        return NBitsWeight(8, 32, q.view(np.uint8) ^ np.uint8(0x80), d)
    # Q4_0: w = d*(q-8). Q4_1: w = d*q + m = d*(q-8) + (m + 8d).
    offsets = None if m is None else np.ascontiguousarray((m + 8 * d).T)
    return NBitsWeight(4, 32, _pack(q, 4), d, None, offsets)


def rows_from_gguf(data: np.ndarray, ggml_type: int, shape_vk: tuple[int, int]) -> RowQuantized | np.ndarray:
    """A GGUF embedding as int8 rows, exactly (Q4_1 to float rounding); float types as float32."""
    got = _gguf_blocks(data, ggml_type, shape_vk)
    if isinstance(got, np.ndarray):
        return got
    d, m, q = got
    v, k = shape_vk
    if q.dtype == np.int8:
        return RowQuantized(q.reshape(v, k), d)
    if m is None:
        return RowQuantized((q.astype(np.int8) - 8).reshape(v, k), d)
    # Q4_1: d*q + m = d*(q - zp) with zp = -m/d; a block with d == 0 is constant m: code 0, zp -1, scale m.
    flat = d == 0
    values = np.where(flat[..., None], 0, q).astype(np.int8).reshape(v, k)
    zp = np.where(flat, -1, -m / np.where(flat, 1, d)).astype(np.float32)
    return RowQuantized(values, np.where(flat, m, d), zp)


def quantize_rows(w: np.ndarray, block_size: int = 32) -> RowQuantized:
    """Symmetric int8 per block of each row (absmax / 127): near lossless, no zero points."""
    v, k = w.shape
    x = np.asarray(w, np.float32).reshape(v, k // block_size, block_size)
    s = np.abs(x).max(axis=-1) / 127
    q = np.rint(x / np.where(s == 0, 1, s)[..., None])
    return RowQuantized(q.astype(np.int8).reshape(v, k), s.astype(np.float32))


# Candidate fractions of the block's [min, max] range (below 0.9 they practically never win once the
# least-squares rounds follow), and the number of those rounds.
_SHRINK = np.linspace(1.0, 0.92, 5, dtype=np.float32)
_REFINE = 3


def _sse(
    x: np.ndarray, inv: np.ndarray, zp: np.ndarray, qmax: int, tmp: np.ndarray, sw: np.ndarray | None
) -> np.ndarray:
    """Per block: sum of (sw * (q - (x/s + zp)))^2 with q = clip(rint(x/s + zp), 0, qmax); tmp: scratch [2, *x]."""
    u, r = tmp
    np.multiply(x, inv, out=u)
    u += zp
    np.clip(np.rint(u, out=r), 0, qmax, out=r)
    r -= u
    if sw is not None:
        r *= sw
    return np.einsum("...j,...j->...", r, r)[..., None]


def _search(x: np.ndarray, qmax: int, importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scale and integer zero point per block (last axis) minimising the block's squared error, each
    element's weighted by its column's importance (x: [..., blocks, block], importance: [blocks, block]).

    A grid over shrunk [min, max] ranges and zero points +-1 around the rounded one, then rounds of
    least-squares scale for the chosen codes (the scale that is optimal for fixed codes, codes re-rounded).
    """
    lo = np.minimum(x.min(-1, keepdims=True), 0)
    span = np.maximum(x.max(-1, keepdims=True), 0) - lo
    span[span == 0] = 1
    sw = None if importance is None else np.sqrt(importance)
    wt = 1 if importance is None else importance
    tmp = np.empty((2, *x.shape), np.float32)
    best = np.full(lo.shape, np.inf, np.float32)
    scale, zp = np.ones_like(lo), np.zeros_like(lo)
    for f in _SHRINK:
        s = span * (f / qmax)
        z0 = np.rint(-lo / s)
        for dz in (-1, 0, 1):
            z = np.clip(z0 + dz, 0, qmax)
            e = _sse(x, 1 / s, z, qmax, tmp, sw) * (s * s)
            better = e < best
            best[better], scale[better], zp[better] = e[better], s[better], z[better]
    for _ in range(_REFINE):
        c = np.clip(np.rint(x / scale + zp), 0, qmax) - zp
        wc = c * wt
        den = np.einsum("...j,...j->...", wc, c)[..., None]
        s = np.einsum("...j,...j->...", x, wc)[..., None] / np.where(den > 0, den, 1)
        s = np.where(s > 0, s, scale)
        e = _sse(x, 1 / s, zp, qmax, tmp, sw) * (s * s)
        better = e < best
        best[better], scale[better] = e[better], s[better]
    return scale, zp


def _round_to_nearest(x: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """The baseline: the block's [min, max] (with 0) in qmax steps, zero point rounded."""
    lo = np.minimum(x.min(-1, keepdims=True), 0)
    s = (np.maximum(x.max(-1, keepdims=True), 0) - lo) / qmax
    s[s == 0] = 1
    return s, np.clip(np.rint(-lo / s), 0, qmax)


def quantize(
    w: np.ndarray,
    bits: int = 4,
    block_size: int = 32,
    search: bool = True,
    importance: np.ndarray | None = None,
) -> NBitsWeight:
    """Quantize a float [N, K] weight to MatMulNBits form.

    4-bit: asymmetric, uint8 zero points (the fast kernel path), scale and zero point searched per block
    for the least squared error, weighted by `importance` [K] when given (the mean square of each input
    channel's activation, see calibrate.py); search=False: plain round-to-nearest, for comparison. 8-bit: symmetric
    absmax/127 (rounded to float16) with the op's default zero point 128, GGUF's Q8_0: its error is already ~1/15 of
    4-bit's, a zero point would buy little, and the graph keeps one 8-bit form.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    n, k = w.shape
    if k % block_size or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16 dividing K={k}, got {block_size}")
    nb, qmax = k // block_size, (1 << bits) - 1
    x = np.asarray(w, np.float32).reshape(n, nb, block_size)
    if importance is not None:  # relative, floored: a block of silent channels still gets a sane fit
        imp = np.asarray(importance, np.float32)
        importance = (imp / max(float(imp.mean()), 1e-30) + 1e-3).reshape(nb, block_size)
    scales, zps = np.empty((n, nb), np.float32), np.empty((n, nb), np.uint8)
    codes = np.empty((n, nb, block_size), np.uint8)
    step = max(1, (1 << 17) // k)  # rows per chunk: ~512 KiB of float32, cache-sized temporaries
    for r in range(0, n, step):
        xr = x[r : r + step]
        if bits == 8:  # float16 scales, as GGUF's Q8_0: our MatMulQ8_0 runs it (q8_0_blocks)
            s = (np.abs(xr).max(axis=-1, keepdims=True) / 127).astype(np.float16).astype(np.float32)
            s[s == 0] = 1
            z = np.float32(128)
        else:
            s, z = _search(xr, qmax, importance) if search else _round_to_nearest(xr, qmax)
            zps[r : r + step] = z[..., 0]
        codes[r : r + step] = np.clip(np.rint(xr / s + z), 0, qmax)
        scales[r : r + step] = s[..., 0]
    if bits == 8:
        return NBitsWeight(8, block_size, codes, scales)
    return NBitsWeight(4, block_size, _pack(codes, 4), scales, _pack(zps, 4))
