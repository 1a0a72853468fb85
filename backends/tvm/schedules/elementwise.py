"""Elementwise, reduction (softmax, layer norm, pooling) and fallback schedules on CPU.

- elementwise: every block injective -> inline into the last block, parallel over the
  outer loops, vectorize the innermost when it is contiguous and a multiple of the lanes;
- reduction: dlight's CPU ``Reduction`` rule (softmax / layer norm: parallel rows,
  compute_at, vectorized injective parts), else parallel spatial loops around the
  reduction with the inner loop unrolled;
- fallback: any other kernel gets its outer spatial loops parallel (reported as such:
  ``unscheduled_kernels`` names these too).
"""

from __future__ import annotations

import math

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.cpu import Reduction as DlightCPUReduction

from kiln.backends.tvm.schedules.analysis import const_extent, normalize_prim_func
from kiln.backends.tvm.schedules.rule import KilnRule, RuleContext

# Below this many output elements a kernel runs on one thread (the pool's wake-up costs more).
PARALLEL_MIN_ELEMENTS = 1 << 13


def _spatial_prefix(sch: s_tir.Schedule, block) -> list:
    """The block's outer loops over spatial iters, up to the first reduction.

    Valid on a normalized function (one loop per block iter, in iter order).
    """
    stmt = sch.get(block)
    loops = sch.get_loops(block)
    if len(loops) != len(stmt.iter_vars):
        return []
    prefix = []
    for loop, iv in zip(loops, stmt.iter_vars, strict=True):
        if iv.iter_type != tirx.IterVar.DataPar:
            break
        prefix.append(loop)
    return prefix


def _numel(sch: s_tir.Schedule, loops) -> int:
    total = 1
    for loop in loops:
        extent = const_extent(sch, loop)
        total *= extent if extent is not None else 1 << 10
    return total


_SCALAR_FIELDS = ("a", "b", "condition", "true_value", "false_value", "value", "base", "body")


def _expressions(node):
    """``node`` and every expression and statement under it (pre-order)."""
    todo = [node]
    while todo:
        item = todo.pop()
        yield item
        for field in _SCALAR_FIELDS:
            child = getattr(item, field, None)
            if isinstance(child, (tvm.ir.Expr, tirx.Stmt)):
                todo.append(child)
        for field in ("args", "indices", "seq"):
            todo.extend(c for c in getattr(item, field, ()) or ()
                        if isinstance(c, (tvm.ir.Expr, tirx.Stmt)))


def wrap_free_lanes(sch: s_tir.Schedule, block, lanes: int) -> int:
    """The lanes to vectorize ``block``'s innermost loop by so that no ``floormod`` /
    ``floordiv`` of its index by a constant wraps inside one vector (lanes dividing every
    such divisor), in kernels that select between gathers (concatenations). TVM 0.27's
    LLVM vectorization of such a select indexed by ``i % 8`` at 16 lanes gave garbage (ONNX
    RotaryEmbedding on a 3-D input, 4 heads of 8); at 8 lanes it is right; plain
    reshapes over ``i % d`` vectorize right. Under 4 lanes means: do not vectorize."""
    stmt = sch.get(block)
    if not stmt.iter_vars:
        return lanes
    var = stmt.iter_vars[-1].var
    divisors: list[int] = []
    selects = 0
    for node in _expressions(stmt.body):
        if isinstance(node, tirx.Select) or (isinstance(node, tvm.ir.Call) and getattr(
                node.op, "name", "").endswith("if_then_else")):
            selects += 1
        if isinstance(node, (tirx.FloorMod, tirx.FloorDiv, tirx.Mod, tirx.Div)) and \
                isinstance(node.b, tirx.IntImm) and node.b.value > 0 and \
                any(v.same_as(var) for v in tirx.analysis.undefined_vars(node.a)):
            divisors.append(int(node.b.value))
    if not selects:  # plain reshapes / transposes over i % d vectorize right
        return lanes
    for d in divisors:
        lanes = math.gcd(lanes, d)
    return lanes


