"""Low-bit weights on import: kiln's quantized forms for TVM's ONNX importer.

ONNX (opset 21+) writes ``y = (x - zero_point) * scale`` where ``scale`` and
``zero_point`` either are scalars (per tensor), 1-D along ``axis`` (per axis),
or, with ``block_size = B``, have ``x``'s shape except ``ceil(D / B)`` along
``axis`` (one scale per block of B consecutive elements).

TVM 0.27's importer rejects ``block_size`` and cannot even read 4-bit
initializers (numpy keeps one int4 per byte, TVM packs two). So before import
:func:`pack_four_bit_weights` rewrites every 4-bit weight feeding
``DequantizeLinear`` (or ``kiln.DequantizeTable``) into ``uint8`` nibbles and the
node into an internal op (:data:`PACKED_OP`, :data:`PACKED_TABLE_OP`). A weight
whose output-channel count is a multiple of 32 (2-D, or a conv's ``[O, I, kh, kw]``
with ``k`` the flat ``(I, kh, kw)``) is packed in 32-column tiles
(:func:`pack_nibbles_tiled`: ``P[n // 32, k, n % 16]``, low nibble column ``n``,
high nibble ``n + 16``), so that a 16-byte load decodes into two vectors of
consecutive columns; other shapes keep ONNX's flat order.

Each decode is one TE kernel reading the packed bytes (never a float32 copy of
the weight): 4-bit codes (:func:`emit_four_bit_decode`), ``kiln.UnpackBits``
(int3/int2 codes and masks, :class:`UnpackBits`) and ``kiln.DequantizeTable``
(FP4 E2M1/E3M0, binarized signs). A MatMul of at most :data:`GROUPED_MAX_ROWS` rows
on a blocked 4-bit weight becomes one grouped GEMV kernel
(:func:`emit_grouped_gemv`: the scale applied once per group); other
contractions get the decode fused in by ``fuse_decode`` and scheduled by kiln's
``decode_contraction`` / ``decode_conv`` CPU rules (or dlight on CUDA).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

logger = logging.getLogger(__name__)

#: Internal op (never leaves the backend) for a DequantizeLinear whose x is packed nibbles.
PACKED_OP = "KilnDequantizeLinearPacked"
PACKED_DOMAIN = "kiln.internal"
#: Internal op for ``kiln.DequantizeTable`` whose codes are packed nibbles.
PACKED_TABLE_OP = "KilnDequantizeTablePacked"
#: Internal op for a codebook weight: ``Reshape(Gather(codebook, Cast(index)), shape)``.
CODEBOOK_OP = "KilnCodebookDecode"
#: The domain of kiln's model-local functions (``kiln.passes.quant.kiln_ops``).
KILN_DOMAIN = "kiln"

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


#: Output columns per nibble tile: a byte holds column ``j`` (low nibble) and ``j + 16``
#: (high nibble) of a 32-column tile, so one 16-byte load unpacks to two 16-lane vectors.
TILE_COLUMNS = 32
_HALF_TILE = TILE_COLUMNS // 2


def column_axis(shape: list[int], axis: int, block_size: int, *, scale_rank: int) -> int:
    """The output-channel axis of a 4-bit weight to tile nibbles along, or -1 (flat).

    2-D (a MatMul/Gemm weight), blocked (``block_size``): the other axis than the
    blocked one; per axis: ``axis`` itself; per tensor: the last. 3-D and up (a conv
    weight ``[O, I, kh, ...]``): axis 0, the output channels. Only weights whose
    column count is a multiple of :data:`TILE_COLUMNS` are tiled.
    """
    if len(shape) >= 3:
        return 0 if shape[0] % TILE_COLUMNS == 0 else -1
    if len(shape) != 2:
        return -1
    axis = axis + 2 if axis < 0 else axis
    if block_size:
        col = 1 - axis
    elif scale_rank == 1:
        col = axis
    else:
        col = 1
    return col if shape[col] % TILE_COLUMNS == 0 else -1


def pack_nibbles_tiled(codes: np.ndarray, col_axis: int) -> np.ndarray:
    """Pack a code matrix as ``P[c // 32, r, c % 16]``, nibble ``(c % 32) // 16``.

    ``c`` is the index along ``col_axis``, ``r`` the (C-order flat) index along the
    other axes: each 32-column tile is one contiguous ``[R, 16]`` byte panel that a
    GEMV streams along R, and a conv's panel decode reads 16 bytes per ``r``.
    """
    codes = np.ascontiguousarray(codes, dtype=np.uint8) & 0xF
    if codes.ndim > 2:  # [O, I, kh, kw]: columns O, rows the flat (I, kh, kw)
        codes = codes.reshape(codes.shape[0], -1)
    by_col = codes if col_axis == 1 else codes.T  # [R, C]
    rows, cols = by_col.shape
    tiles = by_col.reshape(rows, cols // TILE_COLUMNS, 2, _HALF_TILE).transpose(1, 0, 2, 3)
    return np.ascontiguousarray(tiles[:, :, 0, :] | (tiles[:, :, 1, :] << 4))


def _initializers(graph: onnx.GraphProto) -> dict[str, TensorProto]:
    return {t.name: t for t in graph.initializer}


def _add_packed(graph: onnx.GraphProto, x: TensorProto, col_axis: int) -> str:
    """Append ``x``'s codes packed (tiled along ``col_axis``, or flat when -1); its name."""
    codes = numpy_helper.to_array(x).view(np.uint8)
    packed = pack_nibbles(codes) if col_axis < 0 else pack_nibbles_tiled(codes, col_axis)
    tensor = numpy_helper.from_array(packed, f"{x.name}__kiln_nibbles{col_axis}")
    graph.initializer.append(tensor)
    return tensor.name


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
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        scale = inits.get(node.input[1])
        col_axis = column_axis(list(x.dims), int(attrs.get("axis", 1)),
                               int(attrs.get("block_size", 0)),
                               scale_rank=len(scale.dims) if scale is not None else 0)
        key = (x.name, col_axis)
        if key not in packed_names:
            packed_names[key] = _add_packed(graph, x, col_axis)
        inputs = [packed_names[key], node.input[1]]
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
        new = helper.make_node(
            PACKED_OP, inputs, list(node.output), name=node.name, domain=PACKED_DOMAIN,
            element=kind, shape=list(x.dims), axis=int(attrs.get("axis", 1)), layout=col_axis,
            block_size=int(attrs.get("block_size", 0)),
            output_dtype=int(attrs.get("output_dtype", 0)))
        node.CopyFrom(new)
        rewritten += 1
    for node in graph.node:
        if node.domain != KILN_DOMAIN or node.op_type != "DequantizeTable":
            continue
        x = inits.get(node.input[0])
        if x is None or four_bit_kind(x.data_type) not in ("int4", "uint4"):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        shape = list(x.dims)
        axis = int(attrs.get("axis", 0))
        col_axis = column_axis(shape, axis, 1, scale_rank=len(shape))
        key = (x.name, col_axis)
        if key not in packed_names:
            packed_names[key] = _add_packed(graph, x, col_axis)
        new = helper.make_node(
            PACKED_TABLE_OP, [packed_names[key], *node.input[1:]], list(node.output),
            name=node.name, domain=PACKED_DOMAIN, element=four_bit_kind(x.data_type),
            shape=shape, axis=axis, block_size=int(attrs.get("block_size", 1)), layout=col_axis)
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


#: Element types of codebook indices that stay compressed (``quantize``'s codebook form).
_CODEBOOK_INDEX = (TensorProto.UINT8, TensorProto.UINT16)
_INDEX_CASTS = (TensorProto.INT64, TensorProto.INT32)


def codebook_weights(model: onnx.ModelProto) -> int:
    """Rewrite codebook weights into :data:`CODEBOOK_OP` nodes (in place).

    kiln's codebook form is ``Reshape(Gather(codebook[k, d], Cast(index, int64)), shape)``
    with the index (uint8/uint16, one per length-d run of the weight) and the codebook
    initializers. TVM's importer evaluates Cast and Gather of constants while importing,
    so the library would store the expanded float32 weight; the internal op's converter
    (:class:`CodebookDecode`) is instead one TE kernel reading the index and the table,
    fused into the contraction that consumes the weight (``fuse_decode``). The Cast and
    Gather are dropped when nothing else reads them. Returns how many were rewritten.
    """
    graph = model.graph
    inits = _initializers(graph)
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    for out in graph.output:
        readers[out.name] = readers.get(out.name, 0) + 1
    rewritten, dropped = 0, set()
    for node in graph.node:
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") \
                or len(node.input) < 2 or node.input[1] not in inits:
            continue
        gather = producer.get(node.input[0])
        if gather is None or gather.op_type != "Gather" or gather.domain not in ("", "ai.onnx"):
            continue
        gattrs = {a.name: helper.get_attribute_value(a) for a in gather.attribute}
        table = inits.get(gather.input[0])
        cast = producer.get(gather.input[1])
        if int(gattrs.get("axis", 0)) != 0 or table is None or len(table.dims) != 2 \
                or cast is None or cast.op_type != "Cast":
            continue
        cattrs = {a.name: helper.get_attribute_value(a) for a in cast.attribute}
        index = inits.get(cast.input[0])
        if index is None or index.data_type not in _CODEBOOK_INDEX or len(index.dims) != 1 \
                or int(cattrs.get("to", 0)) not in _INDEX_CASTS:
            continue
        shape = [int(d) for d in numpy_helper.to_array(inits[node.input[1]])]
        if any(d <= 0 for d in shape) or math.prod(shape) != index.dims[0] * table.dims[1]:
            continue
        new = helper.make_node(CODEBOOK_OP, [index.name, table.name], list(node.output),
                               name=node.name, domain=PACKED_DOMAIN, shape=shape)
        node.CopyFrom(new)
        rewritten += 1
        for name in (gather.output[0], cast.output[0]):
            readers[name] -= 1
            if readers[name] == 0:
                dropped.add(name)
    if rewritten:
        keep = [n for n in graph.node if not (set(n.output) & dropped)]
        del graph.node[:]
        graph.node.extend(keep)
        if not any(o.domain == PACKED_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(PACKED_DOMAIN, 1))
        logger.debug("kept %d codebook weight(s) as index + codebook", rewritten)
    return rewritten


#: kiln.UnpackBits outputs up to this many codes that feed index computations (a
#: salient-rows mask -> NonZero) are evaluated before import, so the indices fold.
MAX_FOLDED_CODES = 1 << 16
#: Consumers that read unpacked codes as a weight (those stay packed in the kernel).
_DECODE_CONSUMERS = frozenset({"DequantizeLinear", "DequantizeTable"})


def unpack_bits(packed: np.ndarray, bits: int, shape: list[int]) -> np.ndarray:
    """numpy ``kiln.UnpackBits``: code i is bits [i*bits, (i+1)*bits) of the LE byte stream."""
    n = math.prod(shape)
    stream = np.unpackbits(np.asarray(packed, np.uint8).reshape(-1), bitorder="little")
    fields = stream[: n * bits].reshape(n, bits).astype(np.uint16)
    codes = (fields << np.arange(bits, dtype=np.uint16)).sum(axis=1)
    return codes.astype(np.uint8).reshape(shape)


def fold_index_unpacks(model: onnx.ModelProto) -> int:
    """Evaluate small constant ``kiln.UnpackBits`` nodes that feed non-decode ops (in place).

    Their codes are an index computation (masks), not a weight: as initializers they
    let constant folding resolve what reads them (NonZero, Concat) to static indices.
    Returns how many nodes were replaced.
    """
    graph = model.graph
    inits = _initializers(graph)
    readers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    keep, folded = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.domain == KILN_DOMAIN and node.op_type == "UnpackBits"
                and node.input[0] in inits
                and math.prod(attrs.get("shape", [])) <= MAX_FOLDED_CODES
                and readers.get(node.output[0], set()) - _DECODE_CONSUMERS):
            codes = unpack_bits(numpy_helper.to_array(inits[node.input[0]]), int(attrs["bits"]),
                                [int(d) for d in attrs["shape"]])
            graph.initializer.append(numpy_helper.from_array(codes, node.output[0]))
            folded += 1
            continue
        keep.append(node)
    if folded:
        del graph.node[:]
        graph.node.extend(keep)
        logger.debug("evaluated %d index kiln.UnpackBits node(s) before import", folded)
    return folded


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


