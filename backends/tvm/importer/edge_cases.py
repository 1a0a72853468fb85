"""ONNX rewrites, before import, for ops TVM 0.27's converters get wrong at their edges.

Each rewrite keeps the op and adds a few standard ops around it (found by onnx's
conformance cases; silently wrong numbers before):

- ``IsInf`` with ``detect_negative=0`` or ``detect_positive=0`` (TVM ignores both):
  ``IsInf(x) and x > -x`` (only +inf), ``IsInf(x) and x < -x`` (only -inf), all false
  when both are 0;
- ``Mod`` with ``fmod=0`` on floats (TVM computes ``x - floor(x/y)*y``: NaN for an
  infinite ``y``): ``r = fmod(x, y)``, then ``r + y`` where ``r != 0`` and the signs of
  ``r`` and ``y`` differ (Python's ``%``: ``-5 % inf = inf``, ``5 % inf = 5``);
- ``BitShift`` by a negative amount or one >= the element width (undefined in C, so
  TVM's result is whatever the CPU does): 0, or -1 for a negative ``x`` shifted right
  (as onnx's reference defines it);
- ``LayerNormalization`` with its optional ``Mean``/``InvStdDev`` outputs (TVM returns
  them as scalars): the node keeps ``Y``; ``Mean = ReduceMean(X)`` and
  ``InvStdDev = 1/sqrt(ReduceMean((X - Mean)^2) + epsilon)`` over the normalized axes
  (keepdims, in ``stash_type``) are computed beside it;
- ``BatchNormalization`` with ``training_mode=1`` (TVM ignores it): batch statistics,
  running mean/variance updated with ``momentum``;
- a node whose outputs are all empty graph outputs (a 0 in the declared shape): empty
  constants (TVM fails on zero-size Split parts, Trilu of an empty input);
- ``ConvTranspose`` with ``output_shape`` (TVM ignores it): the ``pads`` and
  ``output_padding`` that give it, as ONNX Runtime splits them;
- ``Constant`` with ``value_int(s)``/``value_float(s)`` (TVM reads only ``value``; constant
  folding writes a Shape of a static input this way): the same values as ``value``;
- ``Resize`` with runtime scales: its declared output shape written on the node
  (:mod:`.resize_scales`); ``Pad`` with runtime pads, the same (:mod:`.runtime_pad`).
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .resize_scales import annotate_runtime_scales
from .runtime_pad import annotate_runtime_pads

_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
                          onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16})


#: Constant attributes TVM's importer does not read, and the numpy type of each
_CONSTANT_FORMS = {"value_int": np.int64, "value_ints": np.int64, "value_float": np.float32,
                   "value_floats": np.float32}


def _constant(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    attr = next(a for a in node.attribute if a.name in _CONSTANT_FORMS)
    value = np.asarray(helper.get_attribute_value(attr), dtype=_CONSTANT_FORMS[attr.name])
    return [helper.make_node("Constant", [], list(node.output), name=node.name,
                             value=numpy_helper.from_array(value, node.output[0]))]


def _attr(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _needs_rewrite(node: onnx.NodeProto) -> bool:
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "IsInf":
        return not (_attr(node, "detect_negative", 1) and _attr(node, "detect_positive", 1))
    if node.op_type == "Mod":
        return not _attr(node, "fmod", 0)
    if node.op_type == "Constant":
        return any(a.name in _CONSTANT_FORMS for a in node.attribute)
    if node.op_type == "LayerNormalization":
        return len([o for o in node.output if o]) > 1
    if node.op_type == "BatchNormalization":
        return bool(_attr(node, "training_mode", 0))
    if node.op_type == "ConvTranspose":
        return bool(_attr(node, "output_shape", None))
    return node.op_type == "BitShift"


def _elem_types(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, int]]:
    """Element type and rank of every value onnx's shape inference can type."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    values = list(itertools.chain(graph.input, graph.value_info, graph.output))
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types.update({t.name: t.data_type for t in graph.initializer})
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in values
             if v.type.tensor_type.HasField("shape")}
    ranks.update({t.name: len(t.dims) for t in graph.initializer})
    return types, ranks


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """The static shape of every value onnx's shape inference (or an initializer) gives one."""
    graph = onnx.shape_inference.infer_shapes(model).graph
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    for v in itertools.chain(graph.input, graph.value_info, graph.output):
        dims = v.type.tensor_type.shape.dim
        if v.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[v.name] = [d.dim_value for d in dims]
    return shapes


