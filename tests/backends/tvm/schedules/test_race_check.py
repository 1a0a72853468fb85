"""race_check: stores that two iterations of a parallel loop may both make are found (one
shared element, overlapping halos), disjoint tiles, writes through a row's view and
per-row reductions are not, and a
producer recomputed inside the loop into a buffer allocated there is private."""

from __future__ import annotations

import tvm
from tvm import te, tirx
from tvm.s_tir.dlight.cpu import Reduction as DlightCPUReduction
from tvm.script import tirx as T

from kiln.backends.tvm.schedules.race_check import racing_buffers, racing_kernels

TARGET = {"kind": "llvm"}   # the rules and the check need no particular CPU


# every iteration writes all of y: the threads race on it
@T.prim_func(s_tir=True)
def _shared(x: T.Buffer((64,), "float32"), y: T.Buffer((4,), "float32")):
    for p in T.parallel(64):
        for j in range(4):
            with T.sblock("w"):
                vp, vj = T.axis.remap("SS", [p, j])
                y[vj] = x[vp]


# iteration p writes y[p] and y[p + 1]: neighbours overlap
@T.prim_func(s_tir=True)
def _halo(x: T.Buffer((64,), "float32"), y: T.Buffer((65,), "float32")):
    for p in T.parallel(64):
        for j in range(2):
            with T.sblock("w"):
                vp, vj = T.axis.remap("SS", [p, j])
                y[vp + vj] = x[vp]


# a fused (row tile, column tile) loop as the dense rule writes it: disjoint 8x16 tiles
@T.prim_func(s_tir=True)
def _tiles(x: T.Buffer((64, 64), "float32"), y: T.Buffer((64, 64), "float32")):
    for p in T.parallel(32):
        for i, j in T.grid(8, 16):
            with T.sblock("w"):
                vi = T.axis.spatial(64, p % 8 * 8 + i)
                vj = T.axis.spatial(64, p // 8 * 16 + j)
                y[vi, vj] = x[vi, vj]


# a block writing through a view of the row it owns (a tensor intrinsic's match_buffer,
# as in the int8 dense kernels): the view's indices are relative, its target's are not
@T.prim_func(s_tir=True)
def _view(x: T.Buffer((64, 16), "float32"), y: T.Buffer((64, 16), "float32")):
    acc = T.alloc_buffer((64, 16))
    for p in T.parallel(64):
        with T.sblock("copy"):
            vp = T.axis.spatial(64, p)
            T.reads(x[vp, 0:16])
            T.writes(acc[vp, 0:16])
            v = T.match_buffer(acc[vp, 0:16], (16,), offset_factor=1)
            for j in range(16):
                v[j] = x[vp, j]
        for j in range(16):
            with T.sblock("out"):
                vp2, vj = T.axis.remap("SS", [p, j])
                y[vp2, vj] = acc[vp2, vj] * T.float32(2)


# the dense rule's guarded row tiles (AVX2, 49 rows of a 7x7 image in tiles of 5): the
# last tile's rows past 48 are skipped by the predicate; the image is stored as [7, 7, C]
@T.prim_func(s_tir=True)
def _guarded_tiles(x: T.Buffer((49, 32), "float32"), y: T.Buffer((7, 7, 32), "float32")):
    for p in T.parallel(20):
        for i, j in T.grid(5, 16):
            with T.sblock("w"):
                T.where(p % 10 * 5 + i < 49)
                vi = T.axis.spatial(49, p % 10 * 5 + i)
                vj = T.axis.spatial(32, p // 10 * 16 + j)
                y[vi // 7, vi % 7, vj] = x[vi, vj]


# the same guard over tiles that overlap (a row tile of 5 every 4 rows): a race
@T.prim_func(s_tir=True)
def _guarded_overlap(x: T.Buffer((49, 32), "float32"), y: T.Buffer((7, 7, 32), "float32")):
    for p in T.parallel(26):
        for i, j in T.grid(5, 16):
            with T.sblock("w"):
                T.where(p % 13 * 4 + i < 49)
                vi = T.axis.spatial(49, p % 13 * 4 + i)
                vj = T.axis.spatial(32, p // 13 * 16 + j)
                y[vi // 7, vi % 7, vj] = x[vi, vj]


def test_guarded_tiles_are_checked_under_their_predicate():
    assert racing_buffers(_guarded_tiles) == []
    assert racing_buffers(_guarded_overlap) == ["y"]


def test_shared_and_overlapping_stores_race():
    assert racing_buffers(_shared) == ["y"]
    assert racing_buffers(_halo) == ["y"]


def test_disjoint_tiles_do_not_race():
    assert racing_buffers(_tiles) == []
    assert racing_buffers(_view) == []


def _dlight(*tensors) -> tirx.PrimFunc:
    target = tvm.target.Target(TARGET)
    with target:
        sch = DlightCPUReduction().apply(te.create_prim_func(list(tensors)), target, False)
    return sch.mod["main"]


def test_dlight_row_reduction_and_recomputed_producer():
    """dlight's rule on a row max (per row: no race) and on counts over all tokens read per
    token (the counts are recomputed in every iteration, into a buffer the lowering
    allocates inside the parallel loop: wasted work, not a race)."""
    x = te.placeholder((64, 32), "float32", name="x")
    j = te.reduce_axis((0, 32), name="j")
    m = te.compute((64,), lambda t: te.max(x[t, j], axis=j), name="m")
    y = te.compute((64, 32), lambda t, c: x[t, c] - m[t], name="y")
    assert racing_buffers(_dlight(x, y)) == []
    expert = te.placeholder((64,), "int32", name="expert")
    k = te.reduce_axis((0, 64), name="k")
    count = te.compute((8,), lambda e: te.sum(tirx.Select(expert[k] == e, 1, 0), axis=k),
                       name="count")
    out = te.compute((64,), lambda t: count[expert[t]] * 2, name="out")
    assert racing_buffers(_dlight(expert, out)) == []


def test_racing_kernels_names_each_kernel():
    mod = tvm.IRModule({"shared": _shared.with_attr("global_symbol", "shared"),
                        "tiles": _tiles.with_attr("global_symbol", "tiles")})
    assert racing_kernels(mod) == {"shared": ["y"]}
