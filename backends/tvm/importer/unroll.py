"""``Scan`` and ``Loop`` with a static trip count, unrolled into plain nodes before import.

TVM 0.27's importer has neither. When the trip count is known (a Scan's scan-axis
length once shapes are bound; a Loop's constant ``M`` with a condition that stays true),
each iteration becomes a copy of the body (:func:`.control_flow.inline_graph`, names
prefixed ``<node>/<t>``), reading its slice with ``Gather`` and handing its state on;
the scan outputs are ``Unsqueeze``-d and ``Concat``-ed in order (reversed for a reverse
direction). A Loop whose body computes its condition from anything but the incoming
condition or a constant true, or whose ``M`` or initial condition is not constant, is
left as it is (and reported as unsupported).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .control_flow import inline_constant_ifs, inline_graph

logger = logging.getLogger(__name__)

#: Iterations unrolled at most (a longer static loop is left as it is).
MAX_UNROLLED_STEPS = 4096


def _body(node: onnx.NodeProto) -> onnx.GraphProto:
    return next(a.g for a in node.attribute if a.name == "body")


def _ints(node: onnx.NodeProto, name: str, default: list[int]) -> list[int]:
    for attr in node.attribute:
        if attr.name == name:
            return list(attr.ints)
    return default


def _int(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Static dims of the top graph's values (None where unknown), by shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    shapes = {}
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if value.type.tensor_type.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _constant_value(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(next(a.t for a in node.attribute if a.name == "value"))
    return None


class _Emitter:
    """Collects the nodes and initializers that replace one Scan/Loop."""

    def __init__(self, prefix: str, opset: int) -> None:
        self.prefix = prefix
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value) -> str:
        full = f"{self.prefix}/{name}"
        self.inits.append(numpy_helper.from_array(np.asarray(value), full))
        return full

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        out = f"{self.prefix}/{name}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def body(self, body: onnx.GraphProto, inputs: list[str], step: int) -> list[str]:
        outputs = [f"{self.prefix}/{step}/out{k}" for k in range(len(body.output))]
        nodes, inits = inline_graph(body, outputs, f"{self.prefix}/{step}", inputs)
        self.nodes += nodes
        self.inits += inits
        return outputs

    def stack(self, pieces: list[str], axis: int, out: str) -> None:
        """``out = Concat(Unsqueeze(p, axis) for p in pieces)``."""
        if self.opset >= 13:
            axes = self.const(f"{out}_axes", np.array([axis], np.int64))
            parts = [self.node("Unsqueeze", [p, axes], f"{out}_u{i}")
                     for i, p in enumerate(pieces)]
        else:  # Unsqueeze-1/11: axes is an attribute
            parts = [self.node("Unsqueeze", [p], f"{out}_u{i}", axes=[axis])
                     for i, p in enumerate(pieces)]
        self.nodes.append(helper.make_node("Concat", parts, [out], axis=axis,
                                           name=f"{self.prefix}/{out}"))


def unroll_scan(node: onnx.NodeProto, shapes, index: int, opset: int):
    """The nodes replacing a static Scan (opset 9+), or None when it is not static."""
    body = _body(node)
    scans = _int(node, "num_scan_inputs", 0)
    states = len(node.input) - scans
    if scans < 1 or states < 0:
        return None
    in_axes = _ints(node, "scan_input_axes", [0] * scans)
    in_dirs = _ints(node, "scan_input_directions", [0] * scans)
    out_count = len(body.output) - states
    out_axes = _ints(node, "scan_output_axes", [0] * out_count)
    out_dirs = _ints(node, "scan_output_directions", [0] * out_count)
    lengths = set()
    for name, axis in zip(node.input[states:], in_axes):
        shape = shapes.get(name)
        if shape is None:
            return None
        lengths.add(shape[axis % len(shape)])
    if len(lengths) != 1 or None in lengths or next(iter(lengths)) > MAX_UNROLLED_STEPS:
        return None
    steps = lengths.pop()
    emit = _Emitter(node.name or f"Scan_{index}", opset)
    state = list(node.input[:states])
    collected: list[list[str]] = [[] for _ in range(out_count)]
    for t in range(steps):
        slices = []
        for k, (name, axis, reverse) in enumerate(zip(node.input[states:], in_axes, in_dirs)):
            at = emit.const(f"{t}/index{k}", np.array(steps - 1 - t if reverse else t, np.int64))
            rank = len(shapes[name])
            slices.append(emit.node("Gather", [name, at], f"{t}/slice{k}", axis=axis % rank))
        outs = emit.body(body, state + slices, t)
        state = outs[:states]
        for k, out in enumerate(outs[states:]):
            collected[k].append(out)
    for out, final in zip(node.output[:states], state):
        emit.nodes.append(helper.make_node("Identity", [final], [out], name=f"{emit.prefix}/{out}"))
    for k, out in enumerate(node.output[states:]):
        if not out:
            continue
        pieces = collected[k][::-1] if out_dirs[k] else collected[k]
        rank = len(shapes.get(out, [])) or None
        axis = out_axes[k] % rank if rank else out_axes[k]
        emit.stack(pieces, axis, out)
    return emit


def _loop_condition_stays_true(body: onnx.GraphProto) -> bool:
    """Whether the body's condition output is its condition input (or a constant true)."""
    cond_in, cond_out = body.input[1].name, body.output[0].name
    if cond_out == cond_in:
        return True
    for node in body.node:
        if cond_out in node.output:
            if node.op_type == "Identity" and node.input[0] == cond_in:
                return True
            if node.op_type == "Constant":
                return bool(numpy_helper.to_array(node.attribute[0].t).reshape(-1).all())
            return False
    value = _constant_value(body, cond_out)
    return value is not None and bool(value.reshape(-1).all())


