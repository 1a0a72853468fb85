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

:class:`Int8Pool` is the 8-bit max-pool (``Q(MaxPool(a)) == MaxPool(Q(a))``, YOLOX's SPP
on ``uint8`` NCHW maps): ``window.py``'s pool rule splits the row into fp32-sized
vectors and refuses a 13-wide row under a 13x13 window. Here the whole output row is one
byte vector (up to :data:`MAX_ROW_BYTES`) and each channel's padded map is built in the
task that reads it (a few hundred bytes, in L1)::

    parallel for (b, c):
      pad[H + KH - 1, W + KW - 1] = pad(x[b, c])          # the dtype's minimum outside
      for oh:
        acc[OW] = min_value                                # one vector register
        for ry: for rx (unrolled): acc[:] = max(acc, pad[oh*s + ry, (0 .. OW)*s + rx])
        y[b, c, oh, :] = acc
"""

from __future__ import annotations

from tvm import s_tir, tirx

from kiln.backends.tvm.kernel_names import INT8_DW_ACC
from kiln.backends.tvm.schedules.analysis import single_reduction
from kiln.backends.tvm.schedules.int8_dense import integer_kernel
from kiln.backends.tvm.schedules.rule import KilnRule, RuleContext

#: Output pixels per register tile at most.
MAX_PIXELS = 4
#: An 8-bit pool's output row is one vector up to this many bytes (a zmm register).
MAX_ROW_BYTES = 64
#: Window columns up to this many are unrolled.
MAX_UNROLLED_COLUMNS = 16


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


def _max_pool_block(sch: s_tir.Schedule):
    """(padding block or None, pool block) of an 8-bit 2-D max-pool kernel, else None."""
    found = single_reduction(sch)
    if found is None:
        return None
    infos, reduction = found
    stmt = sch.get(reduction.block_rv)
    body = stmt.body
    if (not isinstance(body, tirx.BufferStore) or stmt.init is None
            or str(body.buffer.dtype) not in ("uint8", "int8")
            or not isinstance(body.value, tirx.Max)):
        return None
    # spatial (batch, channel, oh, ow; extent-1 dims normalized away), then (ry, rx)
    kinds = [iv.iter_type for iv in stmt.iter_vars]
    spatial = len(kinds) - 2
    if spatial < 2 or kinds != [tirx.IterVar.DataPar] * spatial + [tirx.IterVar.CommReduce] * 2:
        return None
    if any(not isinstance(iv.dom.extent, tirx.IntImm) for iv in stmt.iter_vars):
        return None
    names = [info.name for info in infos]
    before = infos[: names.index(reduction.name)]
    after = infos[names.index(reduction.name) + 1:]
    if after or len(before) > 1 or any(not info.is_injective() for info in before):
        return None
    return (before[0].block_rv if before else None), reduction.block_rv


def row_lanes(width: int) -> int | None:
    """Bytes of an 8-bit pool's output-row vector: the whole row up to
    :data:`MAX_ROW_BYTES`, else the largest of 64/32/16 dividing it; None if none."""
    if width <= MAX_ROW_BYTES:
        return width
    return next((v for v in (64, 32, 16) if width % v == 0), None)


class Int8Pool(KilnRule):
    """An 8-bit max-pool: the output row one byte vector, the padded map per channel."""

    name = "int8_pool"

    def schedule(self, sch: s_tir.Schedule, ctx: RuleContext) -> s_tir.Schedule | None:
        found = _max_pool_block(sch)
        if found is None:
            return None
        pad, pool = found
        iters = sch.get(pool).iter_vars
        width, columns = int(iters[-3].dom.extent), int(iters[-1].dom.extent)
        lanes = row_lanes(width)
        loops = sch.get_loops(pool)
        if lanes is None or len(loops) != len(iters):
            return None
        *outer, oh, ow, ry, rx = loops
        task = sch.fuse(*outer) if len(outer) > 1 else (outer[0] if outer else oh)
        sch.parallel(task)
        ow_o, ow_v = sch.split(ow, [None, lanes])
        local = sch.cache_write(pool, 0, "local")
        sch.reorder(ow_o, ry, rx, ow_v)
        sch.vectorize(ow_v)  # before the init is split off (vectorize needs a complete block)
        if columns <= MAX_UNROLLED_COLUMNS:
            sch.unroll(rx)
        sch.reverse_compute_at(local, ow_o, preserve_unit_loops=True)
        init = sch.decompose_reduction(pool, ry)
        sch.vectorize(sch.get_loops(init)[-1])
        sch.vectorize(sch.get_loops(local)[-1])
        if pad is not None:
            sch.compute_at(pad, task)
        return sch
