"""The float ops between integer convolutions run channels-last (NHWC).

The integer kernels (:mod:`.int8_chains`) compute NHWC between ``Transpose`` nodes; two
consecutive kernels drop the pair between them (``cancel_transposes``), but float ops in
between keep the NCHW copy: PP-OCR det's FPN neck (SE ``Mul`` / ``Add`` / nearest
``Resize`` / ``Concat`` / ``GlobalAveragePool`` -> ``QuantizeLinear``) transposed every
NHWC kernel output to NCHW and every quantized result back, ~9 of 42 ms of the int8
model on AVX2 (1 thread).

:func:`channels_last_regions` gives each op that only moves or combines values
elementwise, per channel or over H and W an NHWC twin wherever its activations have an
NHWC version (the input of a kernel's ``_to_nchw`` transpose, or another twin's output):
constants ``[1, C, 1, 1]`` / ``[C, 1, 1]`` are transposed, ``Concat`` / per-channel
``Q``/``DQ`` axes and ``Resize`` scales/sizes/roi permuted, ``GlobalAveragePool`` /
``GlobalMaxPool`` become ``ReduceMean`` / ``ReduceMax`` over axes 1, 2. A kernel's
``_to_nhwc`` transpose of a value with a twin then reads the twin, and a float value
still read in NCHW (a graph output, a ``ConvTranspose``) is one transpose of its twin.
The values are the same ops on the same numbers (a mean's summation order aside).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .int8_exact_ops import constant_tensors
from .packed_weights import attributes

_TO_NHWC = (0, 2, 3, 1)
_TO_NCHW = (0, 3, 1, 2)
#: NCHW axis -> its position in NHWC.
_AXIS = {0: 0, 1: 3, 2: 1, 3: 2}
#: elementwise ops (every input broadcast against the others).
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "PRelu",
                          "Relu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "LeakyRelu",
                          "Identity", "Clip", "Erf", "Neg", "Abs"})
_GLOBAL_POOLS = {"GlobalAveragePool": "ReduceMean", "GlobalMaxPool": "ReduceMax"}
_STANDARD = ("", "ai.onnx")


def _perm(node: onnx.NodeProto) -> tuple:
    return tuple(attributes(node).get("perm", ()))


class _Twins:
    """NHWC twins of a graph's nodes (``nhwc``: NCHW value name -> its NHWC value)."""

    def __init__(self, graph: onnx.GraphProto, opset: int) -> None:
        self.consts = constant_tensors(graph)
        self.opset = opset
        self.nhwc: dict[str, str] = {}
        self.inits: list[onnx.TensorProto] = []

    def _constant(self, name: str, rank4: bool) -> str | None:
        """``name``'s NHWC form when it is a constant that broadcasts in NCHW, else None."""
        t = self.consts.get(name)
        if t is None:
            return None
        v = numpy_helper.to_array(t)
        if v.size == 1 and v.ndim <= 1 or v.ndim == 0:
            return name
        if not rank4 or v.ndim not in (3, 4):
            return None
        v = v.reshape((1,) * (4 - v.ndim) + v.shape).transpose(_TO_NHWC)
        out = f"{name}__nhwc"
        if all(i.name != out for i in self.inits):
            self.inits.append(numpy_helper.from_array(np.ascontiguousarray(v), out))
        return out

    def _permuted(self, name: str, order=_TO_NHWC) -> str | None:
        """A constant 1-D ``name`` of 4 (or 8: roi) entries permuted to NHWC."""
        t = self.consts.get(name)
        if t is None:
            return None
        v = numpy_helper.to_array(t)
        if v.shape == (4,):
            v = v[list(order)]
        elif v.shape == (8,):
            v = np.concatenate([v[:4][list(order)], v[4:][list(order)]])
        elif v.size != 0:
            return None
        out = f"{name}__nhwc"
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(v), out))
        return out

    def twin(self, node: onnx.NodeProto) -> onnx.NodeProto | None:
        """``node``'s NHWC twin, or None when it has none."""
        op = node.op_type
        if node.domain not in _STANDARD or len(node.output) != 1 or not node.input:
            return None
        if op not in _ELEMENTWISE and op != "Concat" and node.input[0] not in self.nhwc:
            return None
        attrs = attributes(node)
        inputs, extra = None, {}
        if op in _ELEMENTWISE:
            if not any(i in self.nhwc for i in node.input):
                return None
            inputs = [self.nhwc.get(i) or self._constant(i, True) if i else "" for i in node.input]
        elif op == "Concat":
            if not any(i in self.nhwc for i in node.input):
                return None
            inputs = [self.nhwc.get(i) or self._constant(i, True) for i in node.input]
            extra["axis"] = _AXIS[attrs["axis"] % 4]
        elif op in ("QuantizeLinear", "DequantizeLinear"):
            params = [self._constant(i, False) for i in node.input[1:]]
            if attrs.get("block_size") or any(p is None for p in params):
                return None
            scale = numpy_helper.to_array(self.consts[node.input[1]])
            if scale.size > 1:
                extra["axis"] = _AXIS[attrs.get("axis", 1) % 4]
            inputs = [self.nhwc[node.input[0]], *params]
        elif op == "Resize" and "axes" not in attrs:
            rest = [self._permuted(i) if i else "" for i in node.input[1:]]
            inputs = [self.nhwc[node.input[0]], *rest]
        elif op in _GLOBAL_POOLS:
            x = self.nhwc[node.input[0]]
            if self.opset >= 18:
                axes = f"{node.output[0]}__nhwc_axes"
                self.inits.append(numpy_helper.from_array(np.array([1, 2], np.int64), axes))
                twin = helper.make_node(_GLOBAL_POOLS[op], [x, axes], [f"{node.output[0]}__nhwc"],
                                        name=f"{node.name}__nhwc", keepdims=1)
            else:
                twin = helper.make_node(_GLOBAL_POOLS[op], [x], [f"{node.output[0]}__nhwc"],
                                        name=f"{node.name}__nhwc", axes=[1, 2], keepdims=1)
            self.nhwc[node.output[0]] = twin.output[0]
            return twin
        if inputs is None or any(i is None for i in inputs):
            return None
        twin = helper.make_node(op, inputs, [f"{node.output[0]}__nhwc"], name=f"{node.name}__nhwc")
        twin.attribute.extend(a for a in node.attribute if a.name not in extra)
        for key, value in extra.items():
            twin.attribute.append(helper.make_attribute(key, value))
        self.nhwc[node.output[0]] = twin.output[0]
        return twin


