"""Dense / matmul / batch-matmul on CPU: a register-tiled micro-kernel with packed weights.

The block ``C[b, i, j] += A[b, i, k] * B[b, k, j]`` (any number of row dims ``i``, one
column dim ``j``, one reduction ``k``) is tiled as::

    parallel for (b, j_o, i_o):            # j_o: N / NR panels, i_o: M / MR rows
      acc[MR, NR] = 0                      # a "local" buffer LLVM keeps in registers
      for k:                               # unrolled by KU
        for i in MR (unrolled):
          for j in NR / lanes (unrolled):
            acc[i, j:j+lanes] += A[i, k] * Bp[j_o, k, j:j+lanes]   # broadcast + vector FMA
      C[tile] = epilogue(acc)              # bias / activation / residual fused here

``Bp[N / NR, K, NR]`` is B packed so that the micro-kernel reads it contiguously.  When B
is a constant (a weight), the packing block is marked as a layout-rewrite preprocess
(``meta_schedule.layout_rewrite_preproc``); ``SplitLayoutRewritePreproc`` then moves it
into its own PrimFunc and ``FoldConstant`` runs it at compile time, so the shipped module
holds only packed weights.  A non-constant B whose column dim is not its last is packed
at run time, once per batch.
"""

from __future__ import annotations

import logging

from tvm import s_tir, tirx

from kiln.backends.tvm.schedules.analysis import (
    MatmulMatch,
    RuleContext,
    const_extent,
    inline_epilogue,
    match_matmul,
    normalize_prim_func,
)

log = logging.getLogger(__name__)

PREPROC_ANNOTATION = "meta_schedule.layout_rewrite_preproc"
# Register tile: MR rows x NR columns of fp32 accumulators. 4 x 64 on AVX-512 is 16 zmm
# accumulators + 4 B vectors + 1 broadcast, under the 32 registers.
ROWS_PER_TILE = (4, 8, 6, 2, 1)
K_UNROLL = 4


def _pick(extent: int, choices) -> int:
    for c in choices:
        if extent % c == 0:
            return c
    return 1


def _columns_per_tile(n: int, lanes: int, m: int) -> int:
    """NR: several vector registers wide, dividing N when possible."""
    for mult in (4, 2, 1):
        if n % (lanes * mult) == 0:
            return lanes * mult
    if n < lanes:
        return n
    return lanes


def schedule_matmul(func: tirx.PrimFunc, ctx: RuleContext) -> s_tir.Schedule | None:
    """Schedule the single matmul block of ``func`` (plus fused epilogue); None if no match."""
    sch = s_tir.Schedule(func)
    return sch if _schedule_matmul(sch, ctx) else None


