"""Low-bit weights on import: blocked and 4-bit ``DequantizeLinear`` for TVM's ONNX importer.

ONNX (opset 21+) writes ``y = (x - zero_point) * scale`` where ``scale`` and
``zero_point`` either are scalars (per tensor), 1-D along ``axis`` (per axis),
or, with ``block_size = B``, have ``x``'s shape except ``ceil(D / B)`` along
``axis`` (one scale per block of B consecutive elements).

TVM 0.27's importer rejects ``block_size`` and cannot even read 4-bit
initializers (numpy keeps one int4 per byte, TVM packs two). So before import
:func:`pack_four_bit_weights` rewrites every 4-bit weight feeding
``DequantizeLinear`` into a ``uint8`` tensor with two nibbles per byte (ONNX's
own packing order: element ``2i`` in the low nibble) and the node into the
internal op :data:`PACKED_OP`. Its converter unpacks the nibbles with Relax
bit ops; the weights stay packed in the compiled library (never re-exported as
float32), and the unpack + scale is fused into the consumer's kernel inputs.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

logger = logging.getLogger(__name__)

#: Internal op (never leaves the backend) for a DequantizeLinear whose x is packed nibbles.
PACKED_OP = "KilnDequantizeLinearPacked"
PACKED_DOMAIN = "kiln.internal"

_FOUR_BIT = {
    TensorProto.INT4: "int4",
    TensorProto.UINT4: "uint4",
    TensorProto.FLOAT4E2M1: "float4e2m1",
}

#: FP4 E2M1 code -> value (sign bit 3, exponent bits 2-1, mantissa bit 0).
_FP4_E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                             -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)


def four_bit_kind(data_type: int) -> str | None:
    """'int4', 'uint4' or 'float4e2m1' for a 4-bit ONNX element type, else None."""
    return _FOUR_BIT.get(data_type)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Pack 4-bit codes (one per uint8, values 0..15) two per byte, ONNX order.

    When the last dim is even, rows stay byte-aligned and the result keeps the
    shape with the last dim halved; otherwise the tensor is packed flat.
    """
    codes = np.ascontiguousarray(codes, dtype=np.uint8) & 0xF
    flat = codes.reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    packed = flat[0::2] | (flat[1::2] << 4)
    if codes.ndim and codes.shape[-1] % 2 == 0:
        return packed.reshape(codes.shape[:-1] + (codes.shape[-1] // 2,))
    return packed


def _initializers(graph: onnx.GraphProto) -> dict[str, TensorProto]:
    return {t.name: t for t in graph.initializer}


def pack_four_bit_weights(model: onnx.ModelProto) -> int:
    """Rewrite 4-bit weights that feed DequantizeLinear into packed uint8 (in place).

    ``model`` must be the backend's own copy. Returns how many nodes were
    rewritten. 4-bit zero points become int8/uint8 (they are small). A 4-bit
    initializer that something other than DequantizeLinear reads is left
    alone; :func:`four_bit_misuse` reports it.
    """
    graph = model.graph
    inits = _initializers(graph)
    rewritten = 0
    packed_names: dict[str, str] = {}
    widened_zp: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        x = inits.get(node.input[0])
        if x is None or four_bit_kind(x.data_type) is None:
            continue
        kind = four_bit_kind(x.data_type)
        if x.name not in packed_names:
            codes = numpy_helper.to_array(x).view(np.uint8)
            packed = numpy_helper.from_array(pack_nibbles(codes), x.name + "__kiln_nibbles")
            graph.initializer.append(packed)
            packed_names[x.name] = packed.name
        inputs = [packed_names[x.name], node.input[1]]
        if len(node.input) > 2 and node.input[2]:
            zp = inits.get(node.input[2])
            if zp is not None and four_bit_kind(zp.data_type) is not None:
                if zp.name not in widened_zp:
                    wide = np.int8 if kind == "int4" else np.uint8
                    values = numpy_helper.to_array(zp).astype(wide)
                    wide_name = zp.name + "__kiln_wide"
                    graph.initializer.append(numpy_helper.from_array(values, wide_name))
                    widened_zp[zp.name] = wide_name
                inputs.append(widened_zp[zp.name])
            else:
                inputs.append(node.input[2])
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        new = helper.make_node(
            PACKED_OP, inputs, list(node.output), name=node.name, domain=PACKED_DOMAIN,
            element=kind, shape=list(x.dims), axis=int(attrs.get("axis", 1)),
            block_size=int(attrs.get("block_size", 0)),
            output_dtype=int(attrs.get("output_dtype", 0)))
        node.CopyFrom(new)
        rewritten += 1
    if rewritten:
        still_read = {name for n in graph.node for name in n.input}
        keep = [t for t in graph.initializer
                if not (four_bit_kind(t.data_type) and t.name not in still_read)]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        if not any(o.domain == PACKED_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(PACKED_DOMAIN, 1))
        logger.debug("packed %d 4-bit DequantizeLinear weight(s)", rewritten)
    return rewritten


def four_bit_misuse(model: onnx.ModelProto) -> dict[str, str]:
    """4-bit tensors that TVM cannot take: ``{"<op> reads 4-bit <name>": node}``.

    Run after :func:`pack_four_bit_weights`; anything 4-bit left over is read by
    an op other than DequantizeLinear, or is a graph input.
    """
    graph = model.graph
    four_bit = {t.name for t in graph.initializer if four_bit_kind(t.data_type)}
    four_bit |= {v.name for v in graph.input if four_bit_kind(v.type.tensor_type.elem_type)}
    found: dict[str, str] = {}
    for node in graph.node:
        for name in node.input:
            if name in four_bit:
                found.setdefault(f"{node.op_type} reading 4-bit tensor {name!r}", node.name)
    return found


# ---------------------------------------------------------------------------------------
# Relax side (TVM is imported lazily: only lowering needs it).


def _static_shape(expr) -> list[int]:
    return [int(d) for d in expr.ty.shape.values]


def _dtype(expr) -> str:
    return str(expr.ty.dtype)


def _onnx_dtype_name(elem_type: int) -> str:
    return str(helper.tensor_dtype_to_np_dtype(elem_type))


def _expand_param(param, *, x_shape: list[int], axis: int, block_size: int):
    """Broadcastable form of a scale/zero-point for ``x`` (per tensor, axis or block)."""
    from tvm import relax

    shape = _static_shape(param)
    rank = len(x_shape)
    if block_size:
        dim = x_shape[axis]
        param = relax.op.repeat(param, block_size, axis=axis)
        if shape[axis] * block_size != dim:
            param = relax.op.strided_slice(param, axes=[axis], begin=[0], end=[dim])
        return param
    if len(shape) == 1 and shape[0] != 1 and rank > 1:
        target = [1] * rank
        target[axis] = shape[0]
        return relax.op.reshape(param, target)
    return param


def dequantize_expr(x, scale, zero_point, *, axis: int, block_size: int, out_dtype: str,
                    x_shape: list[int] | None = None):
    """Relax for ``(x - zero_point) * scale`` with per-tensor/axis/block parameters.

    ``x`` is already a numeric tensor (ints or the FP4 lookup's floats). Blocks
    that divide the axis are done by viewing ``x`` as ``[..., D/B, B, ...]`` and
    broadcasting the parameters over ``B``, so constant folding never stores a
    scale expanded to the weight's full size.
    """
    from tvm import relax

    shape = x_shape or _static_shape(x)
    axis = axis + len(shape) if axis < 0 else axis
    if len(shape) <= 1:
        axis = 0
    y = relax.op.astype(x, out_dtype)
    if block_size and shape[axis] % block_size == 0:
        grouped = shape[:axis] + [shape[axis] // block_size, block_size] + shape[axis + 1:]
        y = relax.op.reshape(y, grouped)
        if zero_point is not None:
            zp = relax.op.expand_dims(relax.op.astype(zero_point, out_dtype), axis + 1)
            y = relax.op.subtract(y, zp)
        s = scale if _dtype(scale) == out_dtype else relax.op.astype(scale, out_dtype)
        y = relax.op.multiply(y, relax.op.expand_dims(s, axis + 1))
        return relax.op.reshape(y, shape)
    if zero_point is not None:
        zp = _expand_param(zero_point, x_shape=shape, axis=axis, block_size=block_size)
        y = relax.op.subtract(y, relax.op.astype(zp, out_dtype))
    s = _expand_param(scale, x_shape=shape, axis=axis, block_size=block_size)
    if _dtype(scale) != out_dtype:
        s = relax.op.astype(s, out_dtype)
    return relax.op.multiply(y, s)


def unpack_nibbles_expr(packed, *, shape: list[int], element: str):
    """Relax that unpacks :func:`pack_nibbles` output to int8/uint8 codes or FP4 values."""
    from tvm import relax

    lo = relax.op.bitwise_and(packed, relax.const(15, "uint8"))
    hi = relax.op.right_shift(packed, relax.const(4, "uint8"))
    packed_shape = _static_shape(packed)
    pairs = relax.op.stack([lo, hi], axis=len(packed_shape))
    numel = math.prod(shape)
    if shape and shape[-1] % 2 == 0:
        codes = relax.op.reshape(pairs, shape)
    else:
        codes = relax.op.reshape(pairs, [2 * math.prod(packed_shape)])
        if 2 * math.prod(packed_shape) != numel:
            codes = relax.op.strided_slice(codes, axes=[0], begin=[0], end=[numel])
        codes = relax.op.reshape(codes, shape)
    if element == "uint4":
        return codes
    if element == "int4":
        # two's complement of a nibble: (v ^ 8) - 8 maps 0..7 -> 0..7, 8..15 -> -8..-1
        signed = relax.op.astype(codes, "int8")
        return relax.op.subtract(relax.op.bitwise_xor(signed, relax.const(8, "int8")),
                                 relax.const(8, "int8"))
    if element == "float4e2m1":
        table = relax.const(_FP4_E2M1_VALUES)
        return relax.op.take(table, relax.op.astype(codes, "int32"), axis=0)
    raise ValueError(f"unknown 4-bit element kind {element!r}")


class PackedDequantizeLinear:
    """Converter for :data:`PACKED_OP` (the importer calls ``get_converter(opset)``)."""

    @classmethod
    def get_converter(cls, opset: int):
        def convert(bb, inputs, attr, params):
            packed, scale = inputs[0], inputs[1]
            zero_point = inputs[2] if len(inputs) > 2 else None
            shape = [int(d) for d in attr["shape"]]
            values = unpack_nibbles_expr(packed, shape=shape, element=attr["element"].decode()
                                         if isinstance(attr["element"], bytes) else attr["element"])
            output_dtype = int(attr.get("output_dtype", 0))
            out_dtype = _onnx_dtype_name(output_dtype) if output_dtype else _dtype(scale)
            return dequantize_expr(values, scale, zero_point, axis=int(attr.get("axis", 1)),
                                   block_size=int(attr.get("block_size", 0)),
                                   out_dtype=out_dtype, x_shape=shape)

        return convert


def blocked_dequantize_linear(fallback_cls):
    """Converter for DequantizeLinear that adds ``block_size`` on top of TVM's own.

    Non-blocked nodes go to ``fallback_cls`` (TVM's converter) unchanged.
    """

    class BlockedDequantizeLinear:
        @classmethod
        def get_converter(cls, opset: int):
            fallback = fallback_cls.get_converter(opset)

            def convert(bb, inputs, attr, params):
                block_size = int(attr.get("block_size", 0))
                if not block_size:
                    return fallback(bb, inputs, attr, params)
                x, scale = inputs[0], inputs[1]
                zero_point = inputs[2] if len(inputs) > 2 else None
                output_dtype = int(attr.get("output_dtype", 0))
                out_dtype = _onnx_dtype_name(output_dtype) if output_dtype else _dtype(scale)
                return dequantize_expr(x, scale, zero_point, axis=int(attr.get("axis", 1)),
                                       block_size=block_size, out_dtype=out_dtype)

            return convert

    return BlockedDequantizeLinear
