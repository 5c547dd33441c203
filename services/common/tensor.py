"""Tensor <-> numpy, the one place wire tensors are converted. Raw little-endian bytes, never pickle."""

from __future__ import annotations

import math

import numpy as np

from splitllm.protos import tensor_pb2
from splitllm.services.common.errors import invalid

DTYPES = {
    tensor_pb2.FLOAT32: np.dtype("<f4"),
    tensor_pb2.FLOAT16: np.dtype("<f2"),
    tensor_pb2.INT32: np.dtype("<i4"),
    tensor_pb2.INT64: np.dtype("<i8"),
    tensor_pb2.UINT8: np.dtype("u1"),
    tensor_pb2.INT8: np.dtype("i1"),
    tensor_pb2.UINT16: np.dtype("<u2"),
}
CODES = {v: k for k, v in DTYPES.items()}
ALLOWED = ", ".join(str(d) for d in CODES)


def to_proto(a: np.ndarray, out: tensor_pb2.Tensor | None = None) -> tensor_pb2.Tensor:
    t = out if out is not None else tensor_pb2.Tensor()
    dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
    code = CODES.get(np.dtype(dt))
    if code is None:
        raise ValueError(f"dtype {a.dtype} has no wire encoding (allowed: {ALLOWED})")
    t.dtype = code
    t.shape[:] = a.shape
    t.data = np.ascontiguousarray(a, dtype=dt).tobytes()
    return t


def from_proto(t: tensor_pb2.Tensor, field: str = "tensor") -> np.ndarray:
    """A read-only numpy view of the bytes; INVALID_ARGUMENT naming `field` if they do not add up."""
    dt = DTYPES.get(t.dtype)
    if dt is None:
        raise invalid(f"{field}: dtype {t.dtype} is not supported (allowed: {ALLOWED})")
    shape = tuple(t.shape)
    if any(d < 0 for d in shape):
        raise invalid(f"{field}: negative dimension in shape {list(shape)}")
    n = math.prod(shape)  # not np.prod: 10 us a call, on every entry of every step
    data = t.data  # each read of a bytes field makes a new copy (a prompt chunk's: 74 KB on the default model)
    if len(data) != n * dt.itemsize:
        want = n * dt.itemsize
        raise invalid(f"{field}: {len(data)} bytes do not match shape {list(shape)} of {dt} ({want} bytes)")
    return np.frombuffer(data, dtype=dt).reshape(shape)
