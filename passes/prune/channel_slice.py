"""Shrink a model to the channels a pruning keeps (structured pruning's mechanism).

Given, for each channel dimension ``(tensor, axis)`` of accepted groups, the positions
that stay, every node touching those dims gets new, smaller constants (never edited in
place; a constant nobody uses any more is removed, and the new one takes its name):

- Conv: ``W[keep_out][:, keep_in]`` and ``B[keep_out]``; a grouped or depthwise Conv keeps
  ``W[keep_out]`` and its ``group`` becomes the number of groups left;
- Gemm: B's N axis (by ``transB``) and K axis, C's last axis; MatMul: ``W[keep_in][:, keep_out]``;
- BatchNormalization / InstanceNormalization: the per-channel parameters;
- elementwise ops: a constant operand's broadcast axis when it spans the channels;
- Reshape: an explicit target size on the axis becomes the new size (the number of heads
  left, or the kept channels when heads are merged back).

Then the value shapes of those dims are updated, so ONNX Runtime and TVM build the
smaller model as it is.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kiln.compiler.core.pass_api import add_initializer, remove_unused_initializers

from .channel_graph import BINARY_OPS, Dim, const_array, shape_dims

Kept = dict[Dim, np.ndarray]


def replace_const(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray) -> ir.Value:
    """Give ``node`` a new constant ``array`` as input ``index``; the old one is removed
    when nothing else uses it, and the new one then takes its name."""
    old = node.inputs[index]
    assert old is not None
    name = old.name or f"{node.name}_const"
    new = add_initializer(graph, f"{name}_pruned", np.ascontiguousarray(array))
    node.replace_input_with(index, new)
    _retire(graph, old, new, name)
    return new


def replace_initializer(graph: ir.Graph, old: ir.Value, array: np.ndarray) -> ir.Value:
    """Point every user of initializer ``old`` at a new one holding ``array`` (its name)."""
    name = old.name or "const"
    new = add_initializer(graph, f"{name}_new", np.ascontiguousarray(array))
    old.replace_all_uses_with(new)
    _retire(graph, old, new, name)
    return new


def _retire(graph: ir.Graph, old: ir.Value, new: ir.Value, name: str) -> None:
    producer = old.producer()
    if old.is_initializer():
        remove_unused_initializers(graph, [name])
    elif producer is not None and producer.op_type == "Constant" and not old.uses() \
            and not old.is_graph_output():
        graph.remove(producer, safe=True)
    if name not in graph.initializers and not any(
            v.name == name for n in graph for v in n.outputs):
        new.name = name


def _take(array: np.ndarray, keep: np.ndarray | None, axis: int) -> np.ndarray:
    return array if keep is None else np.take(array, keep, axis=axis)


class _NodeView:
    def __init__(self, node: ir.Node, kept: Kept) -> None:
        self.node = node
        self.kept = kept

    def input_keep(self, index: int, axis: int) -> np.ndarray | None:
        value = self.node.inputs[index] if index < len(self.node.inputs) else None
        if value is None or not value.name:
            return None
        return self.kept.get((value.name, axis))

    def output_keep(self, axis: int) -> np.ndarray | None:
        out = self.node.outputs[0]
        return self.kept.get((out.name, axis)) if out.name else None


def _conv(graph: ir.Graph, view: _NodeView) -> bool:
    node = view.node
    keep_out, keep_in = view.output_keep(1), view.input_keep(0, 1)
    if keep_out is None and keep_in is None:
        return False
    weight = const_array(node.inputs[1])
    assert weight is not None
    group = node.attributes.get_int("group", 1)
    w = _take(weight, keep_out, 0)
    if group == 1:
        w = _take(w, keep_in, 1)
    elif keep_in is not None:
        in_shape = shape_dims(node.inputs[0])
        assert in_shape is not None
        per_in = in_shape[1] // group
        node.attributes["group"] = ir.AttrInt64("group", len(keep_in) // per_in)
    replace_const(graph, node, 1, w)
    if len(node.inputs) > 2 and node.inputs[2] is not None and keep_out is not None:
        bias = const_array(node.inputs[2])
        assert bias is not None
        replace_const(graph, node, 2, bias[keep_out])
    return True


def _gemm(graph: ir.Graph, view: _NodeView) -> bool:
    node = view.node
    keep_out, keep_in = view.output_keep(1), view.input_keep(0, 1)
    if keep_out is None and keep_in is None:
        return False
    weight = const_array(node.inputs[1])
    assert weight is not None
    n_axis = 0 if node.attributes.get_int("transB", 0) else 1
    w = _take(_take(weight, keep_out, n_axis), keep_in, 1 - n_axis)
    replace_const(graph, node, 1, w)
    if len(node.inputs) > 2 and node.inputs[2] is not None and keep_out is not None:
        c = const_array(node.inputs[2])
        assert c is not None
        if c.ndim >= 1 and c.shape[-1] == weight.shape[n_axis]:
            replace_const(graph, node, 2, c[..., keep_out])
    return True


def _matmul(graph: ir.Graph, view: _NodeView) -> bool:
    node = view.node
    rank = len(node.outputs[0].shape or ())
    keep_out, keep_in = view.output_keep(rank - 1), view.input_keep(0, rank - 1)
    weight = const_array(node.inputs[1])
    if weight is None or (keep_out is None and keep_in is None):
        return False  # a MatMul of two activations has nothing to cut
    replace_const(graph, node, 1, _take(_take(weight, keep_in, 0), keep_out, 1))
    return True


def _per_channel_params(graph: ir.Graph, view: _NodeView, params: range) -> bool:
    keep = view.input_keep(0, 1)
    if keep is None:
        return False
    for index in params:
        array = const_array(view.node.inputs[index])
        if array is not None:
            replace_const(graph, view.node, index, array[keep])
    return True


def _elementwise(graph: ir.Graph, view: _NodeView) -> bool:
    node = view.node
    out_shape = shape_dims(node.outputs[0])
    if out_shape is None:
        return False
    rank, changed = len(out_shape), False
    for axis in range(rank):
        keep = view.output_keep(axis)
        if keep is None:
            continue
        for index, operand in enumerate(node.inputs):
            array = const_array(operand)
            if array is None:
                continue
            a = axis - (rank - array.ndim)
            if a >= 0 and array.shape[a] == out_shape[axis] and array.shape[a] > 1:
                replace_const(graph, node, index, np.take(array, keep, axis=a))
                changed = True
    return changed


def _reshape(graph: ir.Graph, view: _NodeView) -> bool:
    node = view.node
    out_shape = shape_dims(node.outputs[0])
    target = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if out_shape is None or target is None:
        return False
    new = target.copy()
    for axis in range(len(out_shape)):
        keep = view.output_keep(axis)
        if keep is not None and new[axis] > 0:
            new[axis] = len(keep)
    if np.array_equal(new, target):
        return False
    replace_const(graph, node, 1, new)
    return True


def shrink(model: ir.Model, kept: Kept) -> int:
    """Apply ``kept`` (dim -> positions that stay) to the model; returns how many nodes
    changed. Value shapes of the dims are updated last."""
    graph = model.graph
    changed = 0
    for node in list(graph):
        view = _NodeView(node, kept)
        op = node.op_type
        if op == "Conv":
            changed += _conv(graph, view)
        elif op == "Gemm":
            changed += _gemm(graph, view)
        elif op == "MatMul":
            changed += _matmul(graph, view)
        elif op == "BatchNormalization":
            changed += _per_channel_params(graph, view, range(1, 5))
        elif op == "InstanceNormalization":
            changed += _per_channel_params(graph, view, range(1, 3))
        elif op in BINARY_OPS:
            changed += _elementwise(graph, view)
        elif op == "Reshape":
            changed += _reshape(graph, view)
    values = {v.name: v for n in graph for v in n.outputs if v.name}
    for (name, axis), keep in kept.items():
        value = values.get(name)
        if value is None or value.shape is None:
            continue
        dims = list(value.shape.dims)
        dims[axis] = len(keep)
        value.shape = ir.Shape(dims)
    return changed
