"""Per-row tables with more than one output: a Resize's runtime tap tables (``kiln_resize_taps``:
the source index of each tap, and the tap weights normalized by their sum per output
position, for antialias / exclude_outside Resize whose scales come at run time).

Every block is indexed first by the same row (the output position ``j``), then by at most
one inner axis (the tap); the blocks are element-wise or one reduction over the inner axis
(the weights' sum). The row rules take such kernels when they have one output; here the
index table is a second output that no other block reads, and TVM's default left the whole
kernel as one serial loop nest per block (each table written and read back whole). Here:

- the blocks the last output needs (raw weights, their sum, the normalized weights) are
  computed under its row loop: one row's taps are made, summed and normalized while
  they are in registers / L1;
- an output no other block reads (the index table) keeps its own loop nest;
- the row loops run in parallel when the tables are large enough.
"""

from __future__ import annotations

from tvm import s_tir

from kiln.backends.tvm.schedules.analysis import const_extent, normalize_prim_func
from kiln.backends.tvm.schedules.elementwise import PARALLEL_MIN_ELEMENTS
from kiln.backends.tvm.schedules.rule import KilnRule, RuleContext


class RowTables(KilnRule):
    """Per-row tables, one of them summed per row, and a side output (see module doc)."""

    name = "row_tables"

    def schedule(self, sch: s_tir.Schedule, ctx: RuleContext) -> s_tir.Schedule | None:
        return schedule_row_tables(sch, ctx)


def _producers(sch: s_tir.Schedule, block) -> set[str]:
    """Names of every block ``block`` reads from, directly or not."""
    found: set[str] = set()
    todo = [block]
    while todo:
        for producer in sch.get_producers(todo.pop()):
            name = sch.get(producer).name_hint
            if name not in found:
                found.add(name)
                todo.append(producer)
    return found


def schedule_row_tables(sch: s_tir.Schedule, ctx: RuleContext) -> s_tir.Schedule | None:
    """``sch`` scheduled when it is per-row tables (every block ``S`` / ``SS`` / ``SR`` over
    the same constant rows, at least one reduction, a block the last one does not need
    among them); None otherwise."""
    infos = normalize_prim_func(sch)
    if infos is None or len(infos) < 3 or not infos[-1].is_injective():
        return None
    kinds = [info.dom_kind() for info in infos]
    if any(kind not in ("S", "SS", "SR") for kind in kinds) or "SR" not in kinds:
        return None
    rows = None
    for info in infos:
        extents = [const_extent(sch, loop) for loop in sch.get_loops(info.block_rv)]
        if len(extents) != len(info.dom_kind()) or any(e is None for e in extents):
            return None
        if rows is None:
            rows = extents[0]
        if extents[0] != rows:
            return None
    last = infos[-1]
    needed = _producers(sch, last.block_rv)
    side = [info for info in infos[:-1] if info.name not in needed]
    if not side or any(not info.is_injective() or _producers(sch, info.block_rv) & needed
                       for info in side):
        return None  # a side output sharing work with the last one: not this shape
    work = sum(rows * (const_extent(sch, sch.get_loops(info.block_rv)[-1]) or 1)
               for info in infos)
    parallel = work >= PARALLEL_MIN_ELEMENTS and rows > 1
    row = sch.get_loops(sch.get_sblock(last.name))[0]
    for info in reversed(infos[:-1]):
        if info.name in needed:
            sch.compute_at(sch.get_sblock(info.name), row, preserve_unit_loops=True)
    if parallel:
        sch.parallel(row)
        for info in side:
            sch.parallel(sch.get_loops(sch.get_sblock(info.name))[0])
    return sch
