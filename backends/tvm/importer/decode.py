"""Weight decodes as Relax/TE: one injective kernel per weight, reading its packed form.

``y = (x - zero_point) * scale`` with the parameters per tensor, per axis, or per block
of ``block_size`` consecutive elements along ``axis`` (ONNX opset 21+):

- :func:`dequantize_expr`: Relax ops, for a ``DequantizeLinear`` on an unpacked weight;
- :func:`emit_four_bit_decode`: one TE kernel over 4-bit codes packed as :mod:`.nibbles`
  (int4, uint4, FP4 E2M1), described by a :class:`FourBitDecode`;
- :func:`emit_table_decode`: ``table[code] * scale`` (``kiln.DequantizeTable``).

Each kernel is a single compute (not a chain of Relax ops), so that fusing it into its
matmul/conv (``fuse_decode``) leaves one expression per weight element for kiln's
decode rules. TVM is imported lazily: only lowering needs it.
"""

from __future__ import annotations

import dataclasses

from kiln.compiler.core.packing import FP4_E2M1_VALUES

from .expr_types import dtype_of, static_shape
from .nibbles import HALF_TILE, TILE_COLUMNS

#: A decode kernel's op pattern for FuseOps: injective (Relax's kInjective). A table
#: lookup ``t[code]`` reads at a data-dependent index, which AnnotateTIROpPattern would
#: call opaque, and an opaque decode would fuse with nothing (not even the weight's
#: transpose in front of a channels-last conv, which fuse_decode then cannot take).
INJECTIVE = {"op_pattern": 2}

#: 0x4B000000 is the float 2^23: OR-ing a small int into its mantissa gives 2^23 + v.
_MAGIC_BITS = 0x4B000000
_MAGIC_FLOAT = 8388608.0


def norm_axis(axis: int, rank: int) -> int:
    """``axis`` in ``[0, rank)`` (0 for scalars and vectors)."""
    if rank <= 1:
        return 0
    return axis + rank if axis < 0 else axis


def _expand_param(param, *, x_shape: list[int], axis: int, block_size: int):
    """Broadcastable form of a scale/zero-point for ``x`` (per tensor, axis or block)."""
    from tvm import relax

    shape = static_shape(param)
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

    shape = x_shape or static_shape(x)
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
        s = scale if dtype_of(scale) == out_dtype else relax.op.astype(scale, out_dtype)
        y = relax.op.multiply(y, relax.op.expand_dims(s, axis + 1))
        return relax.op.reshape(y, shape)
    if zero_point is not None:
        zp = _expand_param(zero_point, x_shape=shape, axis=axis, block_size=block_size)
        y = relax.op.subtract(y, relax.op.astype(zp, out_dtype))
    s = _expand_param(scale, x_shape=shape, axis=axis, block_size=block_size)
    if dtype_of(scale) != out_dtype:
        s = relax.op.astype(s, out_dtype)
    return relax.op.multiply(y, s)


