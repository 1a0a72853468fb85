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

from tvm import s_tir, tirx
from tvm.s_tir.dlight.cpu import Reduction as DlightCPUReduction

from kiln.backends.tvm.schedules.analysis import RuleContext, const_extent, normalize_prim_func

# Below this many output elements a kernel runs on one thread (the pool's wake-up costs more).
PARALLEL_MIN_ELEMENTS = 1 << 13


def _spatial_prefix(sch: s_tir.Schedule, block) -> list:
    """The block's outer loops that bind only spatial iters (stops at the first reduction)."""
    stmt = sch.get(block)
    loops = sch.get_loops(block)
    reduce_vars = {iv.var for iv in stmt.iter_vars if iv.iter_type != tirx.IterVar.DataPar}
    realize = sch.get_sref(block).stmt  # noqa: F841 - keep for debugging
    bindings = _bindings(sch, block)
    prefix = []
    for loop in loops:
        loop_var = sch.get(loop).loop_var
        uses_reduce = False
        for iv, value in zip(stmt.iter_vars, bindings, strict=True):
            if iv.var in reduce_vars and _uses_var(value, loop_var):
                uses_reduce = True
        if uses_reduce:
            break
        prefix.append(loop)
    return prefix


def _bindings(sch: s_tir.Schedule, block):
    parent = sch.get_sref(block).parent
    # SBlockRealize holds iter_values; find it by walking from the loop
    stmt = parent.stmt if parent is not None else None
    body = stmt.body if stmt is not None and hasattr(stmt, "body") else None
    target = sch.get(block)

    found = []

    def visit(node):
        if isinstance(node, s_tir.SBlockRealize) and node.block.same_as(target):
            found.append(node.iter_values)

    if body is not None:
        tirx.stmt_functor.post_order_visit(body, visit)
    if not found:
        tirx.stmt_functor.post_order_visit(sch.mod["main"].body, visit)
    return list(found[0])


def _uses_var(expr, var) -> bool:
    hit = []

    def visit(node):
        if isinstance(node, tirx.Var) and node.same_as(var):
            hit.append(True)

    tirx.stmt_functor.post_order_visit(expr, visit)
    return bool(hit)


def _numel(sch: s_tir.Schedule, loops) -> int:
    total = 1
    for loop in loops:
        extent = const_extent(sch, loop)
        total *= extent if extent is not None else 1 << 10
    return total


def parallel_vectorize(sch: s_tir.Schedule, block, lanes: int, *, spatial_only: bool = False) -> None:
    """Parallel over the fused outer loops, vectorize the innermost (when spatial and divisible)."""
    loops = sch.get_loops(block)
    if not loops:
        return
    prefix = _spatial_prefix(sch, block) if spatial_only else loops
    inner_is_spatial = len(prefix) == len(loops)
    vec = None
    if inner_is_spatial:
        inner = loops[-1]
        extent = const_extent(sch, inner)
        if extent is not None and extent >= lanes and extent % lanes == 0:
            if extent > lanes:
                _, vec = sch.split(inner, [None, lanes])
            else:
                vec = inner
            loops = sch.get_loops(block)
            prefix = loops[:-1] if vec.same_as(loops[-1]) else loops
            if vec is not None and extent == lanes:
                prefix = loops[:-1]
            elif vec is not None:
                prefix = loops[:-1]
    numel = _numel(sch, prefix)
    if prefix and numel * (lanes if vec is not None else 1) >= PARALLEL_MIN_ELEMENTS:
        outer = sch.fuse(*prefix) if len(prefix) > 1 else prefix[0]
        sch.parallel(outer)
    if vec is not None:
        sch.vectorize(vec)


def schedule_elementwise(func: tirx.PrimFunc, ctx: RuleContext) -> s_tir.Schedule | None:
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is None or not all(info.is_injective() for info in infos):
        return None
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


def schedule_reduction(func: tirx.PrimFunc, ctx: RuleContext) -> s_tir.Schedule | None:
    """Softmax / layer norm style kernels via dlight's CPU Reduction rule."""
    infos = normalize_prim_func(s_tir.Schedule(func))
    if infos is None or all(info.is_injective() for info in infos):
        return None
    scheduled = DlightCPUReduction().apply(func, ctx.target, False)
    if isinstance(scheduled, list):
        scheduled = scheduled[0] if scheduled else None
    return scheduled


def schedule_fallback(func: tirx.PrimFunc, ctx: RuleContext) -> s_tir.Schedule | None:
    sch = s_tir.Schedule(func)
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
