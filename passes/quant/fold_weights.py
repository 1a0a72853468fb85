"""Fold weights that a model computes from constants, so that quantization can match them.

Exporters sometimes write a weight as a little graph instead of an initializer:
``ConstantOfShape(shape)``, ``Reshape``/``Transpose``/``Cast``/``Unsqueeze`` of an
initializer, ``Identity`` chains. ``find_weight`` refuses those ("weight is not a
constant"). ``fold_weight_paths`` evaluates, for each Conv/Gemm/MatMul, the producers of its
weight (and bias) input when everything they read is a constant, with ONNX's reference
evaluator, and replaces the computed value with one initializer holding the result. It
is exact: the initializer is bit for bit what the nodes computed. Nothing else in the
graph is touched, and a path that reads a graph input, a node of another domain, a
random op, a subgraph or a (de)quantize (a weight already compressed) is left as it is.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator

from kiln.compiler.core.pass_api import add_initializer, remove_unused_initializers
from kiln.passes.quant.weights import QUANT_KEY, WEIGHT_OPS

#: A weight path longer than this is not folded (a real weight path is a handful of nodes).
MAX_PATH_NODES = 64
#: Random ops are not constants; a (de)quantize is a compressed weight, kept compressed.
_NEVER_FOLD = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
               "Multinomial", "Bernoulli", "DequantizeLinear", "QuantizeLinear",
               "DynamicQuantizeLinear")


def _is_constant_leaf(value: ir.Value) -> bool:
    return value.const_value is not None and not value.is_graph_input()


def _weight_path(value: ir.Value) -> list[ir.Node] | None:
    """The nodes computing ``value`` from constants only, in graph order; None when the
    value is not computed, or when the computation reads anything but constants."""
    if value.const_value is not None or value.producer() is None:
        return None
    path: dict[int, ir.Node] = {}
    stack = [value]
    while stack:
        current = stack.pop()
        if _is_constant_leaf(current):
            continue
        node = current.producer()
        if node is None or node.domain not in ("", "ai.onnx") or node.op_type in _NEVER_FOLD \
                or QUANT_KEY in node.metadata_props:
            return None
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
               for a in node.attributes.values()):
            return None
        if id(node) in path:
            continue
        path[id(node)] = node
        if len(path) > MAX_PATH_NODES:
            return None
        stack.extend(v for v in node.inputs if v is not None)
    graph = value.producer().graph
    order = {id(n): i for i, n in enumerate(graph)} if graph is not None else {}
    return sorted(path.values(), key=lambda n: order.get(id(n), 0))


def _evaluate(model: ir.Model, path: list[ir.Node], value: ir.Value):
    """Run ``path`` with ONNX's reference evaluator; the array of ``value``."""
    inside = {id(v) for n in path for v in n.outputs}
    leaves: dict[str, ir.Value] = {}
    for node in path:
        for v in node.inputs:
            if v is not None and id(v) not in inside:
                leaves[v.name] = v
    nodes = [ir.serde.serialize_node(n) for n in path]
    initializers = [ir.serde.serialize_tensor(v.const_value) for v in leaves.values()]
    for proto, name in zip(initializers, leaves):
        proto.name = name
    graph = onnx.helper.make_graph(nodes, "weight_path", [], [
        onnx.helper.make_value_info(value.name, onnx.TypeProto())], initializer=initializers)
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()
              if d in ("", "ai.onnx")]
    proto = onnx.helper.make_model(graph, opset_imports=opsets)
    return ReferenceEvaluator(proto).run(None, {})[0]


def fold_weight_paths(model: ir.Model, nodes: list[ir.Node], *,
                      ops: tuple[str, ...] | None = WEIGHT_OPS,
                      indices: tuple[int, ...] | None = (1, 2)) -> list[str]:
    """Fold the computed weight (input 1) and bias (input 2) of each Conv/Gemm/MatMul in
    ``nodes``; returns the op types of the folded nodes (one entry per node removed).
    ``ops=None`` takes nodes of any op, ``indices=None`` every input of them."""
    graph = model.graph
    folded: list[str] = []
    for node in nodes:
        if (ops is not None and node.op_type not in ops) or node.domain not in ("", "ai.onnx"):
            continue
        for index in indices if indices is not None else range(len(node.inputs)):
            value = node.inputs[index] if len(node.inputs) > index else None
            if value is None or value.is_graph_output():
                continue
            path = _weight_path(value)
            if not path:
                continue
            try:
                array = _evaluate(model, path, value)
            except Exception:  # the reference evaluator cannot run it: leave the path
                continue
            base = value.name or f"{node.name or node.op_type}_weight"
            constant = add_initializer(graph, f"{base}_folded", array)
            value.replace_all_uses_with(constant)
            leaves = [v.name for n in path for v in n.inputs
                      if v is not None and v.name and v.is_initializer()]
            for dead in reversed(path):
                if all(not out.uses() and not out.is_graph_output() for out in dead.outputs):
                    graph.remove(dead, safe=True)
                    folded.append(dead.op_type)
            remove_unused_initializers(graph, leaves)
    return folded
