"""A plain reduction over a kernel's innermost axes: ReduceSum / ReduceMean / ReduceMax /
ReduceL2 ... over the last axes (a global average pool over H, W in NCHW, a sum over a
row, a reduce over every axis), with its element-wise producers inlined and its
element-wise consumers (a mean's divide) computed per output.

The row rule (``elementwise.schedule_row_reduction``) takes kernels of several blocks
with one reduction axis; the window rule takes reductions over outer axes (vectorized
along the innermost output axis). What was left was a kernel that is one reduction over
one or more *innermost* axes: TVM's default loop nest, serial. Here:

- the reduction loops fuse into one loop of ``K`` elements (they are the innermost
  axes of the data, so the fused loop reads memory in order);
- ``K`` is ``rfactor``-ed into vector partial results ``acc[lanes] op= x[k_o*lanes:+lanes]``
  (the widest vector dividing ``K``; serial when none does), then the lanes are reduced;
- the output elements (fused spatial loops) run in parallel when there is enough work;
- consumer blocks run under the same output loop.
"""

from __future__ import annotations

import math

from tvm import s_tir

from kiln.backends.tvm.schedules.analysis import const_extent, inline_injective, single_reduction
from kiln.backends.tvm.schedules.elementwise import PARALLEL_MIN_ELEMENTS
from kiln.backends.tvm.schedules.rule import KilnRule, RuleContext


def lanes_dividing(extent: int, lanes: int) -> int | None:
    """The widest vector (down to 4 lanes) that divides ``extent`` at least twice."""
    while lanes >= 4:
        if extent % lanes == 0 and extent >= 2 * lanes:
            return lanes
        lanes //= 2
    return None


class InnerReduction(KilnRule):
    """One reduction over the innermost axes, its producers inlined (see module doc)."""

    name = "inner_reduction"

    def schedule(self, sch: s_tir.Schedule, ctx: RuleContext) -> s_tir.Schedule | None:
        return schedule_inner_reduction(sch, ctx)


def schedule_inner_reduction(sch: s_tir.Schedule, ctx: RuleContext) -> s_tir.Schedule | None:
    """``sch`` scheduled when its kernel is one reduction over innermost axes (after
    inlining element-wise producers); None otherwise. A reducer ``rfactor`` does not know
    (the importer's max/min from -inf) reduces each output serially."""
    return vector_or_serial(_schedule, sch, ctx)


def vector_or_serial(schedule, sch: s_tir.Schedule, ctx: RuleContext) -> s_tir.Schedule | None:
    """``schedule(sch, ctx, vectorize=True)`` on a copy of ``sch``; when that raises
    (``rfactor`` refused the reducer), ``schedule(sch, ctx, vectorize=False)``."""
    trial = sch.copy()
    try:
        return schedule(trial, ctx, vectorize=True)
    except Exception:  # noqa: BLE001 - TVM's ScheduleError: rfactor refused the reducer
        return schedule(sch, ctx, vectorize=False)


def _schedule(sch: s_tir.Schedule, ctx: RuleContext, *, vectorize: bool) -> s_tir.Schedule | None:
    found = single_reduction(sch)
    if found is None:
        return None
    _, red = found
    if not inline_injective(sch, red.name, side="before"):
        return None
    found = single_reduction(sch)
    if found is None:
        return None
    infos, red = found
    names = [info.name for info in infos]
    if names.index(red.name) != 0:  # a producer could not be inlined
        return None
    kind = red.dom_kind()
    spatial = len(kind.rstrip("R"))
    if kind != "S" * spatial + "R" * (len(kind) - spatial) or spatial == len(kind):
        return None
    block = sch.get_sblock(red.name)
    loops = sch.get_loops(block)
    if len(loops) != len(kind):
        return None
    r_extents = [const_extent(sch, loop) for loop in loops[spatial:]]
    s_extents = [const_extent(sch, loop) for loop in loops[:spatial]]
    if any(e is None for e in r_extents):
        return None  # a symbolic reduction: the symbolic rules' business
    # symbolic rows (a symbolic batch or token count): counted as 1 for the parallel choice
    symbolic_rows = any(e is None for e in s_extents)
    k_total = math.prod(e for e in r_extents if e is not None)
    rows = math.prod(e for e in s_extents if e is not None)
    reduction = sch.fuse(*loops[spatial:]) if len(loops) - spatial > 1 else loops[spatial]
    width = lanes_dividing(k_total, ctx.vector_lanes_f32) if vectorize else None
    rf = None
    if width is not None:
        _, lane = sch.split(reduction, [None, width])
        rf = sch.rfactor(lane, factor_axis=0)
        sch.set_scope(rf, 0, "local")
    row = None
    if spatial:
        out_loops = sch.get_loops(block)[:spatial]
        row = sch.fuse(*out_loops) if spatial > 1 else out_loops[0]
        if rows * k_total >= PARALLEL_MIN_ELEMENTS and (rows > 1 or symbolic_rows):
            sch.parallel(row)
    if rf is not None:
        if row is not None:
            sch.compute_at(rf, row, preserve_unit_loops=True)
            # under the row loop: (lane, k_o): make the lane innermost, vectorized
            lane_loop, *rest = sch.get_loops(rf)[1:]
            sch.reorder(*rest, lane_loop)
        sch.vectorize(sch.get_loops(rf)[-1])
        init = sch.decompose_reduction(rf, sch.get_loops(rf)[-2])
        sch.vectorize(sch.get_loops(init)[-1])
    if row is not None:
        for info in infos[1:]:
            sch.reverse_compute_at(sch.get_sblock(info.name), row, preserve_unit_loops=True)
    return sch
