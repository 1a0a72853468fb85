"""kiln's MoE grouped GEMMs (``importer.moe_kernels``, blocks ``kiln_moe_up/glu/down``) on CPU.

The rows come in tiles of MR rows that all belong to one expert e_t (padded), so a
register tile is MR rows x NV vectors of one expert's weight columns::

    parallel for (j_o, t):                 # column tiles (NV vectors) x row tiles
      acc[MR, NV*16] = 0                   # registers
      for d in depth:
        w_v = w[e_t, d, j_o, v, 0:16]  for v in NV     # NV vector loads, once per tile
        for i in MR:
          a = xs[t, i, d]                  # one broadcast
          for v in NV: acc[i, v] += a * w_v
      h[t, :, j_o tile] = epilogue(acc)    # bias, activation, gate (inlined)

Each weight vector feeds MR FMAs (before the tiles were of one expert, each row loaded its
own expert's vectors). Column tiles are outermost, so a column tile of one expert's
weight stays in cache across that expert's consecutive row tiles. The tile count may be
symbolic (an expression of the token count); the row tile and the columns are static.
"""

from __future__ import annotations

from tvm import s_tir
from tvm.tirx import ForKind

from kiln.backends.tvm.kernel_names import MOE_COUNT, MOE_DOWN, MOE_FIRST, MOE_GLU, MOE_UP
from kiln.backends.tvm.schedules.analysis import const_extent
from kiln.backends.tvm.schedules.rule import KilnRule, RuleContext

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
        loops = sch.get_loops(block)
        if len(loops) != 4:
            return None
        tile, row, j, d = loops
        lanes = ctx.vector_lanes_f32
        width = const_extent(sch, j)
        if width is None or width % lanes or const_extent(sch, row) is None:
            return None
        vectors = max(v for v in range(1, VECTORS + 1) if (width // lanes) % v == 0)
        jo, jv, lane = sch.split(j, [None, vectors, lanes])
        sch.reorder(jo, tile, d, row, jv, lane)
        outer = sch.fuse(jo, tile)
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
        sch.unroll(row)
        sch.unroll(jv)
        # vectorized before the reduction is split off (the update block alone is neither a
        # complete nor a reduction block for TVM's dataflow check): explicit 16-lane vectors,
        # where LLVM's SLP pass would form only 8-lane ones from unrolled lanes
        sch.vectorize(lane)
        init = sch.decompose_reduction(block, d)
        init_lane = sch.get_loops(init)[-1]
        if sch.get(init_lane).kind != ForKind.VECTORIZED:
            sch.vectorize(init_lane)
        wo = sch.get_loops(write)
        sch.vectorize(sch.split(wo[-1], [None, lanes])[-1])
        return sch


class MoeSort(KilnRule):
    """The dispatch's per-expert kernels (``kiln_moe_count``: E sums over the T*k pairs;
    ``kiln_moe_first``: E x E): left serial, as they are, since a thread-pool launch
    costs more than their work (E = 8, 512 pairs: 4096 compares)."""

    name = "moe_sort"

    def schedule(self, sch: s_tir.Schedule, ctx: RuleContext) -> s_tir.Schedule | None:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        if len(blocks) != 1 or sch.get(blocks[0]).name_hint not in (MOE_COUNT, MOE_FIRST):
            return None
        return sch