def _conv_transpose_output_shape(node: onnx.NodeProto,
                                 shapes: dict[str, list[int]]) -> list[onnx.NodeProto] | None:
    """The node with ``output_shape`` written as ``pads``/``output_padding`` (TVM ignores
    ``output_shape``), as ONNX Runtime computes it: the total padding
    ``t = s*(n-1) + output_padding + (k-1)*d + 1 - output_shape`` is split (``SAME_UPPER``:
    the odd one at the end, else at the start; given pads are ignored), and a negative
    ``t`` is that many more output rows at the end (zeros, plus the bias). None (left
    alone) without static shapes, or where TVM's output_padding < stride (or dilation)
    does not hold."""
    x, w = shapes.get(node.input[0]), shapes.get(node.input[1])
    if x is None or w is None:
        return None
    n = len(x) - 2
    wanted = list(_attr(node, "output_shape", []))
    if len(wanted) != n:
        return None
    strides = list(_attr(node, "strides", [1] * n))
    dilations = list(_attr(node, "dilations", [1] * n))
    extra = list(_attr(node, "output_padding", [0] * n))
    kernel = list(_attr(node, "kernel_shape", w[2:]))
    upper = _attr(node, "auto_pad", b"NOTSET") in ("SAME_UPPER", b"SAME_UPPER")
    total = [strides[i] * (x[i + 2] - 1) + extra[i] + (kernel[i] - 1) * dilations[i] + 1
             - wanted[i] for i in range(n)]
    head = [max(t, 0) // 2 if upper else max(t, 0) - max(t, 0) // 2 for t in total]
    pads = head + [max(t, 0) - h for t, h in zip(total, head)]
    extra = [e + max(-t, 0) for e, t in zip(extra, total)]
    if any(e >= max(s, d) for e, s, d in zip(extra, strides, dilations)):
        return None
    keep = [a for a in node.attribute
            if a.name not in ("output_shape", "pads", "output_padding", "auto_pad")]
    rewritten = helper.make_node("ConvTranspose", list(node.input), list(node.output),
                                 name=node.name, pads=pads, output_padding=extra)
    rewritten.attribute.extend(keep)
    return [rewritten]


class _Builder:
    def __init__(self, node: onnx.NodeProto) -> None:
        self.prefix = f"{node.name or node.op_type}_kiln_edge"
        self.count = 0
        self.nodes: list[onnx.NodeProto] = []

    def __call__(self, op: str, *inputs: str, out: str | None = None, **attrs) -> str:
        self.count += 1
        name = out or f"{self.prefix}_{self.count}"
        self.nodes.append(helper.make_node(op, list(inputs), [name],
                                           name=f"{self.prefix}_{op}_{self.count}", **attrs))
        return name

    def const(self, value: np.ndarray) -> str:
        self.count += 1
        name = f"{self.prefix}_c{self.count}"
        self.nodes.append(helper.make_node("Constant", [], [name], name=name,
                                           value=numpy_helper.from_array(value, name)))
        return name


def _isinf(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    b = _Builder(node)
    x, (y,) = node.input[0], node.output
    inf = b("IsInf", x)
    negative, positive = _attr(node, "detect_negative", 1), _attr(node, "detect_positive", 1)
    if not negative and not positive:
        b("Xor", inf, inf, out=y)
    else:
        side = b("Greater" if positive else "Less", x, b("Neg", x))
        b("And", inf, side, out=y)
    return b.nodes


def _mod(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    b = _Builder(node)
    x, d = node.input
    (z,) = node.output
    r = b("Mod", x, d, fmod=1)
    zero = b("Sub", r, r)  # 0 of r's type and shape (NaN where r is NaN: r stays NaN)
    differ = b("Xor", b("Less", r, zero), b("Less", d, zero))
    adjust = b("And", b("Not", b("Equal", r, zero)), differ)
    b("Where", adjust, b("Add", r, d), r, out=z)
    return b.nodes


def _bitshift(node: onnx.NodeProto, elem_type: int) -> list[onnx.NodeProto]:
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    b = _Builder(node)
    x, s = node.input
    (z,) = node.output
    shifted = b("BitShift", x, s, direction=_attr(node, "direction", "LEFT"))
    zero = b("Sub", s, s)
    width = b.const(np.array(np.dtype(dtype).itemsize * 8, dtype=dtype))
    valid = b("And", b("Not", b("Less", s, zero)), b("Less", s, width))
    fill = zero
    if _attr(node, "direction", "LEFT") in ("RIGHT", b"RIGHT") and \
            np.issubdtype(dtype, np.signedinteger):
        fill = b("Where", b("Less", x, b("Sub", x, x)), b.const(np.array(-1, dtype=dtype)),
                 b("Sub", x, x))
    b("Where", valid, shifted, fill, out=z)
    return b.nodes


def _layer_norm(node: onnx.NodeProto, elem_type: int, rank: int,
                opset: int) -> list[onnx.NodeProto]:
    b = _Builder(node)
    x = node.input[0]
    y, *stats = list(node.output) + ["", ""]
    mean_out, inv_out = stats[0], stats[1]
    keep = onnx.NodeProto()
    keep.CopyFrom(node)
    del keep.output[:]
    keep.output.append(y)
    b.nodes.append(keep)
    stash = _attr(node, "stash_type", 1)
    if stash != elem_type:
        x = b("Cast", x, to=stash)
    axes = list(range(_attr(node, "axis", -1) % rank, rank))
    dtype = helper.tensor_dtype_to_np_dtype(stash)

    def reduce_mean(value: str, out: str | None = None) -> str:
        if opset >= 18:
            return b("ReduceMean", value, b.const(np.array(axes, np.int64)), keepdims=1, out=out)
        return b("ReduceMean", value, axes=axes, keepdims=1, out=out)

    mean = reduce_mean(x, out=mean_out or None)
    if inv_out:
        centered = b("Sub", x, mean)
        var = reduce_mean(b("Mul", centered, centered))
        eps = b.const(np.array(_attr(node, "epsilon", 1e-5), dtype=dtype))
        b("Reciprocal", b("Sqrt", b("Add", var, eps)), out=inv_out)
    return b.nodes


def _batchnorm_training(node: onnx.NodeProto, rank: int, opset: int) -> list[onnx.NodeProto]:
    """BatchNormalization with training_mode=1 (TVM ignores it): the batch's statistics
    normalize, and the running ones are updated with ``momentum`` (population variance,
    as onnx's reference)."""
    b = _Builder(node)
    x, scale, bias, mean, var = node.input[:5]
    y, *stats = list(node.output) + ["", ""]
    axes = [0, *range(2, rank)]
    shape = np.array([1, -1] + [1] * (rank - 2), np.int64)

    def reduce_mean(value: str) -> str:
        if opset >= 18:
            return b("ReduceMean", value, b.const(np.array(axes, np.int64)), keepdims=1)
        return b("ReduceMean", value, axes=axes, keepdims=1)

    batch_mean = reduce_mean(x)
    centered = b("Sub", x, batch_mean)
    batch_var = reduce_mean(b("Mul", centered, centered))
    eps = b("CastLike", b.const(np.array(_attr(node, "epsilon", 1e-5), np.float32)), x)
    per_channel = b.const(shape)
    normed = b("Div", centered, b("Sqrt", b("Add", batch_var, eps)))
    b("Add", b("Mul", normed, b("Reshape", scale, per_channel)),
      b("Reshape", bias, per_channel), out=y)
    momentum = b("CastLike", b.const(np.array(_attr(node, "momentum", 0.9), np.float32)), mean)
    rest = b("Sub", b("CastLike", b.const(np.array(1.0, np.float32)), mean), momentum)
    for running, batch, out in ((mean, batch_mean, stats[0]), (var, batch_var, stats[1])):
        if out:
            flat = b("Reshape", batch, b.const(np.array([-1], np.int64)))
            b("Add", b("Mul", running, momentum), b("Mul", flat, rest), out=out)
    return b.nodes


def _empty_outputs(graph: onnx.GraphProto) -> int:
    """Nodes whose every output is a graph output of a static shape with a 0 dim become
    empty constants (TVM fails on zero-size Split parts and Trilu inputs; an empty tensor
    holds no value to compute)."""
    def static(values):
        found = {}
        for value in values:
            dims = value.type.tensor_type.shape.dim
            if value.type.HasField("tensor_type") and all(d.HasField("dim_value") for d in dims):
                found[value.name] = ([d.dim_value for d in dims], value.type.tensor_type.elem_type)
        return found

    declared, inputs = static(graph.output), static(graph.input)
    out, replaced = [], 0
    for node in graph.node:
        names = [o for o in node.output if o]
        shapes = [declared.get(o) for o in names]
        if not shapes or not all(s is not None and 0 in s[0] for s in shapes):
            out.append(node)
            continue
        same = node.input[0] if node.input and inputs.get(node.input[0]) else None
        if all(s == inputs.get(same) for s in shapes):  # the (empty) input as it is
            out.extend(helper.make_node("Identity", [same], [name], name=f"{name}_empty")
                       for name in names)
        elif all(len(s[0]) <= 2 for s in shapes):
            # (TVM 0.27 cannot read back a zero-size constant of rank 3: kept to rank 2)
            for name, (dims, elem) in zip(names, shapes):
                empty = np.zeros(dims, helper.tensor_dtype_to_np_dtype(elem))
                out.append(helper.make_node("Constant", [], [name], name=f"{name}_empty",
                                            value=numpy_helper.from_array(empty, name)))
        else:
            out.append(node)
            continue
        replaced += 1
    if replaced:
        del graph.node[:]
        graph.node.extend(out)
    return replaced


def rewrite_edge_cases(model: onnx.ModelProto) -> int:
    """Rewrite the main graph's IsInf / float Mod fmod=0 / BitShift / LayerNormalization
    nodes (in place).
    Returns how many were rewritten."""
    graph = model.graph
    emptied = _empty_outputs(graph) + annotate_runtime_scales(model) + \
        annotate_runtime_pads(model)
    if not any(_needs_rewrite(node) for node in graph.node):
        return emptied
    if all(n.op_type == "Constant" for n in graph.node if _needs_rewrite(n)):
        types, ranks = {}, {}  # no inference needed (it may be slow on a large model)
    else:
        types, ranks = _elem_types(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    shapes = _static_shapes(model) if any(n.op_type == "ConvTranspose" and _needs_rewrite(n)
                                          for n in graph.node) else {}
    out: list[onnx.NodeProto] = []
    rewritten = 0
    for node in graph.node:
        replacement = None
        if _needs_rewrite(node):
            if node.op_type == "Constant":
                replacement = _constant(node)
            elif node.op_type == "IsInf":
                replacement = _isinf(node)
            elif node.op_type == "Mod" and types.get(node.input[0]) in _FLOAT_TYPES:
                replacement = _mod(node)
            elif node.op_type == "LayerNormalization" and node.input[0] in ranks \
                    and node.input[0] in types:
                replacement = _layer_norm(node, types[node.input[0]], ranks[node.input[0]], opset)
            elif node.op_type == "BatchNormalization" and node.input[0] in ranks:
                replacement = _batchnorm_training(node, ranks[node.input[0]], opset)
            elif node.op_type == "ConvTranspose":
                replacement = _conv_transpose_output_shape(node, shapes)
            elif node.op_type == "BitShift" and not _shift_is_safe(graph, node):
                elem = types.get(node.input[1])
                replacement = _bitshift(node, elem) if elem else None
        if replacement is None:
            out.append(node)
        else:
            out.extend(replacement)
            rewritten += 1
    if rewritten:
        del graph.node[:]
        graph.node.extend(out)
    return rewritten + emptied


def _shift_is_safe(graph: onnx.GraphProto, node: onnx.NodeProto) -> bool:
    """A constant shift amount already within [0, width) needs no guard."""
    init = next((t for t in graph.initializer if t.name == node.input[1]), None)
    if init is None:
        return False
    amounts = numpy_helper.to_array(init)
    width = np.dtype(amounts.dtype).itemsize * 8
    return bool(np.all((amounts >= 0) & (amounts < width)))