def unroll_loop(graph: onnx.GraphProto, node: onnx.NodeProto, index: int, opset: int):
    """The nodes replacing a Loop with constant M and a condition that stays true."""
    body = _body(node)
    trip = _constant_value(graph, node.input[0]) if node.input[0] else None
    cond = _constant_value(graph, node.input[1]) if len(node.input) > 1 and node.input[1] \
        else np.array(True)
    if trip is None or cond is None or not _loop_condition_stays_true(body):
        return None
    steps = int(trip.reshape(())) if bool(cond.reshape(())) else 0
    if steps > MAX_UNROLLED_STEPS:
        return None
    carried = list(node.input[2:])
    emit = _Emitter(node.name or f"Loop_{index}", opset)
    collected: list[list[str]] = [[] for _ in range(len(body.output) - 1 - len(carried))]
    cond_name = node.input[1] if len(node.input) > 1 and node.input[1] else \
        emit.const("cond", np.array(True))
    for t in range(steps):
        at = emit.const(f"{t}/iteration", np.array(t, np.int64))
        outs = emit.body(body, [at, cond_name] + carried, t)
        carried = outs[1:1 + len(carried)]
        for k, out in enumerate(outs[1 + len(carried):]):
            collected[k].append(out)
    for out, final in zip(node.output[:len(carried)], carried):
        emit.nodes.append(helper.make_node("Identity", [final], [out], name=f"{emit.prefix}/{out}"))
    for k, out in enumerate(node.output[len(carried):]):
        if out and collected[k]:
            emit.stack(collected[k], 0, out)
        elif out:
            return None  # zero iterations: an empty scan output of unknown shape
    return emit


def unroll_static_loops(model: onnx.ModelProto) -> int:
    """Unroll the top graph's static Scans and Loops in place; how many were unrolled."""
    graph = model.graph
    if not any(n.op_type in ("Scan", "Loop") for n in graph.node):
        return 0
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    shapes = _shapes(model)
    kept, unrolled = [], 0
    for index, node in enumerate(graph.node):
        emit = None
        if node.op_type == "Scan" and node.domain in ("", "ai.onnx") and opset >= 9:
            emit = unroll_scan(node, shapes, index, opset)
        elif node.op_type == "Loop" and node.domain in ("", "ai.onnx"):
            emit = unroll_loop(graph, node, index, opset)
        if emit is None:
            kept.append(node)
            continue
        kept += emit.nodes
        graph.initializer.extend(emit.inits)
        unrolled += 1
        logger.debug("unrolled %s %r", node.op_type, node.name)
    if unrolled:
        del graph.node[:]
        graph.node.extend(kept)
    return unrolled


_CONTROL_FLOW = frozenset({"If", "Scan", "Loop"})


def _has_control_flow(graph: onnx.GraphProto) -> bool:
    return any(node.op_type in _CONTROL_FLOW or any(
        _has_control_flow(sub) for attr in node.attribute
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs))
        for node in graph.node)


def fold_control_flow(proto: onnx.ModelProto,
                      refold: Callable[[onnx.ModelProto], onnx.ModelProto],
                      max_rounds: int = 8) -> onnx.ModelProto:
    """Inline the Ifs whose condition is constant and unroll the static Scans/Loops,
    folding constants (``refold``) after each round: an inlined branch or unrolled body
    can make the next condition constant."""
    if not _has_control_flow(proto.graph):
        return proto
    refolded = False
    for _ in range(max_rounds):
        if inline_constant_ifs(proto.graph) + unroll_static_loops(proto):
            proto, refolded = refold(proto), True
        elif refolded:
            break
        else:
            proto, refolded = refold(proto), True  # the conditions may fold now
    return proto
