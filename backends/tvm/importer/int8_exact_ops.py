"""A ``QuantizeLinear`` after ops that commute with it, moved into the integer kernels.

A W8A8 QDQ model often quantizes only after a Concat (YOLOX's CSP blocks, the SPP's
MaxPools, the FPN's nearest Resize): the integer kernels feeding it write float32, the
Concat / MaxPool / Resize run in float, and only then is the result quantized. ``Q`` is
elementwise and monotone, so it commutes exactly with ops that only move, copy or pick
the largest of values::

    Q(Concat(a, b)) == Concat(Q(a), Q(b))      Q(MaxPool(a)) == MaxPool(Q(a))
    Q(Resize_nearest(a)) == Resize_nearest(Q(a))   (Slice, Reshape, Transpose, ... alike)

(MaxPool's padding is -inf in float and the dtype's minimum on uint8/int8; ``Q(-inf)`` is
that minimum, and every window holds a real element.) :func:`push_quantize` finds, for
each per-tensor ``QuantizeLinear``, the region of such ops above it whose leaves are all
integer kernels writing float32 (each of their outputs read only inside the region); the
kernels then requantize to the Q's scale and zero point in their epilogue, the region runs
on the integer tensors, and the Q goes. Bit-exact against the float graph's Q.
"""

from __future__ import annotations

import logging

import onnx
from onnx import TensorProto, helper, numpy_helper

from . import internal_ops
from .packed_weights import attributes

logger = logging.getLogger(__name__)

#: op type -> its data inputs (the others are shapes, scales, axes: constants).
_EXACT = {"Concat": None, "MaxPool": (0,), "Resize": (0,), "Slice": (0,), "Reshape": (0,),
          "Transpose": (0,), "Squeeze": (0,), "Unsqueeze": (0,), "Flatten": (0,),
          "Identity": (0,)}
_KERNELS = (internal_ops.INT8_DENSE, internal_ops.INT8_CONV)
_INT8 = {TensorProto.UINT8: "uint8", TensorProto.INT8: "int8"}


def _exact(node: onnx.NodeProto) -> bool:
    if node.domain not in ("", "ai.onnx") or node.op_type not in _EXACT:
        return False
    if len([o for o in node.output if o]) != 1:  # MaxPool's Indices
        return False
    if node.op_type == "Resize":
        return attributes(node).get("mode", b"nearest") in (b"nearest", "nearest")
    return True


def _data_inputs(node: onnx.NodeProto) -> list[str]:
    which = _EXACT[node.op_type]
    names = list(node.input) if which is None else [node.input[i] for i in which]
    return [n for n in names if n]


def _scale_and_zero(q: onnx.NodeProto, consts: dict[str, TensorProto]):
    if len(q.input) < 3 or q.input[1] not in consts or q.input[2] not in consts:
        return None
    attrs = attributes(q)
    if attrs.get("block_size") or not attrs.get("saturate", 1):
        return None
    s, z = consts[q.input[1]], consts[q.input[2]]
    if z.data_type not in _INT8:
        return None
    s_v, z_v = numpy_helper.to_array(s), numpy_helper.to_array(z)
    if s_v.size != 1 or z_v.size != 1 or float(s_v.reshape(-1)[0]) <= 0:
        return None
    return float(s_v.reshape(-1)[0]), int(z_v.reshape(-1)[0]), _INT8[z.data_type]


def constant_tensors(graph: onnx.GraphProto) -> dict[str, TensorProto]:
    consts = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                consts[node.output[0]] = value
    return consts


def _region(q, producer, readers, outputs):
    """(region nodes, leaf kernels) above ``q``, or None when it is not closed."""
    region, leaves, seen = [], [], set()
    stack = [q.input[0]]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        node = producer.get(name)
        if node is None or name in outputs:
            return None
        if node.domain == internal_ops.DOMAIN and node.op_type in _KERNELS:
            if attributes(node).get("out_dtype", b"float32") not in (b"float32", "float32"):
                return None
            leaves.append(node)
        elif _exact(node):
            region.append(node)
            stack.extend(_data_inputs(node))
        else:
            return None
    inside = {id(n) for n in region} | {id(q)}
    for node in region + leaves:  # every value in the region is read only inside it
        if any(id(r) not in inside for r in readers.get(node.output[0], [])):
            return None
    return region, leaves


def _set(node: onnx.NodeProto, name: str, value) -> None:
    for a in node.attribute:
        if a.name == name:
            node.attribute.remove(a)
            break
    node.attribute.append(helper.make_attribute(name, value))


def push_quantize(graph: onnx.GraphProto) -> int:
    """Move each per-tensor ``QuantizeLinear`` above a closed region of exact ops into the
    integer kernels at its leaves (in place); returns how many were moved."""
    consts = constant_tensors(graph)
    outputs = {o.name for o in graph.output}
    moved, drop = 0, set()
    for q in list(graph.node):
        if q.op_type != "QuantizeLinear" or q.domain not in ("", "ai.onnx"):
            continue
        params = _scale_and_zero(q, consts)
        if params is None:
            continue
        producer = {o: n for n in graph.node if id(n) not in drop for o in n.output}
        readers: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            if id(n) not in drop:
                for name in n.input:
                    readers.setdefault(name, []).append(n)
        found = _region(q, producer, readers, outputs)
        if found is None or not found[0]:
            continue  # a Q right after a kernel is the chain matcher's (int8_chains)
        region, leaves = found
        scale, zero, dtype = params
        for kernel in leaves:
            _set(kernel, "out_dtype", dtype)
            _set(kernel, "out_scale", scale)
            _set(kernel, "out_zero", zero)
        top = producer[q.input[0]]
        top.output[0] = q.output[0]
        drop.add(id(q))
        stale = {n.output[0] for n in region + leaves} | {q.input[0]}
        kept = [v for v in graph.value_info if v.name not in stale]
        del graph.value_info[:]
        graph.value_info.extend(kept)
        moved += 1
        logger.debug("QuantizeLinear %s moved above %d exact op(s) into %d kernel(s)",
                     q.name, len(region), len(leaves))
    if drop:
        keep = [n for n in graph.node if id(n) not in drop]
        del graph.node[:]
        graph.node.extend(keep)
    return moved
