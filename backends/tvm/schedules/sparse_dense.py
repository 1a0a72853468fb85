"""kiln's sparse kernel (``importer.sparse_kernel``, block ``kiln_sparse_dense``) on CPU::

    parallel for (m_o, g):                 # row tiles of x x groups of 16 outputs
      acc[MT, 16] = 0                      # registers
      for j in stored columns of group g:
        v = values[g, j, 0:16]             # one vector load
        for i in MT: acc[i, :] += x[m_o*MT + i, column(g, j, :)] * v   # broadcast or gather
      y[m_o*MT : +MT, g*16 : +16] = epilogue(acc)    # bias, a fused ReLU ...

Each stored weight is read once per row tile, one FMA per 16 of them; the epilogue
blocks (the bias, and what FuseOps fused after the kernel) are inlined into the write.
"""

from __future__ import annotations

from tvm import s_tir

from kiln.backends.tvm.kernel_names import SPARSE_DENSE
from kiln.backends.tvm.schedules.analysis import const_extent
from kiln.backends.tvm.schedules.rule import KilnRule, RuleContext

#: Most rows of x whose accumulators stay in registers (MT x 16 lanes).
MAX_ROW_TILE = 8
#: Outputs per group: must match importer.sparse_weights.GROUP (the packed lane axis).
LANES = 16


def _row_tile(rows: int) -> int:
    return max(d for d in range(1, min(rows, MAX_ROW_TILE) + 1) if rows % d == 0)


class SparseDense(KilnRule):
    """The sparse kernel: parallel over groups, 16 lanes one vector, register accumulators."""

    name = "sparse_dense"

    def schedule(self, sch: s_tir.Schedule, ctx: RuleContext) -> s_tir.Schedule | None:
        del ctx
        try:
            block = sch.get_sblock(SPARSE_DENSE)
        except Exception:  # noqa: BLE001 - not this rule's kernel
            return None
        m, o, j = sch.get_loops(block)
        rows = const_extent(sch, m)
        if rows is None:
            return None
        g, lane = sch.split(o, [None, LANES])
        mo, mi = sch.split(m, [None, _row_tile(rows)])
        sch.reorder(mo, g, j, mi, lane)
        outer = sch.fuse(mo, g)
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
        init = sch.decompose_reduction(block, j)
        sch.vectorize(sch.get_loops(init)[-1])
        sch.unroll(mi)
        # TVM refuses ``vectorize`` on a reduction reading x through an index buffer (no
        # "compact dataflow"); the unrolled 16 lanes become one vector in LLVM's SLP pass
        sch.unroll(lane)
        sch.vectorize(sch.get_loops(write)[-1])
        return sch