def _attr_str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _te_nibble(packed, idx, *, shape: list[int], layout: int):
    """The 4-bit code (int32, 0..15) at ``idx`` of a weight packed by kiln (tiled or flat)."""
    from tvm import tirx

    # The nibble is chosen with a Select on an index condition (not a shift by an index
    # expression): the data path stays 8/32-bit, which TVM would otherwise widen to int64.
    if layout >= 0:
        c = idx[layout]
        (_, r), *rest = [(shape[d], i) for d, i in enumerate(idx) if d != layout]
        for dim, i in rest:  # the other axes' C-order flat index (a conv's [I, kh, kw])
            r = r * dim + i
        byte = packed[c // TILE_COLUMNS, r, c % _HALF_TILE]
        low = c % TILE_COLUMNS < _HALF_TILE
    elif shape and shape[-1] % 2 == 0:
        byte = packed[(*idx[:-1], idx[-1] // 2)]
        low = idx[-1] % 2 == 0
    else:
        flat = idx[0] if idx else 0
        for dim, i in zip(shape[1:], idx[1:], strict=True):
            flat = flat * dim + i
        byte = packed[flat // 2]
        low = flat % 2 == 0
    value = tirx.Cast("int32", byte)
    return tirx.Select(low, value & 15, value >> 4)


def _te_param(param, idx, *, axis: int, block_size: int):
    """A scale/zero point read at ``idx``: per tensor, per axis, or per block of ``axis``."""
    pshape = [int(d) for d in param.shape]
    if not pshape:
        return param[()]
    if len(pshape) == len(idx) and len(idx) > 1:
        at = []
        for d, i in enumerate(idx):
            if pshape[d] == 1:
                at.append(0)
            elif d == axis and block_size:
                at.append(i // block_size)
            else:
                at.append(i)
        return param[tuple(at)]
    if len(pshape) == 1 and pshape[0] > 1:
        i = idx[axis] if idx else 0
        return param[i // block_size if block_size else i]
    return param[(0,) * len(pshape)]


#: A decode kernel's op pattern for FuseOps: injective (Relax's kInjective). A table
#: lookup ``t[code]`` reads at a data-dependent index, which AnnotateTIROpPattern would
#: call opaque, and an opaque decode would fuse with nothing (not even the weight's
#: transpose in front of a channels-last conv, which fuse_decode then cannot take).
INJECTIVE = {"op_pattern": 2}

#: 0x4B000000 is the float 2^23: OR-ing a small int into its mantissa gives 2^23 + v.
_MAGIC_BITS = 0x4B000000
_MAGIC_FLOAT = 8388608.0


def _norm_axis(axis: int, rank: int) -> int:
    if rank <= 1:
        return 0
    return axis + rank if axis < 0 else axis


def _te_value(p, z, table, idx, *, shape, element, layout, axis, block_size, out_dtype):
    """``code(packed)[idx] - zero_point`` in ``out_dtype`` (no scale)."""
    from tvm import tirx

    code = _te_nibble(p, idx, shape=shape, layout=layout)
    if element in ("int4", "uint4") and out_dtype == "float32":
        # int -> float without a conversion instruction: 2^23 + v has v in its low
        # mantissa bits (exact for 0 <= v < 2^23); int4 is (code ^ 8) - 8.
        biased = (code ^ 8) if element == "int4" else code
        offset = _MAGIC_FLOAT + (8.0 if element == "int4" else 0.0)
        value = tirx.reinterpret("float32", biased | _MAGIC_BITS) - tirx.const(offset, "float32")
    elif element == "int4":
        value = tirx.Cast(out_dtype, (code ^ 8) - 8)
    elif element == "uint4":
        value = tirx.Cast(out_dtype, code)
    elif element == "float4e2m1":
        value = tirx.Cast(out_dtype, table[code])
    else:
        raise ValueError(f"unknown 4-bit element kind {element!r}")
    if z is not None:
        value = value - tirx.Cast(out_dtype, _te_param(z, idx, axis=axis, block_size=block_size))
    return value


@dataclasses.dataclass(frozen=True)
class FourBitDecode:
    """A 4-bit decode emitted by :func:`emit_four_bit_decode` (its inputs and layout)."""

    packed: object
    scale: object
    zero_point: object | None
    shape: tuple[int, ...]
    element: str
    layout: int
    axis: int
    block_size: int
    out_dtype: str

    def args(self) -> list:
        from tvm import relax

        extra = [self.zero_point] if self.zero_point is not None else []
        if self.element == "float4e2m1":
            extra.append(relax.const(_FP4_E2M1_VALUES))
        return [self.packed, self.scale, *extra]

    def raw_value(self, p, rest, idx):
        """``(u, offset)`` with ``value = u - offset``: u is the code as float32 (one
        conversion), offset a constant or the zero point; the grouped GEMV subtracts
        ``offset * sum(x)`` once per group instead of once per weight."""
        from tvm import tirx

        code = _te_nibble(p, idx, shape=list(self.shape), layout=self.layout)
        z = rest[0] if self.zero_point is not None else None
        if self.element == "int4":
            u, bias = tirx.Cast(self.out_dtype, code ^ 8), 8.0
        elif self.element == "uint4":
            u, bias = tirx.Cast(self.out_dtype, code), 0.0
        else:
            u, bias = tirx.Cast(self.out_dtype, rest[-1][code]), 0.0
        offset = tirx.const(bias, self.out_dtype) if bias else None
        if z is not None:
            zv = tirx.Cast(self.out_dtype, _te_param(z, idx, axis=self.axis,
                                                     block_size=self.block_size))
            offset = zv if offset is None else offset + zv
        return u, offset

    def value(self, p, rest, idx):
        z = rest[0] if self.zero_point is not None else None
        table = rest[-1] if self.element == "float4e2m1" else None
        return _te_value(p, z, table, idx, shape=list(self.shape), element=self.element,
                         layout=self.layout, axis=self.axis, block_size=self.block_size,
                         out_dtype=self.out_dtype)


#: Decodes emitted during the current import, by the Relax var bound to their output;
#: a MatMul reading one at GEMV shape emits :func:`emit_grouped_gemv` instead.
_decodes = threading.local()


def reset_decodes(*, grouped_gemv: bool = True) -> None:
    """Start an import; ``grouped_gemv`` enables :func:`emit_grouped_gemv` for it."""
    _decodes.by_var = {}
    _decodes.grouped = grouped_gemv


def emit_four_bit_decode(bb, packed, scale, zero_point, *, shape: list[int], element: str,
                         layout: int, axis: int, block_size: int, out_dtype: str):
    """One TE kernel ``(code(packed) - zero_point) * scale`` reading the packed nibbles.

    Written as a single compute (not a chain of Relax ops) so that fusing it into its
    matmul leaves one expression per weight element for kiln's decode-GEMV rule.
    """
    from tvm import te, tirx

    decode = FourBitDecode(packed, scale, zero_point, tuple(shape), element, layout,
                           _norm_axis(axis, len(shape)), block_size, out_dtype)

    def compute(p, s, *rest):
        def body(*idx):
            return decode.value(p, rest, idx) * tirx.Cast(
                out_dtype, _te_param(s, idx, axis=decode.axis, block_size=block_size))

        return te.compute(shape, body, name="kiln_decode4")

    var = bb.emit_te(compute, *decode.args(), primfunc_name_hint="kiln_decode4",
                     primfunc_attrs=INJECTIVE)
    if not hasattr(_decodes, "by_var"):
        reset_decodes()
    _decodes.by_var[var] = decode
    return var


#: Block names of the grouped GEMV (kiln's quant_gemv rule schedules them).
GROUPED_PARTIAL = "kiln_gemv_group_sum"
GROUPED_OUTPUT = "kiln_gemv"
GROUPED_XSUM = "kiln_gemv_x_sum"
#: Up to this many rows a MatMul on a 4-bit blocked weight uses the grouped GEMV.
GROUPED_MAX_ROWS = 4


def grouped_gemv_decode(x, w):
    """The decode behind ``w`` when ``x @ w`` can be a grouped GEMV, else None.

    Needs a 2-D ``[K, N]`` weight in 32-column nibble tiles, blocked along K in at
    least two groups, and at most :data:`GROUPED_MAX_ROWS` rows of ``x``.
    """
    if not getattr(_decodes, "grouped", True):
        return None
    decode = getattr(_decodes, "by_var", {}).get(w)
    if decode is None or len(decode.shape) != 2 or decode.layout != 1 or decode.axis != 0 \
            or not decode.block_size or decode.shape[0] % decode.block_size \
            or decode.shape[0] < 2 * decode.block_size:  # one group: a plain decode GEMV
        return None
    try:
        x_shape = _static_shape(x)
    except (AttributeError, TypeError, ValueError):
        return None
    if not x_shape or x_shape[-1] != decode.shape[0] or _dtype(x) != decode.out_dtype:
        return None
    if math.prod(x_shape[:-1]) > GROUPED_MAX_ROWS:
        return None
    return decode


def emit_grouped_gemv(bb, x, decode: FourBitDecode):
    """``x @ dequantize(w)`` with the scale and offset applied once per group::

        part[m, g, n] = sum_b x[m, g*B + b] * u[g*B + b, n]      (u: the code as float)
        xsum[m, g]    = sum_b x[m, g*B + b]
        y[m, n]       = sum_g s[g, n] * (part[m, g, n] - offset[g, n] * xsum[m, g])

    (``value = u - offset``: offset 8 for int4's ``code ^ 8``, the zero point for
    uint4.) One kernel reading the packed weight; kiln's quant_gemv rule keeps ``part``
    in registers at the group loop: per weight one int->float conversion and one FMA.
    """
    from tvm import relax, te

    x_shape = _static_shape(x)
    k, n = decode.shape
    rows = math.prod(x_shape[:-1])
    group = decode.block_size
    x2 = bb.normalize(relax.op.reshape(x, [rows, k])) if len(x_shape) != 2 else x

    def compute(xt, p, s, *rest):
        b = te.reduce_axis((0, group), "b")
        part = te.compute(
            (rows, k // group, n),
            lambda m, g, j: te.sum(xt[m, g * group + b]
                                   * decode.raw_value(p, rest, (g * group + b, j))[0], axis=b),
            name=GROUPED_PARTIAL)
        has_offset = decode.raw_value(p, rest, (0, 0))[1] is not None
        gg = te.reduce_axis((0, k // group), "g")
        if not has_offset:
            return te.compute((rows, n), lambda m, j: te.sum(part[m, gg, j] * s[gg, j], axis=gg),
                              name=GROUPED_OUTPUT)
        bx = te.reduce_axis((0, group), "bx")
        xsum = te.compute((rows, k // group),
                          lambda m, g: te.sum(xt[m, g * group + bx], axis=bx), name=GROUPED_XSUM)

        def out(m, j):
            offset = decode.raw_value(p, rest, (gg * group, j))[1]
            return te.sum(s[gg, j] * (part[m, gg, j] - offset * xsum[m, gg]), axis=gg)

        return te.compute((rows, n), out, name=GROUPED_OUTPUT)

    y = bb.emit_te(compute, x2, *decode.args(), primfunc_name_hint="kiln_gemv_int4")
    if len(x_shape) != 2:
        y = bb.normalize(relax.op.reshape(y, [*x_shape[:-1], n]))
    return y


def kiln_matmul(fallback_cls):
    """Converter for MatMul: a GEMV on a 4-bit blocked weight becomes a grouped GEMV."""

    class KilnMatMul:
        @classmethod
        def get_converter(cls, opset: int):
            fallback = fallback_cls.get_converter(opset)

            def convert(bb, inputs, attr, params):
                decode = grouped_gemv_decode(inputs[0], inputs[1])
                if decode is None:
                    return fallback(bb, inputs, attr, params)
                return emit_grouped_gemv(bb, inputs[0], decode)

            return convert

    return KilnMatMul


class PackedDequantizeLinear:
    """Converter for :data:`PACKED_OP` (the importer calls ``get_converter(opset)``)."""

    @classmethod
    def get_converter(cls, opset: int):
        def convert(bb, inputs, attr, params):
            packed, scale = inputs[0], inputs[1]
            zero_point = inputs[2] if len(inputs) > 2 else None
            output_dtype = int(attr.get("output_dtype", 0))
            out_dtype = _onnx_dtype_name(output_dtype) if output_dtype else _dtype(scale)
            return emit_four_bit_decode(
                bb, packed, scale, zero_point, shape=[int(d) for d in attr["shape"]],
                element=_attr_str(attr["element"]), layout=int(attr.get("layout", -1)),
                axis=int(attr.get("axis", 1)), block_size=int(attr.get("block_size", 0)),
                out_dtype=out_dtype)

        return convert


def _emit_table_decode(bb, codes, table, scale, *, code_of, shape: list[int], axis: int,
                       block_size: int, name: str):
    """``table[code(idx)] * scale[idx with axis // block_size]`` as one TE kernel."""
    from tvm import te, tirx

    axis = _norm_axis(axis, len(shape))
    out_dtype = _dtype(table)

    def compute(c, t, s):
        def body(*idx):
            value = t[code_of(c, idx)]
            return value * tirx.Cast(out_dtype, _te_param(s, idx, axis=axis,
                                                          block_size=block_size))

        return te.compute(shape, body, name=name)

    return bb.emit_te(compute, codes, table, scale, primfunc_name_hint=name,
                      primfunc_attrs=INJECTIVE)


class DequantizeTable:
    """Converter for ``kiln.DequantizeTable(codes, table, scale){axis, block_size}``."""

    @classmethod
    def get_converter(cls, opset: int):
        def convert(bb, inputs, attr, params):
            from tvm import tirx

            codes, table, scale = inputs[0], inputs[1], inputs[2]
            shape = _static_shape(codes)
            return _emit_table_decode(
                bb, codes, table, scale, shape=shape,
                code_of=lambda c, idx: tirx.Cast("int32", c[idx]),
                axis=int(attr.get("axis", 0)), block_size=int(attr.get("block_size", 1)),
                name="kiln_decode_table")

        return convert


class PackedDequantizeTable:
    """Converter for :data:`PACKED_TABLE_OP`: ``kiln.DequantizeTable`` over packed nibbles."""

    @classmethod
    def get_converter(cls, opset: int):
        def convert(bb, inputs, attr, params):
            packed, table, scale = inputs[0], inputs[1], inputs[2]
            shape = [int(d) for d in attr["shape"]]
            layout = int(attr.get("layout", -1))
            return _emit_table_decode(
                bb, packed, table, scale, shape=shape,
                code_of=lambda c, idx: _te_nibble(c, idx, shape=shape, layout=layout),
                axis=int(attr.get("axis", 0)), block_size=int(attr.get("block_size", 1)),
                name="kiln_decode_table4")

        return convert


class CodebookDecode:
    """Converter for :data:`CODEBOOK_OP` (``index[n]``, ``codebook[k, d]``, attribute ``shape``)::

        W[i] = codebook[index[flat(i) // d], flat(i) % d]      (flat: C order over shape)

    One injective TE kernel reading the index and the table; with the index a low-bit
    constant, ``fuse_decode`` moves it into the contraction that reads ``W``.
    """

    @classmethod
    def get_converter(cls, opset: int):
        def convert(bb, inputs, attr, params):
            from tvm import te, tirx

            index, table = inputs[0], inputs[1]
            shape = [int(d) for d in attr["shape"]]
            d = _static_shape(table)[1]

            itype = "int32" if math.prod(shape) < 2**31 else "int64"
            # runs of d along the last dim (the usual case): row and column come from the
            # last index alone, so a vectorized column loop reads d-wide table rows
            by_last = bool(shape) and shape[-1] % d == 0
            outer = shape[:-1] + [shape[-1] // d] if by_last else shape

            def compute(ix, cb):
                def body(*idx):
                    idx = [tirx.Cast(itype, i) for i in idx]
                    last = list(idx[:-1]) + [idx[-1] // d] if by_last else idx
                    flat = last[0] if last else tirx.const(0, itype)
                    for dim, i in zip(outer[1:], last[1:], strict=True):
                        flat = flat * dim + i
                    if by_last:
                        column = idx[-1] % d
                    else:
                        flat, column = flat // d, flat % d
                    return cb[tirx.Cast(itype, ix[flat]), column]

                return te.compute(shape, body, name="kiln_decode_codebook")

            return bb.emit_te(compute, index, table, primfunc_name_hint="kiln_decode_codebook",
                              primfunc_attrs=INJECTIVE)

        return convert


class UnpackBits:
    """Converter for ``kiln.UnpackBits(packed){bits, shape}`` (see ``kiln_ops``).

    Code ``i`` (C order) occupies bits ``[i*bits, (i+1)*bits)`` of the little-endian
    byte stream, so it is read from at most two bytes; the kernel reads the packed
    bytes directly (nothing is unpacked ahead of time).
    """

    @classmethod
    def get_converter(cls, opset: int):
        def convert(bb, inputs, attr, params):
            from tvm import relax, te, tirx

            packed = inputs[0]
            bits = int(attr["bits"])
            shape = [int(d) for d in attr["shape"]]
            nbytes = math.prod(_static_shape(packed))
            mask = (1 << bits) - 1

            def compute(p):
                def body(*idx):
                    flat = idx[0] if idx else 0
                    for dim, i in zip(shape[1:], idx[1:], strict=True):
                        flat = flat * dim + i
                    bit = tirx.Cast("int32", flat) * bits
                    byte = bit >> 3
                    # the last code never crosses the end, so clamping the second byte is safe
                    nxt = tirx.min(byte + 1, nbytes - 1)
                    word = tirx.Cast("int32", p[byte]) | (tirx.Cast("int32", p[nxt]) << 8)
                    return tirx.Cast("uint8", (word >> (bit & 7)) & mask)

                return te.compute(shape, body, name="kiln_unpack_bits")

            flat_packed = packed if len(_static_shape(packed)) == 1 else \
                bb.normalize(relax.op.reshape(packed, [nbytes]))
            return bb.emit_te(compute, flat_packed, primfunc_name_hint="kiln_unpack_bits",
                              primfunc_attrs=INJECTIVE)

        return convert


def _row_permutation(indices, rows: int) -> np.ndarray | None:
    """``inverse`` with ``out[r] = updates[inverse[r]]`` when a constant ScatterND
    ``indices[rows, 1]`` writes every row once, else None."""
    import tvm

    if not isinstance(indices, tvm.ir.GenericConst):
        return None
    order = indices.value.numpy()
    if order.shape != (rows, 1) or order.dtype.kind not in "iu":
        return None
    order = order[:, 0].astype(np.int64)
    order = np.where(order < 0, order + rows, order)
    if not np.array_equal(np.sort(order), np.arange(rows)):
        return None
    # int64 like the weight's own indices: the gathered row is substituted into the
    # decode's index expressions (Concat's ``64 <= r``) when it is inlined
    inverse = np.empty(rows, np.int64)
    inverse[order] = np.arange(rows, dtype=np.int64)
    return inverse


def scatter_rows_as_gather(fallback_cls):
    """Converter for ScatterND that writes every row of ``data`` once (constant indices
    ``[K, 1]``, a permutation: salient_split's ``ScatterND(zeros, rows, Concat(W_s, W_b))``)
    as an injective row gather of ``updates``: ``data`` is never read, and the gather
    fuses with the weight's decode (then into its MatMul, ``fuse_decode``) instead of
    scattering a float32 weight into memory. Other ScatterNDs go to ``fallback_cls``.
    """

    class ScatterRowsAsGather:
        @classmethod
        def get_converter(cls, opset: int):
            fallback = fallback_cls.get_converter(opset)

            def convert(bb, inputs, attr, params):
                from tvm import relax, te

                data, indices, updates = inputs[0], inputs[1], inputs[2]
                reduction = _attr_str(attr.get("reduction", "none"))
                try:
                    shape = _static_shape(data)
                    same = _static_shape(updates) == shape and _dtype(updates) == _dtype(data)
                except (AttributeError, TypeError, ValueError):
                    same = False
                inverse = _row_permutation(indices, shape[0]) \
                    if same and shape and reduction == "none" else None
                if inverse is None:
                    return fallback(bb, inputs, attr, params)

                def compute(u, inv):
                    return te.compute(shape, lambda r, *rest: u[(inv[r], *rest)],
                                      name="kiln_permute_rows")

                return bb.emit_te(compute, updates, relax.const(inverse, "int64"),
                                  primfunc_name_hint="kiln_permute_rows",
                                  primfunc_attrs=INJECTIVE)

            return convert

    return ScatterRowsAsGather


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
