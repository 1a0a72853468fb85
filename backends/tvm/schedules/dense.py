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

import dataclasses
import logging

from tvm import s_tir, tirx

from kiln.backends.tvm.schedules.analysis import (
    BufferLoad,
    ContractionMatch,
    const_extent,
    inline_epilogue,
    match_contraction,
    normalize_prim_func,
    single_reduction,
)
from kiln.backends.tvm.schedules.rule import (
    KilnRule,
    RuleContext,
    choose,
    choose_factor,
)

log = logging.getLogger(__name__)

PREPROC_ANNOTATION = "meta_schedule.layout_rewrite_preproc"
# Register tile: MR rows x NR columns of fp32 accumulators. 4 x 64 on AVX-512 is 16 zmm
# accumulators + 4 B vectors + 1 broadcast, under the 32 registers.
K_UNROLL = 4


# Accumulator registers a micro-kernel may use on AVX-512 (of 32 registers); rules read the
# target's own figure from RuleContext.accumulators (rule.register_accumulators).
ACCUMULATORS = 25


def tile_columns(n: int, lanes: int) -> tuple[int, int] | None:
    """(NR, vector lanes) for N output columns: a few vector registers wide, dividing N."""
    for nr in (4 * lanes, 3 * lanes, 2 * lanes, lanes):
        if n % nr == 0:
            return nr, lanes
    half = max(lanes // 2, 4)
    for nr in (6 * half, 5 * half, 4 * half, 3 * half, 2 * half, half):
        if n % nr == 0:
            return nr, half
    if n <= 4 * lanes:
        return n, n
    return None


def narrower_tile(n: int, m: int, nr: int, mr: int, lanes: int,
                  accumulators: int = ACCUMULATORS) -> tuple[int, int]:
    """A tile of fewer vectors but more rows when the widest one gets 1-2 rows.

    Rows of 14 or 7 (resnet's late stages) admit no 3..6-row tile beside 4 vectors; with
    one row each B vector loaded feeds one FMA. Score = FMAs per load, mr*nv / (mr + nv).
    """
    def score(rows: int, vectors: int) -> float:
        return rows * vectors / (rows + vectors)

    best = (score(mr, nr // lanes), nr, mr)
    for vectors in (3, 2, 1):
        width = vectors * lanes
        if n % width:
            continue
        rows = tile_rows(m, accumulators // vectors)
        if score(rows, vectors) > best[0]:
            best = (score(rows, vectors), width, rows)
    return best[1], best[2]


#: FMA latency in cycles as the tile model sees it (4 on Intel since Skylake and Zen 4,
#: plus a cycle of slack: measured, a 4 x 2 AVX2 tile with 8 accumulators runs 10-15%
#: behind a 6 x 2 one, which 4 cycles would call equal).
FMA_LATENCY = 5


def _tile_cycles(rows: int, vectors: int) -> float:
    """Cycles per K step of a rows x vectors tile: two FMAs and two loads (broadcast or
    vector) a cycle, and each accumulator's chain no faster than the FMA latency."""
    return max(rows * vectors / 2, (rows + vectors) / 2, FMA_LATENCY)


def _rows_cost(m: int, mr: int, vectors: int) -> float:
    """Cycles per output row-vector of M rows in MR-row tiles (the last one ``M % MR``)."""
    full, tail = divmod(m, mr)
    cycles = full * _tile_cycles(mr, vectors) + (_tile_cycles(tail, vectors) if tail else 0)
    return cycles / (m * vectors)


def guarded_tile(n: int, m: int, nr: int, mr: int, lanes: int,
                 accumulators: int = ACCUMULATORS) -> tuple[int, int] | None:
    """(NR, MR) of a tile whose MR does not divide M (the last row tile guarded), when it
    beats the dividing tile ``nr`` x ``mr`` by ``_rows_cost``; else None.

    At equal cost a guarded tile with more accumulators is taken when the dividing one
    has too few to hide the FMA latency (under ``2 * FMA_LATENCY``). The tile's B vectors
    and the broadcast must fit beside the accumulators (``accumulators + 4`` registers:
    16 on AVX2, 29 of 32 on AVX-512). Measured (1 thread, paired): AVX2 rows of 14
    5 x 2 vectors instead of 7 x 1, +18-24%; rows of 28, 56, 128 6 x 2 instead of 4 x 2,
    +10-15% (then in workspace memory); on AVX-512 the 7 x 2, 4 x 4 tiles stay (a guarded 4 x 4 for 7 rows
    was slower). A tile whose accumulator lives on the stack (``stack_accumulator``: all of
    AVX2's) is guarded only over a dividing tile of 1-2 rows or one vector, with at most
    ``2 * FMA_LATENCY`` accumulators: LLVM keeps both row paths' accumulators live, a 6 x 2
    spilled in its K loop (1x1 64->256 @56 + residual, x86-64-v3, 1 thread: 6 x 2 guarded
    1.46-1.55x the time of 4 x 2, 5 x 2 guarded 1.01-1.09x).
    """
    if m <= 3:
        return None
    vectors_now = nr // lanes
    current = _rows_cost(m, mr, vectors_now)
    best = None
    for vectors in (4, 3, 2, 1):
        if n % (vectors * lanes):
            continue
        for rows in range(3, min(accumulators // vectors, m - 1) + 1):
            if m % rows == 0 or rows * vectors + vectors + 1 > accumulators + 4:
                continue
            if stack_accumulator(rows * vectors * lanes) and (
                    (mr > 2 and vectors_now > 1) or rows * vectors > 2 * FMA_LATENCY):
                continue
            waste = -(-m // rows) * rows - m
            key = (_rows_cost(m, rows, vectors), -rows * vectors, waste, -rows)
            if best is None or key < best[0]:
                best = (key, vectors * lanes, rows)
    if best is None:
        return None
    cost, more = best[0][0], best[2] * (best[1] // lanes) > mr * vectors_now
    if cost < current or (cost == current and more and
                          mr * vectors_now < 2 * FMA_LATENCY):
        return best[1], best[2]
    return None


#: TVM (LowerTVMBuiltin) allocates a CPU buffer on the stack only in "global" scope and
#: under 1 KiB; any other is a TVMBackendAllocWorkspace/FreeWorkspace call pair per tile.
STACK_BYTES = 1024


def stack_accumulator(elements: int) -> bool:
    """Whether a tile of ``elements`` fp32 accumulators goes on the stack ("global" scope):
    LLVM keeps it in registers, no allocation call nor store and reload per tile. Measured
    (x86-64-v3, 1 thread, CPU time, Zen 4, load 6-8, vs "local"): 1x1 64->256 @56 + residual
    0.54x (with the 4 x 2 tile ``guarded_tile`` now keeps), 1x1 256->1024 @14 0.90x."""
    return elements * 4 < STACK_BYTES


def _column_widths(n: int, lanes: int) -> list[int]:
    """Every NR of ``lanes``-wide vectors that divides N (the tunable options)."""
    widths = [v * lanes for v in range(6, 0, -1) if n % (v * lanes) == 0]
    return widths or [n]


def _row_tiles(m: int, nr: int, lanes: int, accumulators: int = ACCUMULATORS) -> list[int]:
    """Every MR dividing M whose MR x NR/lanes accumulators fit (the tunable options)."""
    cap = max(1, accumulators // max(1, nr // lanes))
    return [mr for mr in range(min(cap, m), 0, -1) if m % mr == 0]


#: C's row length in bytes from which column panels swept outside the rows are blocked:
#: a panel written row by row at a multiple of 4 KiB lands every row in one L1 set
#: (32 KiB, 8 ways: 4 KiB a way), so the write-back and the epilogue's residual reads
#: thrash. Measured (conv + bias + residual + ReLU alone, cold caches, 1 thread, CPU
#: time, AMD EPYC Zen 4, load ~2): 1x1 256->1024 @14 x86-64-v3 1.44 -> 1.10 ms, x86-64-v4
#: 1.17 -> 1.05; 1x1 512->2048 @7 1.38 -> 1.18, 1.07 -> 1.03; narrower rows (1x1
#: 1024->256 @14: 1 KiB) gained under 10%, and 3x3 convs blocked ran a few % slower.
BLOCKED_ROW_BYTES = 4096
#: The weights of one panel block (kept in L2 while every row tile uses them; a quarter
#: of a 1 MiB L2: Zen 4, Skylake-SP and later).
PANEL_BLOCK_BYTES = 256 * 1024


def panel_block(n: int, nr: int, k: int) -> int:
    """Column panels per block when the panels run outside the rows (1: no blocking):
    the most panels of ``nr`` columns dividing ``n / nr`` whose packed fp32 weights
    (``k`` deep) fit ``PANEL_BLOCK_BYTES``, when C's rows are ``BLOCKED_ROW_BYTES`` long
    or more. Blocks of all the panels are the rows-outside order itself."""
    panels = n // nr
    if n * 4 < BLOCKED_ROW_BYTES or panels < 2:
        return 1
    fits = [d for d in range(1, panels) if panels % d == 0 and d * nr * k * 4 <= PANEL_BLOCK_BYTES]
    return max(fits, default=1)


def _reduction_length(match: ContractionMatch, extents: list[int]) -> int:
    total = 1
    for n in match.reds:
        total *= extents[n]
    return total


def _numel(buf: tirx.Buffer) -> int:
    total = 1
    for dim in buf.shape:
        total *= int(dim) if isinstance(dim, tirx.IntImm) else 1 << 20
    return total


def tile_rows(m: int, cap: int) -> int:
    for mr in range(min(cap, m), 0, -1):
        if m % mr == 0 and (mr >= 3 or mr == m or m < 3):
            return mr
    return 1


def register_tile(n: int, m: int, nr: int, lanes: int, accumulators: int = ACCUMULATORS,
                  *, guard: bool = True) -> tuple[int, int, tuple[int, int] | None]:
    """(NR, MR, the guarded (NR, MR) or None) of N columns by M rows, starting from
    ``tile_columns``' NR: the dividing tile (``tile_rows``, ``narrower_tile`` when it gets
    1-2 rows), then ``guarded_tile`` where ``guard`` allows one."""
    mr = tile_rows(m, max(1, accumulators // max(1, nr // lanes)))
    if mr < 3 < m:
        nr, mr = narrower_tile(n, m, nr, mr, lanes, accumulators)
    return nr, mr, guarded_tile(n, m, nr, mr, lanes, accumulators) if guard else None


#: A fused row loop (a conv's h x w as one) is taken when its tile's cost is under this
#: share of the image row's own. Rows of 7 and 14 on AVX2 (16 registers: 7 x 1 or a
#: guarded 5 x 2 with a 2 x 2 tail) become 6 x 2 tiles over 49 and 196 pixels.
FUSED_ROWS_GAIN = 0.95
#: Accumulators of a fused-row tile: each row's address is its own h, w (a division by
#: the row width), and a 6 x 2 AVX2 tile over 196 pixels spilled (2.5x slower, 1 thread)
#: where 5 x 2 over 49 ran 4-26% faster than the image row's own tile.
FUSED_ROWS_ACCUMULATORS = 10


def _tile_cost(m: int, tile: tuple[int, int, tuple[int, int] | None], lanes: int) -> float:
    """``_rows_cost`` of a ``register_tile`` result (its guarded tile where it has one)."""
    nr, mr = tile[2] or tile[:2]
    return _rows_cost(m, mr, nr // lanes)


def _fusable_rows(match: ContractionMatch, symbolic: set[int],
                  extents: list[int]) -> int | None:
    """The pixel count of the two innermost row iterators (a conv's h, w) when they are
    adjacent loops with static extents, i.e. can be fused into one row loop; else None."""
    if len(match.rows) < 2:
        return None
    h, w = match.rows[-2], match.rows[-1]
    if h + 1 != w or h in symbolic or w in symbolic or extents[h] < 2:
        return None
    return extents[h] * extents[w]


def _fuse_row_iters(sch: s_tir.Schedule, block, match: ContractionMatch,
                    extents: list[int]) -> tuple[ContractionMatch, list[int], tirx.IndexMap]:
    """The block's two innermost row iters (a conv's h, w: ``_fusable_rows``) made one,
    ``r = h * W + w`` (``transform_block_layout``); returns the match and extents by the
    new iter positions and the map of C's indices that fuses the same two dims.

    The accumulator must be indexed by ``r`` too (the caller applies the map to it and to
    its write-back): a tile of fused rows is one interval of ``r``, so the write-back
    placed per tile covers exactly its pixels; indexed by h and w it would cover their
    bounding box (other tiles' pixels: a race and wrong results)."""
    h, w = match.rows[-2], match.rows[-1]
    width = extents[w]
    stmt = sch.get(block)
    count = len(stmt.iter_vars)

    def fuse_iters(*iv):
        return (*iv[:h], iv[h] * width + iv[w], *iv[w + 1:])

    sch.transform_block_layout(block, tirx.IndexMap.from_func(fuse_iters, ndim=count))

    def moved(n: int) -> int:
        return n if n < w else n - 1

    dims = [d for d, idx in enumerate(stmt.body.indices)
            for it in (h, w) if idx.same_as(stmt.iter_vars[it].var)]
    if len(dims) != 2 or dims[1] != dims[0] + 1:
        raise ValueError("fused rows: C's h and w are not adjacent dims")
    at = dims[0]

    def fuse_dims(*idx):
        return (*idx[:at], idx[at] * width + idx[at + 1], *idx[at + 2:])

    fused = dataclasses.replace(
        match, batch=tuple(moved(n) for n in match.batch),
        rows=tuple(moved(n) for n in match.rows if n != w), col=moved(match.col),
        reds=tuple(moved(n) for n in match.reds),
        b_dims=tuple(None if n is None else moved(n) for n in match.b_dims))
    new_extents = [e for n, e in enumerate(extents) if n != w]
    new_extents[h] = extents[h] * width
    return fused, new_extents, tirx.IndexMap.from_func(fuse_dims,
                                                       ndim=len(stmt.body.indices))

#: An innermost reduction this short keeps its dividing row tile (no guarded tail).
SHORT_REDUCTION = 8

#: The row tile (MR) of a contraction whose row count is symbolic (cap; the accumulator
#: budget may lower it): no divisor exists, so the last tile is guarded.
SYMBOLIC_ROW_TILE = 4


class Contraction(KilnRule):
    """The single contraction block of a kernel (matmul, dense, conv) plus its epilogue,
    register-tiled with packed weights (scheduled in place; its tile, loop order, K
    unroll are choice points)."""

    name = "contraction"
    has_choice_points = True

    def schedule(self, sch: s_tir.Schedule, ctx: RuleContext) -> s_tir.Schedule | None:
        return sch if _schedule_contraction(sch, ctx) else None


def _schedule_contraction(sch: s_tir.Schedule, ctx: RuleContext) -> bool:
    found = single_reduction(sch)
    if found is None:
        return False
    reduction = found[1]
    main_name = reduction.name
    candidates = match_contraction(sch, reduction.block_rv, ctx.const_params,
                                   all_candidates=True)
    if not candidates:
        return False
    # the preferred B (a weight) unless its column count has no register tile (e.g. a
    # 6625-class head): then the other operand's columns (the rows of C) are vectorized
    for match in candidates:
        extent = sch.get(reduction.block_rv).iter_vars[match.col].dom.extent
        if isinstance(extent, tirx.IntImm) and \
                tile_columns(int(extent), ctx.vector_lanes_f32) is not None:
            break
    else:
        return False
    b_is_const = match.b_is_param is not None and match.b_is_param in ctx.const_params

    after = inline_epilogue(sch, main_name)
    if len(after) > 1:
        return False
    block = sch.get_sblock(main_name)
    before = [info.name for info in normalize_prim_func(sch)]
    before = before[: before.index(main_name)]
    if _inline_plain_copies(sch, before):  # a 1x1 conv's "padding" of zero width
        block = sch.get_sblock(main_name)
        before = [info.name for info in normalize_prim_func(sch)]
        before = before[: before.index(main_name)]

    stmt = sch.get(block)
    iters = list(stmt.iter_vars)
    # a symbolic extent (a symbolic-shape build) is allowed on the rows and batch only:
    # its tile is fixed (no divisor search) and the row split gets a tail guard
    symbolic = {n for n, iv in enumerate(iters) if not isinstance(iv.dom.extent, tirx.IntImm)}
    if not symbolic <= {*match.rows, *match.batch}:
        return False
    extents = [0 if n in symbolic else int(iv.dom.extent) for n, iv in enumerate(iters)]
    c_col_last = stmt.body.indices[-1].same_as(iters[match.col].var)
    loops = sch.get_loops(block)
    if len(loops) != len(iters):
        return False
    tiles = tile_columns(extents[match.col], ctx.vector_lanes_f32)
    if tiles is None:
        return False
    nr, lanes = tiles
    row_inner = match.rows[-1] if match.rows else None
    acc = ctx.accumulators
    rows_symbolic = row_inner is not None and row_inner in symbolic
    # a short innermost reduction (a 3-channel stem conv: K steps of 3) is unrolled whole;
    # there the guarded tile's predicated tail costs more than it saves. Measured, 1 thread:
    # stem 3x3 s2 3->16 @224 AVX2 0.475 -> 0.387 ms, AVX-512 0.361 -> 0.315; 7x7 s2 3->64
    # AVX2 10.3 -> 7.8 ms, AVX-512 unchanged (6.2)
    short_reduction = extents[match.reds[-1]] <= SHORT_REDUCTION if match.reds else False
    guarded = None
    fuse_rows = False
    if rows_symbolic:
        mr = max(1, min(SYMBOLIC_ROW_TILE, acc // max(1, nr // lanes)))
    elif row_inner is None:
        mr = 1
    else:
        nr, mr, guarded = register_tile(extents[match.col], extents[row_inner], nr, lanes,
                                        acc, guard=not short_reduction)
        fused = _fusable_rows(match, symbolic, extents) if c_col_last else None
        if fused is not None and not short_reduction:
            tile = register_tile(extents[match.col], fused, tiles[0], lanes,
                                 min(acc, FUSED_ROWS_ACCUMULATORS))
            if _tile_cost(fused, tile, lanes) < \
                    FUSED_ROWS_GAIN * _tile_cost(extents[row_inner], (nr, mr, guarded), lanes):
                nr, mr, guarded = tile
                fuse_rows = True
    if guarded is not None:  # a fixed tile, its last row tile guarded (as symbolic rows)
        nr, mr = guarded
    row_extent = fused if fuse_rows else (extents[row_inner] if row_inner is not None else 1)
    # choice points (analysis.choose): NR is a layout (Bp's panels), MR and KU split factors
    default_nr = nr
    if guarded is None:
        nr = choose(sch, ctx, _column_widths(extents[match.col], lanes), nr)
    if row_inner is not None and not rows_symbolic and guarded is None:
        rows = _row_tiles(row_extent, nr, lanes, acc)
        mr = choose_factor(sch, ctx, rows, mr if nr == default_nr else rows[0])
        on_stack = stack_accumulator(rows[0] * nr)  # (mr may be a sampled factor)
    else:
        on_stack = stack_accumulator(mr * nr)

    if fuse_rows:  # the block's h, w iters (and its loops) become one row iter h * W + w
        match, extents, fuse_map = _fuse_row_iters(sch, block, match, extents)
        row_inner = match.rows[-1]
        loops = sch.get_loops(block)

    # Pack B as Bp[j // NR, <other dims>, j % NR] so the micro-kernel streams it.
    b_col_last = match.b_dims and match.b_dims[-1] == match.col
    pack_block = None
    if (b_is_const or not b_col_last) and not match.batch:
        pack_block = sch.cache_read(block, match.b_read_index, "global")
        col_dim = match.b_dims.index(match.col)

        def pack(*idx):
            rest = [v for d, v in enumerate(idx) if d != col_dim]
            return (idx[col_dim] // nr, *rest, idx[col_dim] % nr)

        sch.transform_layout(pack_block, ("write", 0), pack)
        if b_is_const:
            sch.annotate(pack_block, PREPROC_ANNOTATION, True)
        loops = sch.get_loops(block)
    elif not b_col_last:
        return False

    c_local = sch.cache_write(block, 0, "global" if on_stack else "local")
    if fuse_rows:  # the accumulator and its write-back indexed by the fused row too
        sch.transform_layout(block, ("write", 0), fuse_map)
        sch.transform_block_layout(c_local, fuse_map)
    if not c_col_last:
        # keep the accumulator tile column-contiguous (vector registers), whatever C's layout
        col_dim = [n for n, idx in enumerate(stmt.body.indices)
                   if idx.same_as(iters[match.col].var)][0]
        sch.transform_layout(block, ("write", 0),
                             lambda *idx: (*[v for d, v in enumerate(idx) if d != col_dim],
                                           idx[col_dim]))

    batch_loops = [loops[n] for n in match.batch]
    outer_rows = [loops[n] for n in match.rows[:-1]]
    red_loops = [loops[n] for n in match.reds]
    col = loops[match.col]
    j_o, j_i = sch.split(col, [None, nr])
    j_v_o, j_v = sch.split(j_i, [None, lanes])
    *red_outer, red_last = red_loops
    red_extent = extents[match.reds[-1]]
    k_unroll = K_UNROLL if red_extent > 4 and red_extent % K_UNROLL == 0 else 1
    if red_extent > 8 and k_unroll > 1:  # (up to 8 the K loop is unrolled whole)
        k_unroll = choose_factor(sch, ctx, [u for u in (1, 2, 4, 8) if red_extent % u == 0],
                                 k_unroll)
    if not isinstance(k_unroll, int) or k_unroll > 1:
        k_o, k_i = sch.split(red_last, [None, k_unroll])
        red_outer = [*red_outer, k_o]
    else:
        k_i = red_last
    if row_inner is not None:
        i_o, i_i = sch.split(loops[row_inner], [None, mr])
        # sweep the smaller operand's tiles innermost, so the larger one's tile stays in cache
        rows_outer = _numel(match.a) > _numel(match.b)
        if extents[match.col] > nr:  # (one column panel: either order is the same loop)
            rows_outer = choose(sch, ctx, (False, True), rows_outer)
        # the outer rows (a conv's output rows h) go with the row tiles: with the column
        # panels outermost a panel is reused by every row of the image while in cache,
        # not streamed once per h (a 7x7 layer's 4 MB of weights 7 times from L3)
        block_panels = 1 if rows_outer or not c_col_last else panel_block(
            extents[match.col], nr, _reduction_length(match, extents))
        if block_panels > 1:  # panel blocks outermost, the rows, then a block's panels
            j_o, j_b = sch.split(j_o, [None, block_panels])
            outer = [*batch_loops, j_o, *outer_rows, i_o, j_b]
        else:
            outer = [*batch_loops, *outer_rows, i_o, j_o] if rows_outer else \
                [*batch_loops, j_o, *outer_rows, i_o]
        sch.reorder(*outer, *red_outer, k_i, i_i, j_v_o, j_v)
    else:
        i_i = None
        outer = [*batch_loops, j_o]
        sch.reorder(*outer, *red_outer, k_i, j_v_o, j_v)
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    sch.parallel(fused)
    sch.vectorize(j_v)
    sch.unroll(j_v_o)
    if i_i is not None:
        sch.unroll(i_i)
    if red_extent <= 8:
        sch.unroll(k_i)

    finish_register_tile(sch, block, c_local, fused, red_outer[0] if red_outer else k_i,
                         after, vector_write_back=c_col_last, lanes=lanes)

    if pack_block is not None and not b_is_const:
        parallelize_side_nest(sch, pack_block, lanes)
    # producers of A (padding, reshapes) stay separate loop nests: run them in parallel
    for name in before:
        blk = sch.get_sblock(name)
        if pack_block is not None and sch.get(blk).same_as(sch.get(pack_block)):
            continue
        try:
            parallelize_side_nest(sch, blk, lanes)
        except Exception:  # noqa: BLE001 - best effort on a side loop nest
            pass
    return True


def finish_register_tile(sch: s_tir.Schedule, block, c_local, tile, red_start, after: list[str],
                         *, vector_write_back: bool, lanes: int) -> None:
    """The tail every register-tiled contraction shares: the accumulator written back
    per ``tile``, the reduction's init split off at ``red_start``, the epilogue inlined
    into the write-back (else computed per tile), and the write-back and init
    vectorized (the write-back only when C's columns are contiguous, ``vector_write_back``;
    in NCHW it is strided and stays scalar)."""
    name = sch.get(block).name_hint
    sch.reverse_compute_at(c_local, tile, preserve_unit_loops=True)
    sch.decompose_reduction(block, red_start)
    if after:
        epilogue = sch.get_sblock(after[0])
        try:
            sch.reverse_compute_inline(epilogue)
        except Exception:  # noqa: BLE001 - TVM raises several kinds; fall back to compute_at
            sch.reverse_compute_at(epilogue, tile, preserve_unit_loops=True)
    if vector_write_back:
        _vectorize_innermost(sch, c_local, lanes)
    _vectorize_innermost(sch, sch.get_sblock(name + "_init"), lanes)


def _same_indices(a, b) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if isinstance(x, tirx.IntImm) and isinstance(y, tirx.IntImm):
            if int(x) != int(y):
                return False
        elif not (isinstance(x, tirx.Var) and x.same_as(y)):
            return False
    return True


def _inline_plain_copies(sch: s_tir.Schedule, names: list[str]) -> bool:
    """compute_inline the producer blocks that only copy a buffer (TOPI's ``pad_temp`` of
    a convolution without padding): the contraction then reads the input in place."""
    return inline_producers_if(sch, names, lambda body: (
        isinstance(body, tirx.BufferStore) and isinstance(body.value, BufferLoad)
        and _same_indices(body.indices, body.value.indices)))


def inline_producers_if(sch: s_tir.Schedule, names: list[str], wanted) -> bool:
    """compute_inline each producer block of ``names`` whose body ``wanted(body)`` accepts;
    whether any was inlined."""
    inlined = False
    for name in names:
        block = sch.get_sblock(name)
        if not wanted(sch.get(block).body):
            continue
        try:
            sch.compute_inline(block)
            inlined = True
        except Exception:  # noqa: BLE001 - TVM signals "cannot inline" with several kinds
            continue
    return inlined


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


def parallelize_side_nest(sch: s_tir.Schedule, block, lanes: int) -> None:
    """A loop nest beside the micro-kernel (packing, padding): outer loops fused and
    parallel, the innermost vectorized."""
    loops = sch.get_loops(block)
    if len(loops) > 1:
        sch.parallel(sch.fuse(*loops[:-1]))
    _vectorize_innermost(sch, block, lanes)


__all__ = ["ACCUMULATORS", "K_UNROLL", "PREPROC_ANNOTATION", "Contraction", "finish_register_tile",
           "guarded_tile", "inline_producers_if", "narrower_tile", "panel_block", "parallelize_side_nest",
           "register_tile", "stack_accumulator", "tile_columns", "tile_rows"]