def parallel_vectorize(sch: s_tir.Schedule, block, lanes: int, *, spatial_only: bool = False) -> None:
    """Parallel over the fused outer loops; the innermost loop stays serial, vectorized when
    it is spatial and a multiple of the lanes (a tail would scalarize it), by fewer lanes
    when an index wraps (:func:`wrap_free_lanes`)."""
    loops = sch.get_loops(block)
    if not loops:
        return
    prefix = _spatial_prefix(sch, block) if spatial_only else loops
    if not prefix:
        return
    vec = None
    if len(prefix) == len(loops):
        lanes = wrap_free_lanes(sch, block, lanes)
        if lanes < 4:
            lanes = 1 << 30  # scalar: no vector is wrap free
        inner = loops[-1]
        extent = const_extent(sch, inner)
        if extent is not None and extent >= lanes and extent % lanes == 0:
            if extent > lanes:
                _, vec = sch.split(inner, [None, lanes])
            else:
                vec = inner
            loops = sch.get_loops(block)
            prefix = loops[:-1]
        elif len(loops) > 1:
            prefix = loops[:-1]
    numel = _numel(sch, loops)
    if prefix and numel >= PARALLEL_MIN_ELEMENTS:
        outer = sch.fuse(*prefix) if len(prefix) > 1 else prefix[0]
        sch.parallel(outer)
    if vec is not None:
        sch.vectorize(vec)


def _opaque(block) -> bool:
    """A block of IR-builder code: no iteration variables, no declared reads or writes."""
    return not block.iter_vars and not block.reads and not block.writes


class Elementwise(KilnRule):
    """All-injective kernels: inlined into the last block, parallel, vectorized rows."""

    name = "elementwise"

    def schedule(self, sch: s_tir.Schedule, ctx: RuleContext) -> s_tir.Schedule | None:
        return _schedule_elementwise(sch, ctx)


def _schedule_elementwise(sch: s_tir.Schedule, ctx: RuleContext) -> s_tir.Schedule | None:
    infos = normalize_prim_func(sch)
    if infos is None or not all(info.is_injective() for info in infos):
        return None
    if any(_opaque(sch.get(info.block_rv)) for info in infos):
        return None  # IR-builder code (TOPI's NMS, sort) reads buffers we would inline
    # inline everything that can be inlined, producers first
    changed = True
    while changed:
        changed = False
        infos = normalize_prim_func(sch)
        for info in infos[:-1]:
            try:
                sch.compute_inline(info.block_rv)
            except Exception:  # noqa: BLE001
                try:
                    sch.reverse_compute_inline(info.block_rv)
                except Exception:  # noqa: BLE001
                    continue
            changed = True
            break
    for info in normalize_prim_func(sch):
        parallel_vectorize(sch, info.block_rv, ctx.vector_lanes_f32)
    return sch


class Reduction(KilnRule):
    """Softmax / layer norm style kernels: kiln's vectorized row reduction when the kernel
    has that shape, else dlight's CPU Reduction rule (scalar reductions)."""

    name = "reduction"

    def schedule(self, sch: s_tir.Schedule, ctx: RuleContext) -> s_tir.Schedule | None:
        return _schedule_reduction(sch.mod["main"], ctx)


def _schedule_reduction(func: tirx.PrimFunc, ctx: RuleContext) -> s_tir.Schedule | None:
    try:
        scheduled = schedule_row_reduction(func, ctx)
    except Exception:  # noqa: BLE001 - a shape the row rule did not foresee: dlight's rule
        scheduled = None
    if scheduled is not None:
        return scheduled
    infos = normalize_prim_func(s_tir.Schedule(func))
    if infos is None or all(info.is_injective() for info in infos):
        return None
    scheduled = DlightCPUReduction().apply(func, ctx.target, False)
    if isinstance(scheduled, list):
        scheduled = scheduled[0] if scheduled else None
    if scheduled is None:
        return None
    return scheduled


