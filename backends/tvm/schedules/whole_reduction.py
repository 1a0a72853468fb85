"""Kernels whose every reduction reduces its whole input to one value: a layer norm or a
variance over every axis (ONNX LayerNormalization with ``axis=0``: mean, then the mean of
``(x - mean)^2``, then ``(x - mean) * rsqrt(var + eps) * W + B``).

The row rules take reductions that keep some axes (one result per row); here there is
no row left, every reduction's spatial loops have extent 1, so TVM's default is a serial
scalar loop nest per reduction. Here:

- each reduction's loops fuse into one loop of ``K`` elements (all axes, in memory order),
  ``rfactor``-ed into vector partial results ``acc[lanes] op= x[k_o*lanes:+lanes]`` (the
  widest vector dividing ``K``; serial when none does or ``rfactor`` refuses the reducer),
  then the lanes are reduced;
- each element-wise block (the normalization over every element) is vectorized along its
  innermost axis (the widest vector dividing it) and parallel over the others when it is
  large enough (fusing all its axes into one vectorized loop measured slower: 0.74 vs
  0.41 ms CPU on [64, 56, 56], AMD EPYC Zen 4, 1 thread);
- every block stays its own loop nest (a scalar result is computed once, not per element).
"""

from __future__ import annotations

import math

from tvm import s_tir

from kiln.backends.tvm.schedules.analysis import const_extent, normalize_prim_func
from kiln.backends.tvm.schedules.elementwise import parallel_vectorize
from kiln.backends.tvm.schedules.reduce import lanes_dividing, vector_or_serial
from kiln.backends.tvm.schedules.rule import KilnRule, RuleContext


class WholeReduction(KilnRule):
    """Reductions to a single value and element-wise blocks (see module doc)."""

    name = "whole_reduction"

    def schedule(self, sch: s_tir.Schedule, ctx: RuleContext) -> s_tir.Schedule | None:
        return schedule_whole_reduction(sch, ctx)


def _reduction_loops(sch: s_tir.Schedule, info) -> int | None:
    """How many leading spatial loops (all of extent 1) a whole reduction has; None when
    ``info``'s block is not a reduction of every element to one value."""
    kind = info.dom_kind()
    spatial = len(kind.rstrip("R"))
    if spatial == len(kind) or kind != "S" * spatial + "R" * (len(kind) - spatial):
        return None
    loops = sch.get_loops(info.block_rv)
    if len(loops) != len(kind):
        return None
    extents = [const_extent(sch, loop) for loop in loops]
    if any(e is None for e in extents) or any(e != 1 for e in extents[:spatial]):
        return None
    return spatial


def schedule_whole_reduction(sch: s_tir.Schedule, ctx: RuleContext) -> s_tir.Schedule | None:
    """``sch`` scheduled when each of its blocks is element-wise or a reduction of every
    element it reads to one value (at least one reduction); None otherwise. A reducer
    ``rfactor`` does not know (the importer's max from -inf) reduces serially."""
    return vector_or_serial(_schedule, sch, ctx)


def _schedule(sch: s_tir.Schedule, ctx: RuleContext, *, vectorize: bool) -> s_tir.Schedule | None:
    infos = normalize_prim_func(sch)
    if infos is None or all(info.is_injective() for info in infos):
        return None
    if any(not sch.get(info.block_rv).iter_vars and not sch.get(info.block_rv).writes
           for info in infos):
        return None  # IR-builder code (TOPI's NMS, scatter): not a reduction of ours
    reductions: list[tuple[str, int]] = []
    injective: list[str] = []
    for info in infos:
        if info.is_injective():
            if any(const_extent(sch, loop) is None for loop in sch.get_loops(info.block_rv)):
                return None  # symbolic extents: the symbolic rules' business
            injective.append(info.name)
            continue
        spatial = _reduction_loops(sch, info)
        if spatial is None:
            return None
        reductions.append((info.name, spatial))
    for info in infos:
        if not sch.get_loops(info.block_rv):
            # a loop-less block (the mean's divide) beside a reduction makes rfactor's
            # block replacer fail (TVM 0.27 InternalError): give it a unit loop
            sch.add_unit_loop(info.block_rv)
    for name, spatial in reductions:
        _partials(sch, name, spatial, ctx.vector_lanes_f32 if vectorize else None)
    for name in injective:
        block = sch.get_sblock(name)
        loops = sch.get_loops(block)
        lanes = ctx.vector_lanes_f32
        if loops:
            lanes = lanes_dividing(const_extent(sch, loops[-1]) or 0, lanes) or lanes
        parallel_vectorize(sch, block, lanes)
    return sch


def _partials(sch: s_tir.Schedule, name: str, spatial: int, lanes: int | None) -> None:
    """Block ``name`` (``spatial`` unit loops, then its reduction loops) with its reduction
    loops fused, as vector partial results over ``lanes`` (None: serial)."""
    block = sch.get_sblock(name)
    loops = sch.get_loops(block)
    k_total = math.prod(const_extent(sch, loop) or 1 for loop in loops[spatial:])
    reduction = sch.fuse(*loops[spatial:]) if len(loops) - spatial > 1 else loops[spatial]
    width = lanes_dividing(k_total, lanes) if lanes else None
    if width is None:
        return
    # acc[width] op= x[k_o * width : +width] in a local vector (loops: unit..., k_o, lane),
    # then the lanes reduced into the block's scalar
    _, lane = sch.split(reduction, [None, width])
    rf = sch.rfactor(lane, factor_axis=0)
    sch.set_scope(rf, 0, "local")
    sch.vectorize(sch.get_loops(rf)[-1])
    init = sch.decompose_reduction(rf, sch.get_loops(rf)[-2])
    sch.vectorize(sch.get_loops(init)[-1])
