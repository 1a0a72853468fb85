"""Converters for the weight forms kiln's passes write and :mod:`.prepare` leaves.

Each is an entry of TVM's converter table (``get_converter(opset)`` returns
``convert(bb, inputs, attr, params)``) that emits one decode kernel reading the
compressed weight (:mod:`.decode`):

- ``DequantizeLinear`` with ``block_size`` (TVM's own converter rejects it; others
  go to TVM's) and the internal packed 4-bit form;
- ``kiln.DequantizeTable`` over codes, and its packed 4-bit form;
- the internal codebook op: ``W[i] = codebook[index[flat(i) // d], flat(i) % d]``;
- ``kiln.UnpackBits``: code ``i`` read from at most two bytes of the packed stream.
"""

from __future__ import annotations

import math

from .context import ImportContext
from .decode import (
    INJECTIVE,
    FourBitDecode,
    dequantize_expr,
    emit_four_bit_decode,
    emit_table_decode,
    norm_axis,
    te_nibble,
)
from .expr_types import attr_str, dtype_of, onnx_dtype_name, static_shape


def _out_dtype(attr, scale) -> str:
    output_dtype = int(attr.get("output_dtype", 0))
    return onnx_dtype_name(output_dtype) if output_dtype else dtype_of(scale)


class BlockedDequantizeLinear:
    """``DequantizeLinear`` with ``block_size`` on top of TVM's converter (``fallback``),
    which takes the nodes without it unchanged."""

    def __init__(self, fallback) -> None:
        self.fallback = fallback

    def get_converter(self, opset: int):
        fallback = self.fallback.get_converter(opset)

        def convert(bb, inputs, attr, params):
            block_size = int(attr.get("block_size", 0))
            if not block_size:
                return fallback(bb, inputs, attr, params)
            x, scale = inputs[0], inputs[1]
            zero_point = inputs[2] if len(inputs) > 2 else None
            return dequantize_expr(x, scale, zero_point, axis=int(attr.get("axis", 1)),
                                   block_size=block_size, out_dtype=_out_dtype(attr, scale))

        return convert


class PackedDequantizeLinear:
    """The internal packed 4-bit ``DequantizeLinear``: one decode kernel, recorded in the
    import's context (a MatMul reading it may become a grouped GEMV)."""

    def __init__(self, context: ImportContext) -> None:
        self.context = context

    def get_converter(self, opset: int):
        def convert(bb, inputs, attr, params):
            packed, scale = inputs[0], inputs[1]
            zero_point = inputs[2] if len(inputs) > 2 else None
            shape = [int(d) for d in attr["shape"]]
            decode = FourBitDecode(
                packed, scale, zero_point, tuple(shape), attr_str(attr["element"]),
                int(attr.get("layout", -1)), norm_axis(int(attr.get("axis", 1)), len(shape)),
                int(attr.get("block_size", 0)), _out_dtype(attr, scale))
            var = emit_four_bit_decode(bb, decode)
            self.context.record_decode(var, decode)
            return var

        return convert


class TableDecode:
    """``kiln.DequantizeTable(codes, table, scale){axis, block_size}``; with ``packed``, the
    internal form whose codes are 4-bit nibbles (attributes shape and layout)."""

    def __init__(self, *, packed: bool) -> None:
        self.packed = packed

    def get_converter(self, opset: int):
        def convert(bb, inputs, attr, params):
            from tvm import tirx

            codes, table, scale = inputs[0], inputs[1], inputs[2]
            if self.packed:
                shape = [int(d) for d in attr["shape"]]
                layout = int(attr.get("layout", -1))

                def code_of(c, idx):
                    return te_nibble(c, idx, shape=shape, layout=layout)

                name = "kiln_decode_table4"
            else:
                shape = static_shape(codes)

                def code_of(c, idx):
                    return tirx.Cast("int32", c[idx])

                name = "kiln_decode_table"
            return emit_table_decode(
                bb, codes, table, scale, shape=shape, code_of=code_of,
                axis=int(attr.get("axis", 0)), block_size=int(attr.get("block_size", 1)),
                name=name)

        return convert


class CodebookDecode:
    """The internal codebook op (``index[n]``, ``codebook[k, d]``, attribute ``shape``)::

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
            d = static_shape(table)[1]

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
    """``kiln.UnpackBits(packed){bits, shape}`` (semantics: ``kiln.compiler.core.kiln_domain``).

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
            nbytes = math.prod(static_shape(packed))
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

            flat_packed = packed if len(static_shape(packed)) == 1 else \
                bb.normalize(relax.op.reshape(packed, [nbytes]))
            return bb.emit_te(compute, flat_packed, primfunc_name_hint="kiln_unpack_bits",
                              primfunc_attrs=INJECTIVE)

        return convert