def _schedule_matmul(sch: s_tir.Schedule, ctx: RuleContext) -> bool:
    infos = normalize_prim_func(sch)
    if infos is None:
        return False
    reductions = [info for info in infos if not info.is_injective()]
    if len(reductions) != 1:
        return False
    main_name = reductions[0].name
    match = match_matmul(sch, reductions[0].block_rv)
    if match is None:
        return False
    func_params = list(sch.mod["main"].params)  # TVM 0.27: params are the buffers themselves
    b_param = next((n for n, buf in enumerate(func_params) if buf.same_as(match.b)), None)
    b_is_const = b_param is not None and b_param in ctx.const_params

    # Epilogue: inline the elementwise chain after the matmul into its last block.
    after = inline_epilogue(sch, main_name)
    if len(after) > 1:
        return False
    block = sch.get_sblock(main_name)

    stmt = sch.get(block)
    iters = list(stmt.iter_vars)
    extents = [int(iv.dom.extent) for iv in iters]
    loops = sch.get_loops(block)
    if len(loops) != len(iters):
        return False
    lanes = ctx.vector_lanes_f32
    n = extents[match.col]
    k = extents[match.red]
    m = 1
    for r in match.rows:
        m *= extents[r]
    nr = _columns_per_tile(n, lanes, m)
    mr = _pick(m, ROWS_PER_TILE)
    ku = _pick(k, (K_UNROLL, 2, 1))

    # Pack B: [N/NR, K, NR] so the micro-kernel streams it.
    pack_b = b_is_const or (match.b_dims and match.b_dims[-1] != "j" and "batch" not in match.b_dims)
    pack_block = None
    if pack_b and n % nr == 0 and "batch" not in match.b_dims:
        pack_block = sch.cache_read(block, match.b_read_index, "global")
        b_dims = match.b_dims

        def pack(*idx):
            j = idx[b_dims.index("j")]
            kk = idx[b_dims.index("k")]
            return (j // nr, kk, j % nr)

        sch.transform_layout(pack_block, ("write", 0), pack)
        if b_is_const:
            sch.annotate(pack_block, PREPROC_ANNOTATION, True)
        loops = sch.get_loops(block)

    c_local = sch.cache_write(block, 0, "local")

    batch_loops = [loops[n] for n in match.batch]
    row_loops = [loops[n] for n in match.rows]
    sch.reorder(*batch_loops, *row_loops, loops[match.col], loops[match.red])
    batch = sch.fuse(*batch_loops) if len(batch_loops) > 1 else (batch_loops[0] if batch_loops else None)
    rows = sch.fuse(*row_loops) if len(row_loops) > 1 else (row_loops[0] if row_loops else None)
    col, red = loops[match.col], loops[match.red]

    j_o, j_i = sch.split(col, [None, nr])
    j_v_o, j_v = sch.split(j_i, [None, min(lanes, nr)])
    k_o, k_i = sch.split(red, [None, ku])
    if rows is not None:
        i_o, i_i = sch.split(rows, [None, mr])
        sch.reorder(j_o, i_o, k_o, k_i, i_i, j_v_o, j_v)
        outer = [batch] if batch is not None else []
        outer += [j_o, i_o]
    else:
        sch.reorder(j_o, k_o, k_i, j_v_o, j_v)
        i_i = None
        outer = ([batch] if batch is not None else []) + [j_o]
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    sch.parallel(fused)
    sch.vectorize(j_v)
    sch.unroll(j_v_o)
    if i_i is not None:
        sch.unroll(i_i)
    sch.unroll(k_i)

    sch.reverse_compute_at(c_local, fused, preserve_unit_loops=True)
    sch.decompose_reduction(block, k_o)
    # Fuse the epilogue into the write-back of the register tile.
    if after:
        epilogue = sch.get_sblock(after[0])
        try:
            sch.reverse_compute_inline(epilogue)
        except Exception:  # noqa: BLE001 - TVM raises several kinds; fall back to compute_at
            sch.reverse_compute_at(epilogue, fused, preserve_unit_loops=True)
            _vectorize_innermost(sch, epilogue, lanes)
    _vectorize_innermost(sch, c_local, lanes)
    init = sch.get_sblock(main_name + "_init")
    _vectorize_innermost(sch, init, lanes)

    if pack_block is not None and not b_is_const:
        # run-time pack: parallel over the packed panels
        _parallel_vectorize(sch, pack_block, lanes)
    return True


def _vectorize_innermost(sch: s_tir.Schedule, block, lanes: int) -> None:
    loops = sch.get_loops(block)
    if not loops:
        return
    inner = loops[-1]
    extent = const_extent(sch, inner)
    if extent is None or extent < 2:
        return
    if extent > lanes and extent % lanes == 0:
        _, inner = sch.split(inner, [None, lanes])
    elif extent > lanes:
        return
    sch.vectorize(inner)


def _parallel_vectorize(sch: s_tir.Schedule, block, lanes: int) -> None:
    loops = sch.get_loops(block)
    if len(loops) > 1:
        sch.parallel(sch.fuse(*loops[:-1]))
    _vectorize_innermost(sch, block, lanes)


def is_matmul_block(sch: s_tir.Schedule, block) -> MatmulMatch | None:
    return match_matmul(sch, block)


__all__ = ["schedule_matmul", "PREPROC_ANNOTATION", "tirx"]