def te_nibble(packed, idx, *, shape: list[int], layout: int):
    """The 4-bit code (int32, 0..15) at ``idx`` of a weight packed by kiln (tiled or flat)."""
    from tvm import tirx

    # The nibble is chosen with a Select on an index condition (not a shift by an index
    # expression): the data path stays 8/32-bit, which TVM would otherwise widen to int64.
    if layout >= 0:
        c = idx[layout]
        (_, r), *rest = [(shape[d], i) for d, i in enumerate(idx) if d != layout]
        for dim, i in rest:  # the other axes' C-order flat index (a conv's [I, kh, kw])
            r = r * dim + i
        byte = packed[c // TILE_COLUMNS, r, c % HALF_TILE]
        low = c % TILE_COLUMNS < HALF_TILE
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


def te_param(param, idx, *, axis: int, block_size: int):
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


@dataclasses.dataclass(frozen=True)
class FourBitDecode:
    """A 4-bit weight decode: its Relax inputs, the packed layout and the parameters.

    ``layout`` is the tiled column axis of :mod:`.nibbles` (-1: flat); ``axis`` is
    normalized (:func:`norm_axis`).
    """

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
        """The kernel's inputs: packed codes, scale, [zero point], [FP4 value table]."""
        from tvm import relax

        extra = [self.zero_point] if self.zero_point is not None else []
        if self.element == "float4e2m1":
            extra.append(relax.const(FP4_E2M1_VALUES))
        return [self.packed, self.scale, *extra]

    def raw_value(self, p, rest, idx):
        """``(u, offset)`` with ``value = u - offset``: u is the code as float32 (one
        conversion), offset a constant or the zero point; the grouped GEMV subtracts
        ``offset * sum(x)`` once per group instead of once per weight."""
        from tvm import tirx

        code = te_nibble(p, idx, shape=list(self.shape), layout=self.layout)
        z = rest[0] if self.zero_point is not None else None
        if self.element == "int4":
            u, bias = tirx.Cast(self.out_dtype, code ^ 8), 8.0
        elif self.element == "uint4":
            u, bias = tirx.Cast(self.out_dtype, code), 0.0
        else:
            u, bias = tirx.Cast(self.out_dtype, rest[-1][code]), 0.0
        offset = tirx.const(bias, self.out_dtype) if bias else None
        if z is not None:
            zv = tirx.Cast(self.out_dtype, te_param(z, idx, axis=self.axis,
                                                    block_size=self.block_size))
            offset = zv if offset is None else offset + zv
        return u, offset

    def value(self, p, rest, idx):
        """``code(packed)[idx] - zero_point`` in ``out_dtype`` (no scale)."""
        from tvm import tirx

        element, out_dtype = self.element, self.out_dtype
        code = te_nibble(p, idx, shape=list(self.shape), layout=self.layout)
        if element in ("int4", "uint4") and out_dtype == "float32":
            # int -> float without a conversion instruction: 2^23 + v has v in its low
            # mantissa bits (exact for 0 <= v < 2^23); int4 is (code ^ 8) - 8.
            biased = (code ^ 8) if element == "int4" else code
            offset = _MAGIC_FLOAT + (8.0 if element == "int4" else 0.0)
            value = tirx.reinterpret("float32", biased | _MAGIC_BITS) \
                - tirx.const(offset, "float32")
        elif element == "int4":
            value = tirx.Cast(out_dtype, (code ^ 8) - 8)
        elif element == "uint4":
            value = tirx.Cast(out_dtype, code)
        elif element == "float4e2m1":
            value = tirx.Cast(out_dtype, rest[-1][code])
        else:
            raise ValueError(f"unknown 4-bit element kind {element!r}")
        if self.zero_point is not None:
            value = value - tirx.Cast(out_dtype, te_param(rest[0], idx, axis=self.axis,
                                                          block_size=self.block_size))
        return value


def emit_four_bit_decode(bb, decode: FourBitDecode):
    """One TE kernel ``(code(packed) - zero_point) * scale`` reading the packed nibbles;
    the Relax var bound to the decoded weight."""
    from tvm import te, tirx

    def compute(p, s, *rest):
        def body(*idx):
            return decode.value(p, rest, idx) * tirx.Cast(
                decode.out_dtype, te_param(s, idx, axis=decode.axis,
                                           block_size=decode.block_size))

        return te.compute(list(decode.shape), body, name="kiln_decode4")

    return bb.emit_te(compute, *decode.args(), primfunc_name_hint="kiln_decode4",
                      primfunc_attrs=INJECTIVE)


def emit_table_decode(bb, codes, table, scale, *, code_of, shape: list[int], axis: int,
                      block_size: int, name: str):
    """``table[code_of(codes, idx)] * scale[idx with axis // block_size]`` as one TE kernel."""
    from tvm import te, tirx

    axis = norm_axis(axis, len(shape))
    out_dtype = dtype_of(table)

    def compute(c, t, s):
        def body(*idx):
            value = t[code_of(c, idx)]
            return value * tirx.Cast(out_dtype, te_param(s, idx, axis=axis,
                                                         block_size=block_size))

        return te.compute(shape, body, name=name)

    return bb.emit_te(compute, codes, table, scale, primfunc_name_hint=name,
                      primfunc_attrs=INJECTIVE)
