"""kiln's MoE grouped GEMMs (``importer.moe_kernels``, blocks ``kiln_moe_up/glu/down``) on CPU::

    parallel for (j_o, r_o):               # column tiles (NV vectors) x row tiles (MT rows)
      acc[MT, NV*16] = 0                   # registers
      for d in depth:
        for i in MT:                       # row r = r_o*MT + i, its token and expert
          a = xs[r, d]                     # one broadcast (the gathered rows)
          for v in NV: acc[i, v] += a * w[expert_r, d, j_o, v, 0:16]   # one vector load
      h[r_o*MT : +MT, j_o tile] = epilogue(acc)   # bias, activation, gate (inlined)

The rows are sorted by expert, so the rows of a tile mostly share one expert's weight
vectors (L1 hits) and a column tile of one expert's weight stays in cache across its row
tiles (column tiles outermost). The row count (T*k) may be symbolic: the row split is
guarded.
"""

from __future__ import annotations

from tvm import s_tir

from kiln.backends.tvm.kernel_names import MOE_DOWN, MOE_GLU, MOE_UP
from kiln.backends.tvm.schedules.analysis import const_extent
from kiln.backends.tvm.schedules.rule import KilnRule, RuleContext

#: Rows of a register tile.
ROW_TILE = 4
#: Vectors of columns of a register tile (ROW_TILE x VECTORS accumulators).
VECTORS = 4


def _find_block(sch: s_tir.Schedule):
    for name in (MOE_UP, MOE_GLU, MOE_DOWN):
        try:
            return sch.get_sblock(name)
        except Exception:  # noqa: BLE001 - not this kernel
            continue
    return None


class GroupedGemm(KilnRule):
    """The MoE grouped GEMMs: register tiles of sorted rows, vectors of their experts'
    weight columns, epilogues inlined into the write."""

    name = "grouped_gemm"

    def schedule(self, sch: s_tir.Schedule, ctx: RuleContext) -> s_tir.Schedule | None:
        block = _find_block(sch)
        if block is None:
            return None
        r, j, d = sch.get_loops(block)
        lanes = ctx.vector_lanes_f32
        width = const_extent(sch, j)
        if width is None or width % lanes:
            return None
        vectors = max(v for v in range(1, VECTORS + 1) if (width // lanes) % v == 0)
        rows = const_extent(sch, r)
        tile = ROW_TILE if rows is None else max(1, min(ROW_TILE, rows))
        ro, ri = sch.split(r, [None, tile])
        jo, jv, lane = sch.split(j, [None, vectors, lanes])
        sch.reorder(jo, ro, d, ri, jv, lane)
        outer = sch.fuse(jo, ro)
        sch.parallel(outer)
        write = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(write, outer)
        while True:
            consumers = sch.get_consumers(write)
            if len(consumers) != 1:
                break
            try:
                sch.reverse_compute_inline(consumers[0])
            except Exception:  # noqa: BLE001 - not inlinable: left as its own loop nest
                break
        init = sch.decompose_reduction(block, d)
        sch.vectorize(sch.get_loops(init)[-1])
        sch.unroll(ri)
        sch.unroll(jv)
        try:
            sch.vectorize(lane)
        except Exception:  # noqa: BLE001 - weight rows read through an index: no
            # "compact dataflow" for TVM's vectorize; LLVM's SLP pass vectorizes the lanes
            sch.unroll(lane)
        wo = sch.get_loops(write)
        sch.vectorize(sch.split(wo[-1], [None, lanes])[-1])
        return sch
