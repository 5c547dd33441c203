"""A small ONNX graph builder whose initializers stream into one external weights file.

The graph proto only references byte ranges of the weights file, so a stage's graph stays small and
export memory stays at one tensor at a time. Several graphs (prompt and token) may share one file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10  # onnxruntime 1.31 reads up to 13; 10 keeps the QNN toolchain happy too
OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
ALIGN_LARGE = 4096  # page-aligned so ONNX Runtime can map big tensors
ALIGN_SMALL = 64


class WeightsFile:
    """Appends arrays to a file and hands out external-data TensorProtos pointing at them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.f = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.offset = 0
        self.protos: dict[str, TensorProto] = {}

    def add(self, name: str, array: np.ndarray) -> TensorProto:
        if name in self.protos:
            return self.protos[name]
        array = np.ascontiguousarray(array)
        align = ALIGN_LARGE if array.nbytes >= 65536 else ALIGN_SMALL
        pad = -self.offset % align
        if pad:
            self.f.write(b"\0" * pad)
            self.offset += pad
        self.f.write(array.tobytes())
        t = TensorProto(
            name=name, dims=list(array.shape), data_type=helper.np_dtype_to_tensor_dtype(array.dtype)
        )
        t.data_location = TensorProto.EXTERNAL
        for k, v in (
            ("location", self.path.name),
            ("offset", str(self.offset)),
            ("length", str(array.nbytes)),
        ):
            t.external_data.add(key=k, value=v)
        self.offset += array.nbytes
        self.protos[name] = t
        return t

    def close(self) -> None:
        self.f.close()


class GraphBuilder:
    def __init__(self, name: str, weights: WeightsFile) -> None:
        self.name = name
        self.weights = weights
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, TensorProto] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.count = 0

    def fresh(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def input(self, name: str, dtype: Any, shape: list[int | str]) -> str:
        self.inputs.append(
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape)
        )
        return name

    def output(self, value: str, name: str, dtype: Any, shape: list[int | str]) -> None:
        if value != name:
            self.op("Identity", [value], outputs=[name])
        self.outputs.append(
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape)
        )

    def weight(self, name: str, array: np.ndarray) -> str:
        """A tensor stored in the external weights file."""
        self.initializers[name] = self.weights.add(name, array)
        return name

    def const(self, array: np.ndarray | list[int], hint: str = "const") -> str:
        """A small constant embedded in the graph itself."""
        name = self.fresh(hint)
        self.initializers[name] = numpy_helper.from_array(np.asarray(array), name)
        return name

    def op(
        self,
        op_type: str,
        inputs: list[str],
        n_out: int = 1,
        outputs: list[str] | None = None,
        domain: str = "",
        **attrs: Any,
    ) -> Any:
        outs = outputs or [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, domain=domain or None, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def save(self, path: Path) -> None:
        graph = helper.make_graph(
            self.nodes, self.name, self.inputs, self.outputs, list(self.initializers.values())
        )
        domains = {n.domain for n in self.nodes} - {o.domain for o in OPSETS}
        opsets = OPSETS + [helper.make_opsetid(d, 1) for d in sorted(domains)]
        model = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, producer_name="splitllm")
        path.write_bytes(model.SerializeToString())
