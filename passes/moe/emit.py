"""Writing a MoE layer back in kiln's documented forms (docs/moe.md).

- **top-k (sparse dispatch)**: for each expert e, the (token, slot) pairs that chose it
  (``NonZero(Equal(topk_indices, e))``) gather their rows of x, run expert e on those rows
  only, scale them by their gate value and scatter them back
  (``ScatterND`` into zeros): y = the Sum of the E scattered outputs. Only chosen experts run
  on a token; token counts per expert are dynamic.
- **dense mixture (stacked)**: the experts' weights stacked to ``[E, D, H]``/``[E, H, D]``,
  one batched MatMul each, weighted by the transposed gate and summed over the expert axis.

Both read x as ``[T, D]`` (flattened from ``[..., D]`` and reshaped back). Needs opset >= 13.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnx_ir import tape as ir_tape

from kiln.compiler.core.pass_api import add_initializer, replace_value, unique_name
from kiln.passes.moe.form import MOE_KEY, Expert, MoeLayer

MIN_OPSET = 13


def model_opset(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)))


class _Builder:
    def __init__(self, graph: ir.Graph, prefix: str, dtype: np.dtype, opset: int) -> None:
        self.graph = graph
        self.prefix = prefix
        self.dtype = dtype
        self.opset = opset
        self.tape = ir_tape.Tape()

    def const(self, name: str, array) -> ir.Value:
        array = np.asarray(array)
        if array.dtype.kind == "f":
            array = array.astype(self.dtype)
        return add_initializer(self.graph, f"{self.prefix}_{name}", array)

    def op(self, op_type: str, inputs, **attributes) -> ir.Value:
        return self.tape.op(op_type, inputs, attributes or None)

    def op2(self, op_type: str, inputs, **attributes):
        return self.tape.op_multi_out(op_type, inputs, attributes or None, num_outputs=2)

    def act(self, h: ir.Value, activation: str) -> ir.Value:
        if activation == "relu":
            return self.op("Relu", [h])
        if activation == "tanh":
            return self.op("Tanh", [h])
        if activation == "silu":
            return self.op("Mul", [h, self.op("Sigmoid", [h])])
        if activation == "gelu":
            if self.opset >= 20:
                return self.op("Gelu", [h])
            erf = self.op("Erf", [self.op("Mul", [h, self.const("inv_sqrt2",
                                                              1 / math.sqrt(2.0))])])
            half = self.op("Mul", [h, self.const("half", 0.5)])
            return self.op("Mul", [half, self.op("Add", [erf, self.const("one", 1.0)])])
        return h

    def linear(self, x: ir.Value, w: np.ndarray, b: np.ndarray | None, name: str) -> ir.Value:
        out = self.op("MatMul", [x, self.const(f"{name}_w", w)])
        if b is not None:
            out = self.op("Add", [out, self.const(f"{name}_b", b)])
        return out

    def ffn(self, x: ir.Value, e: Expert, activation: str, name: str) -> ir.Value:
        h = self.act(self.linear(x, e.w1, e.b1, f"{name}_w1"), activation)
        if e.w3 is not None:
            h = self.op("Mul", [h, self.linear(x, e.w3, e.b3, f"{name}_w3")])
        return self.linear(h, e.w2, e.b2, f"{name}_w2")


def _gate(b: _Builder, layer: MoeLayer, xf: ir.Value) -> ir.Value:
    t = layer.temperature
    logits = b.linear(xf, layer.router_w / t,
                      None if layer.router_b is None else layer.router_b / t, "router")
    if layer.gate == "softmax":
        return b.op("Softmax", [logits], axis=-1)
    return b.op("Sigmoid", [logits])


def _sparse(b: _Builder, layer: MoeLayer, xf: ir.Value, p: ir.Value, d_out: int) -> ir.Value:
    values, indices = b.op2("TopK", [p, b.const("k", np.array([layer.k], np.int64))], axis=-1)
    if layer.renormalize:
        total = b.op("ReduceSum", [values, b.const("last", np.array([-1], np.int64))],
                     keepdims=1)
        values = b.op("Div", [values, total])
    rows = b.op("Slice", [b.op("Shape", [xf]), b.const("zero", np.array([0], np.int64)),
                          b.const("one_i", np.array([1], np.int64))])
    zeros = b.op("ConstantOfShape", [b.op("Concat", [rows, b.const(
        "d_out", np.array([d_out], np.int64))], axis=0)],
        value=ir.tensor(np.zeros(1, b.dtype)))
    first = b.const("first", np.array([0], np.int64))
    axis1 = b.const("axis1", np.array([1], np.int64))
    parts = []
    for e, expert in enumerate(layer.experts):
        hits = b.op("NonZero", [b.op("Equal", [indices, b.const(f"e{e}",
                                                               np.array(e, np.int64))])])
        pairs = b.op("Transpose", [hits], perm=[1, 0])                    # [n, 2]
        tokens = b.op("Gather", [hits, first], axis=0)                    # [1, n]
        weight = b.op("GatherND", [values, pairs])                        # [n]
        rows_e = b.op("Transpose", [tokens], perm=[1, 0])                 # [n, 1]
        x_e = b.op("GatherND", [xf, rows_e])                              # [n, D]
        y_e = b.ffn(x_e, expert, layer.activation, f"expert{e}")
        y_e = b.op("Mul", [y_e, b.op("Unsqueeze", [weight, axis1])])
        parts.append(b.op("ScatterND", [zeros, rows_e, y_e]))
    return parts[0] if len(parts) == 1 else b.op("Sum", parts)


def _dense(b: _Builder, layer: MoeLayer, xf: ir.Value, p: ir.Value) -> ir.Value:
    ex = layer.experts

    def stack(name: str, key: str) -> np.ndarray | None:
        arrays = [getattr(e, key) for e in ex]
        if arrays[0] is None:
            return None
        out = np.stack(arrays)
        return out[:, None, :] if out.ndim == 2 else out
    h = b.op("MatMul", [xf, b.const("w1", stack("w1", "w1"))])           # [E, T, H]
    if (b1 := stack("b1", "b1")) is not None:
        h = b.op("Add", [h, b.const("b1", b1)])
    h = b.act(h, layer.activation)
    if ex[0].w3 is not None:
        up = b.op("MatMul", [xf, b.const("w3", stack("w3", "w3"))])
        if (b3 := stack("b3", "b3")) is not None:
            up = b.op("Add", [up, b.const("b3", b3)])
        h = b.op("Mul", [h, up])
    out = b.op("MatMul", [h, b.const("w2", stack("w2", "w2"))])          # [E, T, D_out]
    if (b2 := stack("b2", "b2")) is not None:
        out = b.op("Add", [out, b.const("b2", b2)])
    g = b.op("Unsqueeze", [b.op("Transpose", [p], perm=[1, 0]),
                           b.const("axis2", np.array([2], np.int64))])    # [E, T, 1]
    return b.op("ReduceSum", [b.op("Mul", [out, g]), b.const("axis0", np.array([0], np.int64))],
                keepdims=0)


def _unique_prefix(graph: ir.Graph, name: str) -> str:
    """A prefix no node name or value name starts with yet (one per emitted layer)."""
    used = {n.name.split("/")[0] for n in graph if n.name}
    base = unique_name(graph, name)
    prefix, i = base, 0
    while prefix in used:
        i += 1
        prefix = unique_name(graph, f"{base}_{i}")
    return prefix


def emit(model: ir.Model, layer: MoeLayer, *, name: str) -> ir.Value:
    """Replace ``layer``'s nodes by its documented form (top-k when ``layer.k`` is set, the
    stacked dense mixture otherwise); returns the new output value."""
    graph = model.graph
    prefix = _unique_prefix(graph, name)
    b = _Builder(graph, prefix, layer.dtype, model_opset(model))
    d_in = layer.router_w.shape[0]
    d_out = layer.experts[0].w2.shape[1]
    x = layer.x
    flat = len(x.shape) != 2 if x.shape is not None else True
    xf = b.op("Reshape", [x, b.const("flat", np.array([-1, d_in], np.int64))]) if flat else x
    p = _gate(b, layer, xf)
    y = _sparse(b, layer, xf, p, d_out) if layer.k else _dense(b, layer, xf, p)
    if flat:
        lead = b.op("Slice", [b.op("Shape", [x]), b.const("zero_l", np.array([0], np.int64)),
                              b.const("minus1", np.array([-1], np.int64))])
        y = b.op("Reshape", [y, b.op("Concat", [lead, b.const(
            "d_out_l", np.array([d_out], np.int64))], axis=0)])
    out_node = layer.y.producer()
    for i, node in enumerate(b.tape.nodes):
        node.metadata_props[MOE_KEY] = prefix
        node.name = f"{prefix}/{node.op_type}_{i}"
    graph.insert_after(out_node, b.tape.nodes)
    y.shape, y.type = layer.y.shape, layer.y.type
    replace_value(graph, layer.y, y)
    graph.remove(list(layer.nodes), safe=True)
    return y
