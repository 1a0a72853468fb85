"""Contractions with a symbolic row extent (a symbolic-shape build, ``W=16..1024``).

The contraction rule (``dense``) tiles symbolic rows too, but fuses its parallel loops
in its static order (batch, conv rows h, row tiles of w, column panels). With a
symbolic row count the fused index is decoded by a symbolic divisor
(``fused % ((W - 1) // 16 * 5 + 5) // 5``): TVM's analyzer cannot tell that it is
non-negative, so the accumulator tile's compacted indices keep ``min``/``max`` terms,
LLVM cannot give the accumulators registers, and the micro-kernel runs from the stack
(measured 7-12x slower than the fixed-shape build on PP-OCRv4 rec's 1x1 convs).

This rule schedules the same register-tiled micro-kernel (``C[rows, cols] += A * Bp``
with B packed ``[N / NR, K, NR]``, constant weights packed at compile time, the
epilogue fused per tile) so that every divisor of a decoded index is a constant:

- the symbolic rows are padded (``pad_einsum``) to a multiple of the row tile: A's rows
  are copied with zero rows below the last, the micro-kernel runs unguarded, and only
  the per-tile epilogue tests the row (a guard inside the K loop made a 480x480 1x1 conv
  2.7-6x slower than the fixed build). A kxk conv is no einsum to TVM (it reads A at
  ``h + kh``): its last row tile stays guarded;
- with enough static parallel work (column panels x static rows, at least
  :data:`MIN_STATIC_PARALLEL`) the panels go outermost in the parallel loop, as in the
  fixed-shape build (a weight panel stays in cache while the image's rows stream past),
  and the symbolic row tiles run serially inside; else the symbolic loops go first;
- columns no register tile divides (PP-OCR's 6625-class head) are padded to a tile too,
  and so are symbolic columns (attention's ``Q K^T`` over a symbolic sequence: panels of
  :data:`SYMBOLIC_COLUMN_VECTORS` vectors, run serially inside the row tiles); a symbolic
  reduction (attention's ``P V``) runs its K loop to the symbolic end.

Each output element is summed over K in the same order as in the fixed-shape build.
Kernels whose extents are all static are left to ``dense``.
"""

from __future__ import annotations

from tvm import s_tir, tirx

from kiln.backends.tvm.schedules.analysis import (
    BufferLoad,
    inline_epilogue,
    match_contraction,
    normalize_prim_func,
    single_reduction,
)
from kiln.backends.tvm.schedules.dense import (
    K_UNROLL,
    PREPROC_ANNOTATION,
    finish_register_tile,
    inline_producers_if,
    parallelize_side_nest,
    stack_accumulator,
    tile_columns,
)
from kiln.backends.tvm.schedules.rule import KilnRule, RuleContext

#: the largest row tile a symbolic row extent gets (the accumulator budget may lower it)
MAX_SYMBOLIC_ROWS = 8
#: a symbolic row tile under this many rows tries a narrower column panel
MIN_SYMBOLIC_ROWS = 4
#: column panels x static rows at least this (or twice the target's cores) run in
#: parallel with the symbolic row tiles serial inside (the fixed-shape build's order)
MIN_STATIC_PARALLEL = 8
#: symbolic columns are padded to this many SIMD vectors (a panel: the tile's NR)
SYMBOLIC_COLUMN_VECTORS = 2


