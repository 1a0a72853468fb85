"""MatMul of a few rows on a blocked 4-bit weight as one grouped GEMV kernel (CPU)::

    part[m, g, n] = sum_b x[m, g*B + b] * u[g*B + b, n]      (u: the code as float)
    xsum[m, g]    = sum_b x[m, g*B + b]
    y[m, n]       = sum_g s[g, n] * (part[m, g, n] - offset[g, n] * xsum[m, g])

(``value = u - offset``: offset 8 for int4's ``code ^ 8``, the zero point for uint4.)
One kernel reading the packed weight; kiln's quant_gemv rule finds its blocks by name
(:mod:`kiln.backends.tvm.kernel_names`) and keeps ``part`` in registers at the group
loop: per weight one int->float conversion and one FMA, the scale once per group.
"""

from __future__ import annotations

import math

from kiln.backends.tvm.kernel_names import GROUPED_OUTPUT, GROUPED_PARTIAL, GROUPED_XSUM

from .context import ImportContext
from .decode import FourBitDecode
from .expr_types import dtype_of, static_shape

#: Up to this many rows a MatMul on a 4-bit blocked weight uses the grouped GEMV.
GROUPED_MAX_ROWS = 4


def grouped_gemv_decode(context: ImportContext, x, w) -> FourBitDecode | None:
    """The decode behind ``w`` when ``x @ w`` can be a grouped GEMV, else None.

    Needs the context to allow it, a 2-D ``[K, N]`` weight in 32-column nibble tiles,
    blocked along K in at least two groups, and at most :data:`GROUPED_MAX_ROWS` rows
    of ``x``.
    """
    if not context.grouped_gemv:
        return None
    decode = context.decode_of(w)
    if decode is None or len(decode.shape) != 2 or decode.layout != 1 or decode.axis != 0 \
            or not decode.block_size or decode.shape[0] % decode.block_size \
            or decode.shape[0] < 2 * decode.block_size:  # one group: a plain decode GEMV
        return None
    try:
        x_shape = static_shape(x)
    except (AttributeError, TypeError, ValueError):
        return None
    if not x_shape or x_shape[-1] != decode.shape[0] or dtype_of(x) != decode.out_dtype:
        return None
    if math.prod(x_shape[:-1]) > GROUPED_MAX_ROWS:
        return None
    return decode


def emit_grouped_gemv(bb, x, decode: FourBitDecode):
    """``x @ dequantize(w)`` with the scale and offset applied once per group (see the
    module docstring); the weight's own decode is left unused (dead code)."""
    from tvm import relax, te

    x_shape = static_shape(x)
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


class GroupedGemvMatMul:
    """MatMul converter: a GEMV on a blocked 4-bit weight becomes a grouped GEMV; any
    other MatMul goes to TVM's converter (``fallback``)."""

    def __init__(self, fallback, context: ImportContext) -> None:
        self.fallback = fallback
        self.context = context

    def get_converter(self, opset: int):
        fallback = self.fallback.get_converter(opset)

        def convert(bb, inputs, attr, params):
            decode = grouped_gemv_decode(self.context, inputs[0], inputs[1])
            if decode is None:
                return fallback(bb, inputs, attr, params)
            return emit_grouped_gemv(bb, inputs[0], decode)

        return convert
