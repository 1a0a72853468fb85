"""Shape operands fed by model inputs, fixed to the value the declared output shape implies.

kiln builds static shapes: a model whose ``Expand`` shape, ``Reshape`` shape, ``Tile``
repeats, ``TopK`` k, ``Reduce*``/``Squeeze``/``Unsqueeze`` axes, a ``*Window``'s size
or ``CenterCropPad``'s shape come from a graph input
can only be built for one output shape, the one its graph output declares. Given that
shape, the operand's effect is fixed (``Expand`` to ``[2, 3, 6]``, ``ReduceSum`` over
axis 1, ...), so the operand becomes that constant before import; the input stays an
input (the compiled module takes it and ignores it). Without this TVM's importer refuses
non-constant axes/k/shapes, and its Expand takes a runtime shape of ``[2, 1, 6]``
literally (``[2, 1, 6]`` out where broadcasting gives ``[2, 3, 6]``: wrong numbers).

Only nodes whose output is a graph output with a declared static shape (directly or
through shape-keeping elementwise ops such as an expanded ReduceL2's ``Sqrt``), and whose
data input has a static shape (declared or inferred), are touched. A ``keepdims=0``
reduce over one runtime axis whose output shape fits several axes (``[3, 2, 2] -> [3, 2]``),
and a ``CumSum``/``CumProd`` over a runtime axis, are built for each candidate axis and
the runtime axis picks the result (``Where``). Each is logged.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from kiln.compiler.core.shape_probe import probe_shape_inputs

logger = logging.getLogger(__name__)

_REDUCE = frozenset({"ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd",
                     "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
                     "ReduceSumSquare"})
#: ops along one runtime axis that keep the shape (built for each axis, picked at run time)
_SCANS = frozenset({"CumSum", "CumProd"})
_WINDOWS = frozenset({"HannWindow", "HammingWindow", "BlackmanWindow"})
#: op -> the operand index that carries a shape, repeats, k, axes or a window's size
_OPERAND = {"Expand": 1, "Reshape": 1, "Tile": 1, "TopK": 1, "Squeeze": 1, "Unsqueeze": 1,
            **dict.fromkeys(_REDUCE, 1), **dict.fromkeys(_WINDOWS, 0), "CenterCropPad": 1,
            "Resize": 3, "Split": 1, "OneHot": 1, "AffineGrid": 1,
            "ConstantOfShape": 0, **dict.fromkeys(_SCANS, 1)}


#: elementwise ops that keep their first input's shape (an output's shape reaches back)
_SHAPE_KEEPING = frozenset({"Identity", "Cast", "CastLike", "Abs", "Neg", "Sqrt", "Log",
                            "Exp", "Relu", "Sigmoid", "Tanh", "Reciprocal"})


def static_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    graph = model.graph
    shapes = {}
    for value in itertools.chain(graph.input, graph.output, graph.value_info):
        dims = value.type.tensor_type.shape.dim
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape") \
                and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    return shapes


def declared_out(graph: onnx.GraphProto, name: str, shapes: dict[str, list[int]]):
    """The static shape of ``name``, or of the value it reaches through shape-keeping
    elementwise ops (a ReduceL2's ``Sqrt``, a ReduceLogSumExp's ``Log``/``CastLike``)."""
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for i, value in enumerate(node.input):
            readers.setdefault(value, []).append((node, i))
    outputs = {v.name for v in graph.output}
    for _ in range(8):
        if name in shapes:
            return shapes[name]
        users = readers.get(name, [])
        if name in outputs or len(users) != 1 or users[0][1] != 0 \
                or users[0][0].op_type not in _SHAPE_KEEPING:
            return None
        name = users[0][0].output[0]
    return None


def annotate_declared_out(model: onnx.ModelProto, nodes: list[onnx.NodeProto],
                          attr_name: str) -> int:
    """Write the declared static shape of each node's first output on it as ``attr_name``
    (ints; in place; a node whose output has none is left alone); returns how many."""
    if not nodes:
        return 0
    shapes = static_shapes(model)
    annotated = 0
    for node in nodes:
        out = declared_out(model.graph, node.output[0], shapes)
        if out is None:
            continue
        node.attribute.append(helper.make_attribute(attr_name, [int(d) for d in out]))
        annotated += 1
    return annotated


def _attr(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _subsequence_gaps(short: list[int], long: list[int]) -> list[int]:
    """Positions of ``long`` not matched by ``short`` as a subsequence (greedy)."""
    gaps, j = [], 0
    for i, d in enumerate(long):
        if j < len(short) and d == short[j]:
            j += 1
        else:
            gaps.append(i)
    return gaps if j == len(short) else []


def resize_sizes(data: list[int], out: list[int], axes: list[int],
                 policy: str) -> list[int] | None:
    """Resize ``sizes`` (over ``axes``) that make ``out`` from ``data`` (None: ambiguous).

    With ``stretch`` they are the output dims. ``not_larger``/``not_smaller`` scale every
    axis by one ``s = min/max(sizes / data)`` and round (``out = floor(s * n + 0.5)``):
    the axis that sets ``s`` has ``out = sizes``, so each axis whose ``out / data`` gives
    back all of ``out`` is a candidate; a unique ``s`` is kept, with the other axes'
    sizes set so they do not set it (1 or a large size).
    """
    if policy == "stretch":
        return [out[a] for a in axes]
    if policy not in ("not_larger", "not_smaller"):
        return None
    f32 = np.float32
    found: dict[float, int] = {}
    for j in axes:
        scale = f32(out[j]) / f32(data[j])
        if all(int(np.floor(scale * f32(data[i]) + f32(0.5))) == out[i] for i in axes):
            found.setdefault(float(scale), j)
    if len(found) != 1:
        return None
    ((scale, j),) = found.items()
    other = 1 if policy == "not_smaller" else max(out) * max(data)
    sizes = [out[a] if a == j else other for a in axes]
    ratios = [f32(z) / f32(data[a]) for z, a in zip(sizes, axes)]
    picked = min(ratios) if policy == "not_larger" else max(ratios)
    return sizes if float(picked) == scale else None


def _value(node: onnx.NodeProto, data: list[int], out: list[int], size: int) -> list[int] | None:
    """The operand's value that gives ``out`` from ``data`` (None: none or ambiguous)."""
    op = node.op_type
    if op == "Expand":  # a shorter shape broadcasts to ``out`` too: written at full rank
        return list(out) if size <= len(out) else None
    if op == "Reshape":
        return list(out) if size == len(out) else None
    if op == "Tile" and len(data) == len(out) == size and all(
            d and o % d == 0 for d, o in zip(data, out)):
        return [o // d for d, o in zip(data, out)]
    if op == "Resize" and len(data) == len(out):
        axes = [a % len(out) for a in _attr(node, "axes", list(range(len(out))))]
        policy = _attr(node, "keep_aspect_ratio_policy", b"stretch")
        policy = policy.decode() if isinstance(policy, bytes) else policy
        return resize_sizes(data, out, axes, policy) if len(axes) == size else None
    if op in _SCANS and size == 1 and len(data) == 1:  # one axis to scan along
        return [0]
    if op == "ConstantOfShape" and size == len(out):
        return list(out)
    if op == "OneHot" and size == 1 and len(out) == len(data) + 1:
        return [out[_attr(node, "axis", -1) % len(out)]]
    if op == "AffineGrid" and size == len(out) and data:  # any channel count gives out
        return [data[0], 1, *out[1:-1]]
    if op in _WINDOWS and size == 1 and len(out) == 1:
        return [out[0]]
    if op == "CenterCropPad" and len(data) == len(out):
        axes = [a % len(out) for a in _attr(node, "axes", list(range(len(out))))]
        return [out[a] for a in axes] if len(axes) == size else None
    if op == "TopK" and size == 1 and len(data) == len(out):
        return [out[_attr(node, "axis", -1) % len(data)]]
    if op == "Squeeze":
        axes = _subsequence_gaps(out, data)
        return axes if len(axes) == size and all(data[a] == 1 for a in axes) else None
    if op == "Unsqueeze":
        axes = _subsequence_gaps(data, out)
        return axes if len(axes) == size else None
    if op in _REDUCE:
        if size == 0:
            return []
        if _attr(node, "keepdims", 1):
            if len(out) != len(data):
                return None
            axes = [i for i, (d, o) in enumerate(zip(data, out)) if o == 1 and d != 1]
            spare = [i for i, (d, o) in enumerate(zip(data, out)) if o == 1 and d == 1]
            axes = sorted(axes + spare[:max(0, size - len(axes))])
        else:  # which axes went is ambiguous when equal dims sit side by side: refuse then
            axes = _subsequence_gaps(out, data)
            rev = [len(data) - 1 - i for i in _subsequence_gaps(out[::-1], data[::-1])]
            if [a for a in axes if data[a] != 1] != sorted(a for a in rev if data[a] != 1):
                return None
        return axes if len(axes) == size else None
    return None


def _fix_probed_inputs(model: onnx.ModelProto) -> int:
    """A shape-like input whose value the declared output shapes imply
    (:mod:`kiln.compiler.core.shape_probe`: a window's size or a crop's shape read
    through an expanded function body) becomes that constant for every node reading it
    (the input stays an input, taken and ignored)."""
    fixed = 0
    for name, value in probe_shape_inputs(model).items():
        constant = f"{name}_implied_by_output_shapes"
        model.graph.initializer.append(numpy_helper.from_array(value, constant))
        _rename_reads(model.graph, name, constant)
        fixed += 1
    return fixed


def _rename_reads(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every read of ``old`` in ``graph`` and its subgraphs (an If branch reading an
    outer value, as expanded function bodies do) reads ``new`` instead."""
    for node in graph.node:
        node.input[:] = [new if operand == old else operand for operand in node.input]
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                _rename_reads(sub, old, new)


def fix_shape_operands(model: onnx.ModelProto) -> int:
    """Replace input-fed shape operands by constants (in place); returns how many."""
    probed = _fix_probed_inputs(model)
    return probed + _fix_operands(model)


def _fix_operands(model: onnx.ModelProto) -> int:
    graph = model.graph
    inputs = {v.name: v for v in graph.input}
    inits = {t.name for t in graph.initializer}
    candidates = [n for n in graph.node if n.domain in ("", "ai.onnx")
                  and n.op_type in _OPERAND and len(n.input) > _OPERAND[n.op_type]
                  and n.input[_OPERAND[n.op_type]] in inputs
                  and n.input[_OPERAND[n.op_type]] not in inits]
    if not candidates:
        return 0
    shapes = static_shapes(model)
    if any(n.input[0] not in shapes for n in candidates):  # an intermediate data input
        shapes = {**static_shapes(onnx.shape_inference.infer_shapes(model)), **shapes}
    fixed = 0
    replaced: dict[int, list[onnx.NodeProto]] = {}
    for node in candidates:
        index = _OPERAND[node.op_type]
        operand = node.input[index]
        data = shapes.get(node.input[0])
        out = declared_out(graph, node.output[0], shapes)
        size_dims = shapes.get(operand)
        if data is None or out is None or size_dims is None:
            continue
        if node.op_type == "Split":  # the parts' sizes: every output's extent on the axis
            parts = [declared_out(graph, name, shapes) for name in node.output]
            axis = _attr(node, "axis", 0) % len(data)
            value = [p[axis] for p in parts] if all(p and len(p) == len(data) for p in parts) \
                and len(parts) == int(np.prod(size_dims)) else None
        else:
            value = _value(node, data, out, int(np.prod(size_dims)) if size_dims else 1)
        dtype = helper.tensor_dtype_to_np_dtype(inputs[operand].type.tensor_type.elem_type)
        if value is None and node.op_type in _REDUCE | _SCANS and size_dims in ([1], []):
            chosen = _reduce_by_runtime_axis(node, data, out, np.dtype(dtype), size_dims)
            if chosen:
                graph.initializer.extend(chosen[0])
                replaced[id(node)] = chosen[1]
                fixed += 1
            continue
        if value is None:
            continue
        name = f"{operand}_fixed_for_{node.name or node.op_type}"
        array = np.asarray(value, dtype=dtype)
        if node.op_type != "Expand":  # (Expand's is 1-D, TVM wants it at the output's rank)
            array = array.reshape(size_dims)
        graph.initializer.append(numpy_helper.from_array(array, name))
        node.input[index] = name
        fixed += 1
        logger.info("input %r of %s %r fixed to %s (the value its declared output shape %s "
                    "implies)", operand, node.op_type, node.name, value, out)
    if replaced:
        nodes = [n for node in graph.node for n in replaced.get(id(node), [node])]
        del graph.node[:]
        graph.node.extend(nodes)
    return fixed


#: a keepdims=0 Reduce whose output shape fits at most this many single axes is built
#: for each of them, the runtime axis choosing among the results
MAX_AXIS_CANDIDATES = 4


def _reduce_by_runtime_axis(node: onnx.NodeProto, data: list[int], out: list[int],
                            dtype: np.dtype, operand_shape: list[int]):
    """(initializers, nodes) computing a keepdims=0 ``Reduce*`` over a one-element runtime
    ``axes`` whose output shape fits several axes ([3, 2, 2] -> [3, 2]: axis 1 or 2): one
    reduce per candidate, ``Where(axis == c, ...)`` picking the one the input names
    (a negative axis counts from the end). None when no such choice applies."""
    rank = len(data)
    if node.op_type in _SCANS:  # the shape stays: every axis is a candidate
        candidates = list(range(rank)) if out == data else []
    else:
        candidates = [a for a in range(rank) if data[:a] + data[a + 1:] == out]
        if _attr(node, "keepdims", 1):
            return None
    if not out or not 2 <= len(candidates) <= MAX_AXIS_CANDIDATES:
        return None
    prefix = f"{node.name or node.op_type}_axis"
    inits = [numpy_helper.from_array(np.zeros(operand_shape, dtype), f"{prefix}_zero"),
             numpy_helper.from_array(np.full(operand_shape, rank, dtype), f"{prefix}_rank")]
    axis = node.input[1]
    nodes = [helper.make_node("Less", [axis, f"{prefix}_zero"], [f"{prefix}_negative"]),
             helper.make_node("Add", [axis, f"{prefix}_rank"], [f"{prefix}_wrapped"]),
             helper.make_node("Where", [f"{prefix}_negative", f"{prefix}_wrapped", axis],
                              [f"{prefix}_normal"])]
    results = []
    for c in candidates:
        inits.append(numpy_helper.from_array(np.full(operand_shape, c, dtype),
                                             f"{prefix}_{c}"))
        reduce = onnx.NodeProto()
        reduce.CopyFrom(node)
        reduce.name = f"{prefix}_{c}_{node.op_type}"
        reduce.input[1] = f"{prefix}_{c}"
        reduce.output[0] = f"{prefix}_{c}_out"
        nodes.append(reduce)
        nodes.append(helper.make_node("Equal", [f"{prefix}_normal", f"{prefix}_{c}"],
                                      [f"{prefix}_{c}_is"]))
        results.append((f"{prefix}_{c}_is", reduce.output[0]))
    chosen = results[-1][1]
    for k, (flag, value) in reversed(list(enumerate(results[:-1]))):
        name = node.output[0] if k == 0 else f"{prefix}_pick{k}"
        nodes.append(helper.make_node("Where", [flag, value, chosen], [name]))
        chosen = name
    logger.info("%s %r: axes input %r fits axes %s of %s -> %s; each is reduced and the "
                "runtime value picks one", node.op_type, node.name, axis, candidates, data, out)
    return inits, nodes