def schedule_row_reduction(func: tirx.PrimFunc, ctx: RuleContext) -> s_tir.Schedule | None:
    """Softmax / layer norm: rows in parallel, each row's reductions as vector partial sums.

    Every block is ``S^n`` (injective) or ``S^n R`` (a reduction over the innermost axis),
    the same ``n`` rows. Each reduction over K (a multiple of the lanes) is ``rfactor``-ed
    into ``acc[lanes] += x[k_o * lanes : (k_o + 1) * lanes]`` (vector adds/max in
    registers) plus a sum of the lanes; all blocks are computed per row under one
    parallel row loop; the injective blocks are vectorized along the row. A symbolic
    row's reductions come from ``fast_math`` as lane partials over the row's full
    vectors (``S^rows S R`` blocks), vectorized here, plus a serial tail.
    """
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is None or len(infos) < 2 or not infos[-1].is_injective():
        return None
    kinds = [info.dom_kind() for info in infos]
    rows = len(kinds[-1]) - 1
    if not any(k.endswith("R") for k in kinds):
        return None
    lanes = ctx.vector_lanes_f32
    if rows < 1:
        return _schedule_single_row(sch, infos, kinds, lanes)
    widths: dict[str, int | None] = {}  # per reduction: vector width, None for serial
    partials = _lane_partials(sch, infos, kinds, rows)
    for info, kind in zip(infos, kinds, strict=True):
        if info.name in partials:
            continue
        if kind not in ("S" * rows, "S" * (rows + 1), "S" * rows + "R"):
            return None
        if kind.endswith("R") and _reads_any(sch, info, partials.values()):
            widths[info.name] = None  # the sum / max of a few lane partials
        elif kind.endswith("R"):
            extent = const_extent(sch, sch.get_loops(info.block_rv)[-1])
            # no vector width divides the row (PP-OCR rec's 6625 classes), or the row is
            # symbolic (attention's softmax over a sequence): a serial reduction per row,
            # still one pass per row under the parallel row loop
            widths[info.name] = None if extent is None else _row_lanes(extent, lanes)
    rf_blocks = []
    for info, kind in zip(infos, kinds, strict=True):
        if kind.endswith("R") and widths.get(info.name) is not None:
            k_o, k_i = sch.split(sch.get_loops(info.block_rv)[-1], [None, widths[info.name]])
            rf = sch.rfactor(k_i, factor_axis=0)
            sch.set_scope(rf, 0, "local")
            rf_blocks.append(rf)
    last = infos[-1].block_rv
    loops = sch.get_loops(last)
    if partials:
        par, row = _symbolic_row_loops(sch, loops[:rows])
    else:
        par = row = sch.fuse(*loops[:rows]) if rows > 1 else loops[0]
    if _numel(sch, sch.get_loops(last)) >= PARALLEL_MIN_ELEMENTS:
        sch.parallel(par)
    inner = sch.get_loops(last)[-1]
    width = _row_lanes(const_extent(sch, inner), lanes)
    if width is not None:
        _, vec = sch.split(inner, [None, width])
        sch.vectorize(vec)
    for block in reversed(sch.get_child_blocks(sch.get_sblock("root"))[:-1]):
        sch.compute_at(block, row, preserve_unit_loops=True)
    for name in partials:
        # fast_math's partial[.., lane] = op_j x[.., j * lanes + lane] over the full
        # vectors of a symbolic row: under the row loop (lane, j) -> (j, lane), vectorized
        block = sch.get_sblock(name)
        sch.set_scope(block, 0, "local")
        lane, j = sch.get_loops(block)[-2:]
        sch.reorder(j, lane)
        sch.vectorize(lane)
        init = sch.decompose_reduction(block, j)
        sch.vectorize(sch.get_loops(init)[-1])
    for rf in rf_blocks:
        # under the row loop: (lane, unit rows..., k_o): make the lane innermost
        lane, *rest = sch.get_loops(rf)[1:]
        sch.reorder(*rest, lane)
        sch.vectorize(lane)
        init = sch.decompose_reduction(rf, sch.get_loops(rf)[-2])
        sch.vectorize(sch.get_loops(init)[-1])
    for info, kind in zip(infos[:-1], kinds[:-1], strict=True):
        if kind == "S" * (rows + 1):
            block_loops = sch.get_loops(sch.get_sblock(info.name))
            width = _row_lanes(const_extent(sch, block_loops[-1]), lanes)
            if width is not None:
                _, vec = sch.split(block_loops[-1], [None, width])
                sch.vectorize(vec)
    return sch