def channels_last_regions(graph: onnx.GraphProto, opset: int) -> int:
    """Give the float ops between integer kernels NHWC twins (in place; see the module
    docstring); returns how many ``_to_nhwc`` transposes now read a twin (0: unchanged)."""
    twins = _Twins(graph, opset)
    original = list(graph.node)  # one wrapper per node: ids stay valid below
    for node in original:
        if node.op_type == "Transpose" and _perm(node) == _TO_NCHW \
                and node.name.endswith("_to_nchw"):
            twins.nhwc[node.output[0]] = node.input[0]
    seeds = set(twins.nhwc)
    made: dict[int, onnx.NodeProto] = {}
    for node in original:
        t = twins.twin(node)
        if t is not None:
            made[id(node)] = t
    outputs = {o.name for o in graph.output}
    rename = {n.output[0]: twins.nhwc[n.input[0]] for n in original
              if n.op_type == "Transpose" and _perm(n) == _TO_NHWC and n.input[0] in twins.nhwc
              and n.output[0] not in outputs}
    if not rename:
        return 0
    nodes, removable = [], set()
    for node in original:
        if node.output[0] in rename:
            continue
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
        if id(node) not in made:
            nodes.append(node)
            if node.output[0] in seeds:
                removable.add(id(node))
            continue
        # the twin, then the NCHW value as its transpose (dropped below if nothing reads it)
        back = helper.make_node("Transpose", [twins.nhwc[node.output[0]]], [node.output[0]],
                                name=f"{node.name}__to_nchw", perm=list(_TO_NCHW))
        nodes += [made[id(node)], back]
        removable.update((id(made[id(node)]), id(back)))
    while True:  # drop what nothing reads
        read = {name for n in nodes for name in n.input} | outputs
        dead = {id(n) for n in nodes if id(n) in removable and n.output[0] not in read}
        if not dead:
            break
        nodes = [n for n in nodes if id(n) not in dead]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(twins.inits)
    return len(rename)


__all__ = ["channels_last_regions"]
