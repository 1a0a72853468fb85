"""The integer depthwise conv (``importer.int8_conv``, ``depthwise`` form) on CPU.

The kernel reads uint8 NHWC activations and int8 taps ``w[KH * KW, C]``; each output
pixel's channels are one vector of int32 sums (int16 products, exact for u8 x s8)::

    parallel for (b, oh):
      for ow_o in OW / T: for c_o in C / L:
        acc[T, L] = 0                                  # T vector registers
        for ry, rx:                                    # unrolled taps
          for t in T: acc[t, :] += a[b, oh*s + ry*d, (ow_o*T + t)*s + rx*d, c_o*L : +L]
                                   * w[ry*KW + rx, c_o*L : +L]   # one weight load per tap
        y[b, oh, ow_o*T : +T, c_o*L : +L] = requantize(acc)

``L`` is the target's int32 lanes (16 on AVX-512, 8 on AVX2); ``T`` the largest
divisor of OW up to :data:`MAX_PIXELS`.
"""

from __future__ import annotations

from tvm import s_tir

from kiln.backends.tvm.kernel_names import INT8_DW_ACC
from kiln.backends.tvm.schedules.int8_dense import integer_kernel
from kiln.backends.tvm.schedules.rule import KilnRule, RuleContext

#: Output pixels per register tile at most.
MAX_PIXELS = 4


def pixel_tile(width: int) -> int:
    """The largest divisor of ``width`` up to :data:`MAX_PIXELS`."""
    return max(t for t in range(1, MAX_PIXELS + 1) if width % t == 0)


class Int8Window(KilnRule):
    """kiln's integer depthwise conv: channels vectorized, taps unrolled."""

    name = "int8_window"

    def schedule(self, sch: s_tir.Schedule, ctx: RuleContext) -> s_tir.Schedule | None:
        found = integer_kernel(sch, INT8_DW_ACC)
        if found is None:
            return None
        acc, out = found
        _, _, width, channels = (int(d) for d in sch.get(out).writes[0].source.shape)
        lanes = next((v for v in (ctx.vector_lanes_f32, 8) if channels % v == 0), None)
        if lanes is None:
            return None
        b, oh, ow, c = sch.get_loops(out)
        ow_o, ow_i = sch.split(ow, [None, pixel_tile(width)])
        c_o, c_v = sch.split(c, [None, lanes])
        sch.reorder(b, oh, ow_o, c_o, ow_i, c_v)
        sch.parallel(sch.fuse(b, oh))
        sch.compute_at(acc, c_o)
        loops = sch.get_loops(acc)
        a_t, a_v, ry, rx = loops[-4:]
        sch.reorder(ry, rx, a_t, a_v)
        sch.unroll(a_t)
        sch.vectorize(a_v)  # before the init is split off (vectorize needs a complete block)
        init = sch.decompose_reduction(acc, ry)
        sch.unroll(ry)
        sch.unroll(rx)
        i_t, i_v = sch.get_loops(init)[-2:]
        sch.unroll(i_t)
        sch.vectorize(i_v)
        sch.unroll(ow_i)
        sch.vectorize(c_v)
        return sch