def _symbolic_row_loops(sch: s_tir.Schedule, loops):
    """(parallel loop, innermost row loop) over rows some of which are symbolic. A row
    index fused with a symbolic loop (divided by S) would keep TVM from vectorizing the
    lane partials: only the constant outer rows fuse; when they are one row, the first
    symbolic row loop runs in parallel."""
    n = 0
    while n < len(loops) and const_extent(sch, loops[n]) is not None:
        n += 1
    if n < len(loops) and math.prod(const_extent(sch, loop) for loop in loops[:n]) < 2:
        return loops[n], loops[-1]
    par = sch.fuse(*loops[:n]) if n > 1 else loops[0]
    return par, (loops[-1] if n < len(loops) else par)


def _lane_partials(sch: s_tir.Schedule, infos, kinds, rows: int) -> dict:
    """Blocks ``S^rows S R`` whose spatial innermost axis has a constant extent and whose
    reduction is symbolic (``fast_math``'s lane partials of a symbolic row): name -> the
    buffer each writes."""
    found = {}
    for info, kind in zip(infos, kinds, strict=True):
        if kind != "S" * (rows + 1) + "R":
            continue
        loops = sch.get_loops(info.block_rv)
        if const_extent(sch, loops[-2]) is None or const_extent(sch, loops[-1]) is not None:
            return {}
        found[info.name] = sch.get(info.block_rv).writes[0].source
    return found


def _reads_any(sch: s_tir.Schedule, info, buffers) -> bool:
    reads = {region.source.name for region in sch.get(info.block_rv).reads}
    return any(buffer.name in reads for buffer in buffers)


def _row_lanes(extent: int | None, lanes: int) -> int | None:
    """The widest vector (down to 4 lanes) that divides a row of ``extent``, twice over."""
    while extent is not None and lanes >= 4:
        if extent % lanes == 0 and extent >= 2 * lanes:
            return lanes
        lanes //= 2
    return None


def _schedule_single_row(sch: s_tir.Schedule, infos, kinds, lanes: int) -> s_tir.Schedule | None:
    """A layer norm / softmax over one row (a decode step's ``[1, 1, d]``, a classifier's
    ``[1, 1000]``): every reduction as lane-wise partial sums (serial where no vector
    width divides the row), the element-wise blocks vectorized, one thread (a row of a
    few thousand floats is microseconds of work). Each block stays its own loop nest:
    nothing is recomputed per element."""
    if any(kind not in ("", "S", "R", "SR") for kind in kinds):
        return None
    for info, kind in zip(infos, kinds, strict=True):
        loops = sch.get_loops(sch.get_sblock(info.name))
        width = _row_lanes(const_extent(sch, loops[-1]), lanes) if loops else None
        if width is None:
            continue
        if kind.endswith("R"):
            # acc[width] += x[k_o * width : +width] in a local vector, then a sum of the lanes
            _, k_i = sch.split(loops[-1], [None, width])
            rf = sch.rfactor(k_i, factor_axis=0)
            sch.set_scope(rf, 0, "local")
            sch.vectorize(sch.get_loops(rf)[-1])
            init = sch.decompose_reduction(rf, sch.get_loops(rf)[-2])
            sch.vectorize(sch.get_loops(init)[-1])
        elif kind == "S":
            _, vec = sch.split(loops[-1], [None, width])
            sch.vectorize(vec)
    return sch


class Fallback(KilnRule):
    """Any other kernel: its outer spatial loops parallel (``unscheduled_kernels`` names
    the kernels that got only this)."""

    name = "fallback"

    def schedule(self, sch: s_tir.Schedule, ctx: RuleContext) -> s_tir.Schedule | None:
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        for info in infos:
            if info.is_injective():
                parallel_vectorize(sch, info.block_rv, ctx.vector_lanes_f32)
            else:
                prefix = _spatial_prefix(sch, info.block_rv)
                if prefix and _numel(sch, prefix) >= 16:
                    outer = sch.fuse(*prefix) if len(prefix) > 1 else prefix[0]
                    sch.parallel(outer)
        return sch