def symbolic_row_tile(vectors: int, accumulators: int) -> int:
    """MR for symbolic rows and NR of ``vectors`` SIMD vectors: the largest power of two
    of rows the accumulator registers hold, up to :data:`MAX_SYMBOLIC_ROWS` (a longer
    tile wastes more of the padded last one). A power of two divides the sequence
    lengths models are mostly run at, and is the tile the fixed-shape build picks for
    them: AVX-512's 25 accumulators over 4 vectors held 6 rows, which padded S=16 to 18
    (the bench encoder's dense layers 12-16% slower than the fixed build's 4 x 4)."""
    rows = max(1, min(MAX_SYMBOLIC_ROWS, accumulators // max(1, vectors)))
    return 1 << (rows.bit_length() - 1)


def narrower_symbolic_tile(columns: int, nr: int, mr: int, lanes: int,
                           accumulators: int) -> tuple[int, int]:
    """(NR, MR) for symbolic rows: a narrower panel dividing the columns when its
    power-of-two row tile holds more accumulators and ``nr`` gets under
    :data:`MIN_SYMBOLIC_ROWS` rows. AVX2's 12 accumulators over 768 columns: 4 vectors
    held 2 rows (8 accumulators), 3 vectors hold 4 (12, the fixed build's 4 x 3)."""
    if mr >= MIN_SYMBOLIC_ROWS:
        return nr, mr
    for vectors in range(nr // lanes - 1, 0, -1):
        rows = symbolic_row_tile(vectors, accumulators)
        if columns % (vectors * lanes) == 0 and rows * vectors > mr * (nr // lanes):
            return vectors * lanes, rows
    return nr, mr


def padded_columns(n: int, lanes: int) -> int | None:
    """NR for N columns that no register tile divides (PP-OCR's 6625-class head): the
    widest tile of up to 4 vectors whose padding of N wastes under 1%; None for a few
    columns (padding them is not worth a kernel)."""
    if n < 4 * lanes:
        return None
    for nr in (4 * lanes, 3 * lanes, 2 * lanes, lanes):
        if (-n) % nr * 100 < n:
            return nr
    return None


def _pad_iters(sch: s_tir.Schedule, main: str, padding: dict[int, int],
               after: list[str]) -> list[str] | None:
    """``pad_einsum`` the contraction's iterators ``padding`` names (iter index -> multiple):
    the operands' padded copies (B's zeros inlined into its packing), the result's
    unpadding copy inlined into the epilogue, so only the write-back is guarded. Returns
    the operands' padding blocks (None when TVM refuses)."""
    block = sch.get_sblock(main)
    iters = list(sch.get(block).iter_vars)
    factors = [padding.get(n, 1) for n in range(len(iters))]
    names_before = {info.name for info in normalize_prim_func(sch)}
    try:
        sch.pad_einsum(block, factors)
    except Exception:  # noqa: BLE001 - TVM refuses with several kinds
        return None
    names = [info.name for info in normalize_prim_func(sch)]
    new = [name for name in names if name not in names_before]
    at = names.index(main)
    for name in new:
        if names.index(name) > at and after:  # the unpadding copy: into the epilogue
            try:
                sch.compute_inline(sch.get_sblock(name))
            except Exception:  # noqa: BLE001 - stays as the epilogue itself
                return None
    return [name for name in new if names.index(name) < at]  # the operands' padding


def _vectorize_epilogue(sch: s_tir.Schedule, name: str, lanes: int) -> None:
    """The per-tile epilogue's innermost loop in vectors (its guard stays scalar)."""
    loops = sch.get_loops(sch.get_sblock(name))
    try:
        _, inner = sch.split(loops[-1], [None, lanes])
        sch.vectorize(inner)
    except Exception:  # noqa: BLE001 - best effort: a scalar epilogue is still correct
        pass


def _is_static(extent) -> bool:
    return isinstance(extent, tirx.IntImm)


class SymbolicContraction(KilnRule):
    """A contraction (matmul, dense, conv) whose rows or batch are symbolic: the
    register-tiled micro-kernel with the symbolic loops outermost (see the module)."""

    name = "symbolic_contraction"

    def schedule(self, sch: s_tir.Schedule, ctx: RuleContext) -> s_tir.Schedule | None:
        return sch if _schedule(sch, ctx) else None


def _inline_plain_copies(sch: s_tir.Schedule, names: list[str]) -> None:
    """compute_inline the blocks that copy a buffer unchanged (a 1x1 conv's zero-width
    ``pad_temp``), so the contraction reads the input in place."""
    def same(a, b) -> bool:
        if isinstance(a, tirx.IntImm) and isinstance(b, tirx.IntImm):
            return int(a) == int(b)
        return a.same_as(b)

    inline_producers_if(sch, names, lambda body: (
        isinstance(body, tirx.BufferStore) and isinstance(body.value, BufferLoad)
        and len(body.indices) == len(body.value.indices)
        and all(same(a, b) for a, b in zip(body.indices, body.value.indices, strict=True))))


def _schedule(sch: s_tir.Schedule, ctx: RuleContext) -> bool:
    found = single_reduction(sch)
    if found is None:
        return False
    reduction = found[1]
    main_name = reduction.name
    candidates = match_contraction(sch, reduction.block_rv, ctx.const_params,
                                   all_candidates=True)
    if not candidates:
        return False
    iters = list(sch.get(reduction.block_rv).iter_vars)
    symbolic = {n for n, iv in enumerate(iters) if not _is_static(iv.dom.extent)}
    if not symbolic:
        return False  # a static kernel: the contraction rule's
    padded_nr = None  # a column count no register tile divides: padded to this NR
    for match in candidates:
        col_extent = iters[match.col].dom.extent
        # symbolic columns (attention's Q K^T over a symbolic sequence) are padded to a
        # tile; a symbolic reduction (its P V) runs its K loop to the symbolic end
        if not symbolic <= {*match.rows, *match.batch, *match.reds, match.col}:
            continue
        if not _is_static(col_extent):
            padded_nr = SYMBOLIC_COLUMN_VECTORS * ctx.vector_lanes_f32
            break
        if tile_columns(int(col_extent), ctx.vector_lanes_f32) is not None:
            break
        padded_nr = padded_columns(int(col_extent), ctx.vector_lanes_f32)
        if padded_nr is not None:
            break
    else:
        return False
    b_is_const = match.b_is_param is not None and match.b_is_param in ctx.const_params
    col_symbolic = match.col in symbolic
    columns = padded_nr if col_symbolic else int(iters[match.col].dom.extent)
    if padded_nr is not None:
        columns = -(-columns // padded_nr) * padded_nr
    nr, lanes = tile_columns(columns, ctx.vector_lanes_f32)
    row_inner = match.rows[-1] if match.rows else None
    mr = symbolic_row_tile(nr // lanes, ctx.accumulators) if row_inner is not None else 1
    if row_inner in symbolic and padded_nr is None:
        nr, mr = narrower_symbolic_tile(columns, nr, mr, lanes, ctx.accumulators)
    if row_inner is not None and row_inner not in symbolic:
        mr = next((m for m in range(mr, 0, -1) if int(iters[row_inner].dom.extent) % m == 0),
                  1)

    after = inline_epilogue(sch, main_name)
    if len(after) > 1:
        return False
    names = [info.name for info in normalize_prim_func(sch)]
    _inline_plain_copies(sch, names[: names.index(main_name)])
    # padding: columns no tile divides up to NR; symbolic rows up to MR (A's rows copied
    # with zeros below the last), so the micro-kernel runs unguarded and only the
    # write-back tests the row (a guard inside the K loop: measured 2.7x slower)
    padding = {match.col: padded_nr} if padded_nr is not None else {}
    if row_inner is not None and row_inner in symbolic and mr > 1:
        padding[row_inner] = mr
    padding_blocks: list[str] = []
    if padding:
        padding_blocks = _pad_iters(sch, main_name, padding, after)
        if padding_blocks is None and row_inner in padding:
            # TVM pads only einsums (a kxk conv reads A at h + kh): rows stay guarded
            del padding[row_inner]
            padding_blocks = _pad_iters(sch, main_name, padding, after) if padding else []
        if padding_blocks is None:
            return False
        after = [info.name for info in normalize_prim_func(sch)]
        after = after[after.index(main_name) + 1:]
    names = [info.name for info in normalize_prim_func(sch)]
    before = names[: names.index(main_name)]
    block = sch.get_sblock(main_name)
    stmt = sch.get(block)
    iters = list(stmt.iter_vars)
    loops = sch.get_loops(block)
    if len(loops) != len(iters):
        return False
    extents = [int(iv.dom.extent) if _is_static(iv.dom.extent) else 0 for iv in iters]

    # B packed as Bp[j // NR, <other dims>, j % NR] (at compile time when a weight)
    b_col_last = match.b_dims and match.b_dims[-1] == match.col
    pack_block = None
    if (b_is_const or not b_col_last) and not match.batch:
        pack_block = sch.cache_read(block, match.b_read_index, "global")
        col_dim = match.b_dims.index(match.col)

        def pack(*idx):
            rest = [v for d, v in enumerate(idx) if d != col_dim]
            return (idx[col_dim] // nr, *rest, idx[col_dim] % nr)

        sch.transform_layout(pack_block, ("write", 0), pack)
        for name in padding_blocks:  # B's zero padding: computed by the packing (A's
            # stays a copy: inlined, every row's load in the K loop would be a select)
            blk = sch.get_sblock(name)
            if not any(sch.get(c).same_as(sch.get(pack_block))
                       for c in sch.get_consumers(blk)):
                continue
            try:
                sch.compute_inline(blk)
            except Exception:  # noqa: BLE001 - an operand's padding stays a side nest
                continue
        if b_is_const:
            sch.annotate(pack_block, PREPROC_ANNOTATION, True)
        loops = sch.get_loops(block)
    elif not b_col_last:
        return False

    c_col_last = stmt.body.indices[-1].same_as(iters[match.col].var)
    # a tile under 1 KiB on the stack (dense.stack_accumulator: no workspace call per tile)
    # where no row is guarded (a guarded tile on the stack spilled in dense's measurements)
    unguarded = row_inner is None or row_inner not in symbolic or row_inner in padding
    on_stack = unguarded and stack_accumulator(mr * nr)
    c_local = sch.cache_write(block, 0, "global" if on_stack else "local")
    if not c_col_last:  # keep the accumulator tile column-contiguous
        col_dim = [n for n, idx in enumerate(stmt.body.indices)
                   if idx.same_as(iters[match.col].var)][0]
        sch.transform_layout(block, ("write", 0),
                             lambda *idx: (*[v for d, v in enumerate(idx) if d != col_dim],
                                           idx[col_dim]))

    j_o, j_i = sch.split(loops[match.col], [None, nr])
    j_v_o, j_v = sch.split(j_i, [None, lanes])
    *red_outer, red_last = [loops[n] for n in match.reds]
    red_extent = extents[match.reds[-1]]
    k_unroll = K_UNROLL if red_extent > 4 and red_extent % K_UNROLL == 0 else 1
    if k_unroll > 1:
        k_o, k_i = sch.split(red_last, [None, k_unroll])
        red_outer = [*red_outer, k_o]
    else:
        k_i = red_last
    outer_static, outer_symbolic = [], []
    inner = []
    for n in (*match.batch, *match.rows):
        if n == row_inner:
            i_o, i_i = sch.split(loops[n], [None, mr])
            (outer_symbolic if n in symbolic else outer_static).append(i_o)
            inner = [i_i]
        else:
            (outer_symbolic if n in symbolic else outer_static).append(loops[n])
    # the parallel loops. With enough static parallelism (column panels x static rows) the
    # panels go outermost as in the fixed-shape build (a weight panel stays in cache
    # while every row of the image streams past it) and the symbolic row tiles run
    # serially inside; else the symbolic loops go first (constant divisors when the fused
    # index is decoded), then the static ones, then the panels
    # (symbolic column panels always run serially, innermost of the outer loops)
    panels = [] if col_symbolic else [j_o]
    static_parallel = 1 if col_symbolic else extents[match.col] // nr
    for n in (*match.batch, *match.rows):
        if n not in symbolic:
            static_parallel *= extents[n] if n != row_inner else extents[n] // mr
    panels_outer = static_parallel >= max(MIN_STATIC_PARALLEL, 2 * ctx.num_cores)
    if panels_outer:
        parallel_loops = [*panels, *outer_static]
        serial = outer_symbolic
    else:
        parallel_loops = [*outer_symbolic, *outer_static, *panels]
        serial = []
    if col_symbolic:
        serial = [*serial, j_o]
    sch.reorder(*parallel_loops, *serial, *red_outer, k_i, *inner, j_v_o, j_v)
    fused = sch.fuse(*parallel_loops) if len(parallel_loops) > 1 else parallel_loops[0]
    sch.parallel(fused)
    tile = serial[-1] if serial else fused
    sch.vectorize(j_v)
    sch.unroll(j_v_o)
    for loop in inner:
        sch.unroll(loop)
    if 0 < red_extent <= 8:  # (0: a symbolic reduction)
        sch.unroll(k_i)
    # padded: the epilogue is computed per tile, not inlined into the write-back
    # (reverse_compute_inline over a padded tile keeps one guard and drops the other:
    # the last tile then writes past the output)
    finish_register_tile(sch, block, c_local, tile, red_outer[0] if red_outer else k_i,
                         after if not padding else [], vector_write_back=c_col_last,
                         lanes=lanes)
    if padding and after:
        sch.reverse_compute_at(sch.get_sblock(after[0]), tile, preserve_unit_loops=True)
        _vectorize_epilogue(sch, after[0], lanes)
    if pack_block is not None and not b_is_const:
        parallelize_side_nest(sch, pack_block, lanes)
    for name in before:  # producers of A (padding) stay separate nests: in parallel
        try:
            blk = sch.get_sblock(name)
        except Exception:  # noqa: BLE001 - B's padding, inlined into its packing
            continue
        if pack_block is not None and sch.get(blk).same_as(sch.get(pack_block)):
            continue
        try:
            parallelize_side_nest(sch, blk, lanes)
        except Exception:  # noqa: BLE001 - best effort on a side loop nest
            pass
    return True


__all__ = ["MAX_SYMBOLIC_ROWS", "MIN_STATIC_PARALLEL", "MIN_SYMBOLIC_ROWS", "SYMBOLIC_COLUMN_VECTORS",
           "SymbolicContraction", "narrower_symbolic_tile", "symbolic_row_tile"]
