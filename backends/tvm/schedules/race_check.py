"""Data races in a scheduled kernel: a parallel loop whose iterations write the same element.

A rule that moves a producer under the consumer's parallel loop (``compute_at``: dlight's
CPU reduction rule, kiln's row reduction) recomputes in every iteration what that
iteration needs. When the producer works over another row space than the consumer (an
MoE dispatch's per-expert counts under a per-token loop) each iteration recomputes all of
it. That is wasted work; it is a race only if the buffer is shared by the iterations (a
kernel output, or read outside the loop too). TVM's lowering allocates a buffer at the
common ancestor of its accesses, so one touched only inside the loop is per iteration:
53c3d40's MoE count/rank and rows kernels (the case 157bf45 split) lower that way, so
this check finds no race in them.

The check lowers the kernel as the build does up to loop form (init blocks, allocations
placed, blocks removed), then for each parallel loop looks at every store into a buffer
not allocated inside the loop. The store is safe when its indices are an injective
affine map of the parallel variable and the inner loops they read (``detect_iter_map``,
bijective: tiled kernels), or when its element as one row-major offset separates
consecutive iterations (the offsets at iteration p + 1 all lie past those at p, or all
before). Any other store is reported (conservative: an index read from memory, a
scatter, is reported too); a store whose indices do not read the parallel variable
always races.
"""

from __future__ import annotations

import logging

import tvm
from tvm import s_tir, tirx
from tvm import sym as arith

log = logging.getLogger(__name__)

#: the passes of the build's TIR lowering that place allocations and remove blocks
_TO_LOOPS = (
    s_tir.transform.LowerInitBlock,
    s_tir.transform.PlanAndUpdateBufferAllocationLocation,
    s_tir.transform.ConvertBlocksToOpaque,
    s_tir.transform.CompactBufferAllocation,
    s_tir.transform.LowerMatchBuffer,   # a tensor intrinsic's buffer views: their target
    s_tir.transform.LowerOpaqueBlock,
)


def _uses(expr, var: tirx.Var) -> bool:
    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(expr))


def _flat_offset(analyzer: arith.Analyzer, store: tirx.BufferStore):
    """The element ``store`` writes as one row-major offset (fused loops split by // and %
    recombine: ``(p // n) * n + p % n`` simplifies to ``p``)."""
    offset, stride = 0, 1
    for index, extent in reversed(list(zip(store.indices, store.buffer.shape, strict=True))):
        offset = offset + index * stride
        stride = stride * extent
    return analyzer.simplify(offset)


def _injective(store: tirx.BufferStore, var: tirx.Var, loop: tirx.For, ranges: dict,
               predicate=True) -> bool:
    """Whether the indices of ``store`` are an injective affine map of the parallel
    variable and the inner loops they read (a tiled kernel: ``p // J`` and ``p % J`` pick
    the row and column tiles), so different iterations never write one element.
    ``predicate``: the conditions the store runs under (a guarded tile's ``row < M``: the
    map is then bijective onto the rows that exist, not onto the padded tiles)."""
    used = {v: r for v, r in ranges.items() if any(_uses(i, v) for i in store.indices)}
    if not any(_uses(i, var) for i in store.indices):
        return False
    iters = {var: tvm.ir.Range.from_min_extent(loop.min, loop.extent), **used}
    found = arith.detect_iter_map(list(store.indices), iters, predicate,
                                  check_level="bijective")
    return len(found.indices) > 0


def _guarded_stores(stmt, conditions=()) -> list[tuple[tirx.BufferStore, tuple]]:
    """Every store under ``stmt`` with the ``if`` conditions it runs under."""
    found = []

    def visit(node, conds) -> None:
        if isinstance(node, tirx.BufferStore):
            found.append((node, conds))
        if isinstance(node, tirx.IfThenElse):
            visit(node.then_case, (*conds, node.condition))
            if node.else_case is not None:
                visit(node.else_case, (*conds, tirx.Not(node.condition)))
            return
        for name in ("body", "block"):
            child = getattr(node, name, None)
            if isinstance(child, tirx.Stmt):
                visit(child, conds)
        for child in getattr(node, "seq", None) or ():
            visit(child, conds)

    visit(stmt, tuple(conditions))
    return found


