"""Where the weight of a Conv, Gemm or MatMul is, which of its axes are the output
and input channels, and the grouped views the quantizers work on.

    Conv    W[O, I/groups, kh, kw]   out axis 0, in axis 1
    Gemm    B[K, N] (transB=0)       out axis 1, in axis 0;  B[N, K] (transB=1): out 0, in 1
    MatMul  B[K, N]                  out axis 1, in axis 0

A weight is refused (with a reason) when it is not a float constant, when another
node or the graph interface uses it, or when it is already the output of a dequantize.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from kiln.compiler.core import graph as kir

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
#: Metadata key set on every node a quantization pass emits (value: the format).
QUANT_KEY = "kiln.quant"


@dataclass(frozen=True)
class WeightSite:
    node: ir.Node
    value: ir.Value
    array: np.ndarray
    out_axis: int
    in_axis: int

    @property
    def index(self) -> int:
        return 1


def find_weight(node: ir.Node) -> WeightSite | str:
    """The weight of a Conv/Gemm/MatMul node, or the reason it cannot be quantized."""
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return "node has no weight input"
    value = node.inputs[1]
    producer = value.producer()
    if producer is not None and (QUANT_KEY in producer.metadata_props
                                 or producer.op_type == "DequantizeLinear"):
        return "weight is already quantized"
    tensor = kir.constant_tensor(value)
    if tensor is None:
        return "weight is not a constant"
    if value.dtype not in FLOAT_TYPES:
        return f"weight dtype {value.dtype} is not floating point"
    others = sorted({kir.node_label(n) for n, _ in value.uses() if n is not node})
    if others or value.is_graph_output() or value.is_graph_input():
        who = ", ".join(others) or "the graph interface"
        return f"weight {value.name!r} is shared with {who}"
    array = tensor.numpy()
    if node.op_type == "Conv":
        if array.ndim < 3:
            return f"Conv weight has rank {array.ndim}"
        return WeightSite(node, value, array, 0, 1)
    if array.ndim != 2:
        return f"{node.op_type} weight has rank {array.ndim}, expected 2"
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        return WeightSite(node, value, array, 0, 1)
    return WeightSite(node, value, array, 1, 0)


def inputs_of(node: ir.Node) -> ir.Value | None:
    """The activation input of a weight op."""
    return node.inputs[0] if node.inputs else None


@dataclass(frozen=True)
class Grouping:
    """How a weight maps to a grouped view ``[n, L]`` and back.

    ``kind`` is ``per_tensor``, ``per_channel`` (one group per output channel) or
    ``group`` (blocks of ``size`` along the input axis, padded at the end).
    """

    kind: str
    shape: tuple[int, ...]
    out_axis: int
    in_axis: int
    size: int = 0

    @property
    def blocks(self) -> int:
        return math.ceil(self.shape[self.in_axis] / self.size) if self.kind == "group" else 1

    def view(self, w: np.ndarray) -> np.ndarray:
        if self.kind == "per_tensor":
            return w.reshape(1, -1)
        if self.kind == "per_channel":
            return np.moveaxis(w, self.out_axis, 0).reshape(w.shape[self.out_axis], -1)
        moved = np.moveaxis(w, self.in_axis, -1)
        d = moved.shape[-1]
        pad = self.blocks * self.size - d
        if pad:
            moved = np.concatenate([moved, np.zeros(moved.shape[:-1] + (pad,), moved.dtype)], -1)
        return moved.reshape(-1, self.size)

    def unview(self, g: np.ndarray) -> np.ndarray:
        """Grouped values [n, L] back to the weight's shape."""
        if self.kind == "per_tensor":
            return g.reshape(self.shape)
        if self.kind == "per_channel":
            moved = list(self.shape)
            moved.insert(0, moved.pop(self.out_axis))
            return np.moveaxis(g.reshape(moved), 0, self.out_axis)
        moved = [d for i, d in enumerate(self.shape) if i != self.in_axis]
        d = self.shape[self.in_axis]
        full = g.reshape(moved + [self.blocks * self.size])[..., :d]
        return np.moveaxis(full, -1, self.in_axis)

    def param_shape(self) -> tuple[int, ...]:
        """Shape of a per-group parameter in DequantizeLinear's layout."""
        if self.kind == "per_tensor":
            return ()
        if self.kind == "per_channel":
            return (self.shape[self.out_axis],)
        shape = list(self.shape)
        shape[self.in_axis] = self.blocks
        return tuple(shape)

    def params(self, per_group: np.ndarray) -> np.ndarray:
        """A per-group vector [n] in DequantizeLinear's layout (see ``param_shape``)."""
        if self.kind != "group":
            return per_group.reshape(self.param_shape())
        moved = [d for i, d in enumerate(self.shape) if i != self.in_axis] + [self.blocks]
        return np.moveaxis(per_group.reshape(moved), -1, self.in_axis)

    def dequantize_attributes(self) -> dict[str, int]:
        if self.kind == "per_tensor":
            return {}
        if self.kind == "per_channel":
            return {"axis": self.out_axis}
        return {"axis": self.in_axis, "block_size": self.size}