def _conjunction(conditions: tuple):
    out = conditions[0]
    for condition in conditions[1:]:
        out = tirx.And(out, condition)
    return out


def _walk(stmt, visit) -> None:
    """Every statement under ``stmt`` (pre-order), ``visit`` on each."""
    visit(stmt)
    for name in ("body", "then_case", "else_case", "block"):
        child = getattr(stmt, name, None)
        if isinstance(child, tirx.Stmt):
            _walk(child, visit)
    for child in getattr(stmt, "seq", None) or ():
        _walk(child, visit)


def _separated(analyzer: arith.Analyzer, index, var: tirx.Var, dom: dict,
               at: tirx.Var) -> bool:
    """Whether the range of ``index`` over ``dom`` at ``var = at + 1`` lies past (or before)
    its range at ``var = at``."""
    now = analyzer.int_set(index, {**dom, var: arith.IntervalSet(at, at)})
    nxt = analyzer.int_set(index, {**dom, var: arith.IntervalSet(at + 1, at + 1)})
    bounds = (now.min_value, now.max_value, nxt.min_value, nxt.max_value)
    if any("inf" in str(v) for v in bounds):
        return False  # unbounded (an index read from memory)
    lo_now, hi_now, lo_next, hi_next = bounds
    return bool(analyzer.can_prove(lo_next > hi_now) or analyzer.can_prove(hi_next < lo_now))


def _loop_races(loop: tirx.For) -> list[str]:
    """Buffers two iterations of the parallel ``loop`` may both write."""
    if not (isinstance(loop.extent, tirx.IntImm) and isinstance(loop.min, tirx.IntImm)) \
            or int(loop.extent) < 2:
        return []  # a symbolic extent is not checked
    private: list = []
    dom: dict = {}
    ranges: dict = {}

    def visit(node) -> None:
        if isinstance(node, (tirx.AllocBuffer, tirx.DeclBuffer)):
            private.append(node.buffer)
        elif isinstance(node, tirx.For):
            dom[node.loop_var] = arith.IntervalSet(node.min, node.min + node.extent - 1)
            ranges[node.loop_var] = tvm.ir.Range.from_min_extent(node.min, node.extent)

    _walk(loop.body, visit)
    var = loop.loop_var
    at = tirx.Var(f"{var.name}_at", var.ty)
    analyzer = arith.Analyzer()
    analyzer.bind(at, tvm.ir.Range.from_min_extent(loop.min, int(loop.extent) - 1))
    races: list[str] = []
    for store, conditions in _guarded_stores(loop.body):
        if any(store.buffer.same_as(p) for p in private):
            continue
        if _injective(store, var, loop, ranges):
            continue
        if conditions and _injective(store, var, loop, ranges, _conjunction(conditions)):
            continue
        offset = _flat_offset(analyzer, store)
        if _uses(offset, var) and _separated(analyzer, offset, var, dom, at):
            continue
        if str(store.buffer.name) not in races:
            races.append(str(store.buffer.name))
    return races


def racing_buffers(func: tirx.PrimFunc) -> list[str]:
    """Buffers of scheduled ``func`` that two iterations of one parallel loop may both write."""
    mod = tvm.transform.Sequential([p() for p in _TO_LOOPS])(tvm.IRModule({"main": func}))
    loops: list[tirx.For] = []
    _walk(mod["main"].body, lambda n: loops.append(n) if isinstance(n, tirx.For)
          and n.kind == tirx.ForKind.PARALLEL else None)
    races: list[str] = []
    for loop in loops:
        races += [b for b in _loop_races(loop) if b not in races]
    return races


def racing_kernels(mod: tvm.IRModule) -> dict[str, list[str]]:
    """Per scheduled PrimFunc of ``mod`` with a race: the buffers raced on."""
    found = {}
    for gvar, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc):
            try:
                races = racing_buffers(func)
            except Exception as err:  # noqa: BLE001 - a report must never fail a build
                log.debug("race check skipped %s: %s", gvar.name_hint, err)
                continue
            if races:
                found[gvar.name_hint] = races
    return found
