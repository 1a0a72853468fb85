"""Convolutions that decode compressed weights inside the kernel (CPU).

``fuse_decode`` leaves one PrimFunc per (weight decode [-> permute_dims] -> conv
[-> epilogue]): injective blocks that turn packed codes plus scales into a float
weight ``W[o, ...]`` (OIHW, or OHWI after ``ConvertLayout``), the input's padding,
then ``C[.., o] += A[..] * W[o, ci, ry, rx]``. This rule never writes the float
weight whole; each parallel task decodes one panel of NR output channels::

    parallel for (o_o, chunk) in (O / NR) x CHUNKS:
      Wp[.., NR] = decode(codes, scales)[o_o*NR : +NR]   # thread-local, vectorized over NR
      for row tile in chunk:                           # MR output pixels
        acc[MR, NR] = 0                                # registers
        for ci, ry, rx: acc[i, :] += A[pixel i, ..] * Wp[ci, ry, rx, :]
        C[tile] = epilogue(acc)

The micro-kernel and its tile sizes are the dense rule's (``dense.py``); ``CHUNKS``
splits the output rows only when there are fewer channel panels than cores (each
chunk decodes its panel again, so a chunk keeps at least :data:`MIN_PIXELS_PER_PANEL`
pixels). The matcher is layout-agnostic (``analysis.match_contraction``): NCHW/OIHW
and NHWC/OHWI take the same path.

Constant inputs of the decode that have an output-channel dim not already last
(int8 codes ``q[o, ci, ry, rx]``, per-group scales) are re-laid out at compile time
to ``[O / NR, .., NR]`` (a layout-rewrite preprocess, folded like dense's packed
weights), so decoding a panel reads contiguous vectors; kiln's 4-bit conv codes are
already tiled along the output channel (``dequantize.pack_nibbles_tiled``).

Depthwise (and grouped) convolutions have no output-channel column (each channel has
its own taps) and go to the window rule (``window.py``) in the same kernel: NCHW, the
decode is inlined into the reduction (a tap's weight is one broadcast per vectorized
output row); channels-last, where the vector runs over channels, the decode stays a
loop nest of its own, run once per call (C * KH * KW weights, a small buffer).
"""

from __future__ import annotations

import logging
import math
import os

from tvm import s_tir, tirx

from kiln.backends.tvm.schedules.analysis import (
    collect_vars_used_in_prim_expr,
    const_extent,
    inline_epilogue,
    match_contraction,
    normalize_prim_func,
    single_reduction,
)
from kiln.backends.tvm.schedules.dense import (
    K_UNROLL,
    PREPROC_ANNOTATION,
    finish_register_tile,
    narrower_tile,
    parallelize_side_nest,
    tile_columns,
    tile_rows,
)
from kiln.backends.tvm.schedules.quant_gemv import GEMV_ROWS, low_bit_params
from kiln.backends.tvm.schedules.rule import KilnRule, RuleContext
from kiln.backends.tvm.schedules.window import schedule_window_reduction

log = logging.getLogger(__name__)

#: A row chunk keeps at least this many output pixels, so that decoding its panel
#: (NR * K weights) stays small beside its NR * K * pixels FMAs.
MIN_PIXELS_PER_PANEL = 32
#: Parallel tasks wanted per core before the rows are split into chunks.
TASKS_PER_CORE = 2


class DecodeConv(KilnRule):
    """A fused (weight decode -> conv) PrimFunc: a decoded weight panel per task, or the
    window rule for a depthwise one."""

    name = "decode_conv"

    def schedule(self, sch: s_tir.Schedule, ctx: RuleContext) -> s_tir.Schedule | None:
        return _schedule_decode_conv(sch, ctx)


def _schedule_decode_conv(sch: s_tir.Schedule, ctx: RuleContext) -> s_tir.Schedule | None:
    low_bit = low_bit_params(sch.mod["main"])
    if not low_bit:
        return None
    found = single_reduction(sch)
    if found is None:
        return None
    infos, reduction = found
    main_name = reduction.name
    names = [info.name for info in infos]
    decode = _decode_blocks(sch, infos[: names.index(main_name)], low_bit)
    if not decode:
        return None
    weight = {str(sch.get(sch.get_sblock(name)).writes[0].source.name): name for name in decode}
    main_reads = [str(r.source.name) for r in sch.get(reduction.block_rv).reads]
    read_weights = sorted({name for name in main_reads if name in weight})
    if len(read_weights) != 1:
        return None
    last = weight[read_weights[0]]
    matches = match_contraction(sch, reduction.block_rv, ctx.const_params,
                                all_candidates=True) or []
    match = next((m for m in matches if str(m.b.name) == read_weights[0]), None)
    if match is None:
        return _schedule_window(sch, main_name, decode, last, ctx)
    if match.batch or not match.rows:
        return None
    extents = [int(iv.dom.extent) if isinstance(iv.dom.extent, tirx.IntImm) else 0
               for iv in sch.get(reduction.block_rv).iter_vars]
    if math.prod(extents[r] for r in match.rows) <= GEMV_ROWS:
        return None  # decode_contraction's GEMV: the decode inlined in the K loop
    if len(match.reds) == 1 and match.b_dims[-1] == match.col:
        return None  # a matmul on a [K, N] weight: decode_contraction's panel form
    for name in reversed(decode):
        if name != last:
            sch.compute_inline(sch.get_sblock(name))
    return sch if _schedule_panel(sch, main_name, last, match, ctx) else None


def _decode_blocks(sch: s_tir.Schedule, producers, low_bit: set[str]) -> list[str]:
    """Names of the injective producers that (transitively) read a low-bit param."""
    decoded: set[str] = set(low_bit)
    found = []
    for info in producers:
        stmt = sch.get(info.block_rv)
        if not {str(r.source.name) for r in stmt.reads} & decoded:
            continue
        if not info.is_injective() or len(stmt.writes) != 1:
            return []
        decoded.add(str(stmt.writes[0].source.name))
        found.append(info.name)
    return found


def _schedule_window(sch: s_tir.Schedule, main_name: str, decode: list[str], last: str,
                     ctx: RuleContext) -> s_tir.Schedule | None:
    """Depthwise: the window rule, with the decode inlined into the reduction when a tap's
    weight is the same across the vectorized output row (NCHW: one broadcast per tap).

    Channels-last, the vector runs over channels, and an inlined decode would be a
    vector decode per tap and pixel; the decode then stays a loop nest of its own in the
    kernel (parallel, vectorized), run once per call: C * KH * KW weights, 1 / (H * W)
    of the convolution's work.
    """
    main = sch.get(sch.get_sblock(main_name))
    if not isinstance(main.body, tirx.BufferStore) or not main.body.indices:
        return None
    row = main.body.indices[-1]
    weights = {str(sch.get(sch.get_sblock(name)).writes[0].source.name) for name in decode}

    def reads_row(region) -> bool:
        return any(v.same_as(row) for r in region.region
                   for v in collect_vars_used_in_prim_expr(r.min))

    if isinstance(row, tirx.Var) and not any(
            reads_row(region) for region in main.reads if str(region.source.name) in weights):
        inline = decode
    else:
        inline = [name for name in decode if name != last]  # into the one writing the weight
    for name in reversed(inline):
        sch.compute_inline(sch.get_sblock(name))
    return schedule_window_reduction(s_tir.Schedule(sch.mod["main"]), ctx)


def row_chunks(col_tiles: int, row_tiles: int, mr: int, cores: int) -> int:
    """How many chunks to split the row tiles into (a divisor of ``row_tiles``)."""
    best = 1
    for chunks in range(2, row_tiles + 1):
        if col_tiles * best >= TASKS_PER_CORE * cores:
            break
        if row_tiles % chunks:
            continue
        if row_tiles // chunks * mr < MIN_PIXELS_PER_PANEL:
            break
        best = chunks
    return best


def _schedule_panel(sch: s_tir.Schedule, main_name: str, last: str, match,
                    ctx: RuleContext) -> bool:
    after = inline_epilogue(sch, main_name)
    if len(after) > 1:
        return False
    block = sch.get_sblock(main_name)
    stmt = sch.get(block)
    iters = list(stmt.iter_vars)
    if not all(isinstance(iv.dom.extent, tirx.IntImm) for iv in iters):
        return False
    extents = [int(iv.dom.extent) for iv in iters]
    if len(sch.get_loops(block)) != len(iters):
        return False
    tiles = tile_columns(extents[match.col], ctx.vector_lanes_f32)
    if tiles is None:
        return False
    nr, lanes = tiles
    row_inner = match.rows[-1]
    mr = tile_rows(extents[row_inner], max(1, ctx.accumulators // max(1, nr // lanes)))
    if mr < 3 < extents[row_inner]:
        nr, mr = narrower_tile(extents[match.col], extents[row_inner], nr, mr, lanes,
                               ctx.accumulators)
    before = [info.name for info in normalize_prim_func(sch)]
    before = [name for name in before[: before.index(main_name)] if name != last]

    # The decoded weight as panels Wp[o // NR, <other dims>, o % NR]; the constants the
    # decode reads along o likewise, at compile time.
    col_dim = match.b_dims.index(match.col)
    decode = sch.get_sblock(last)
    d_stmt = sch.get(decode)
    d_col = d_stmt.writes[0].region[col_dim].min
    if not isinstance(d_col, tirx.Var):
        return False
    d_col_pos = next((n for n, iv in enumerate(d_stmt.iter_vars) if iv.var.same_as(d_col)), None)
    if d_col_pos is None:
        return False
    sch.transform_layout(decode, ("write", 0), _panel_map(col_dim, nr))
    _prepack_decode_input(sch, last, d_col, nr, ctx)

    c_col_last = stmt.body.indices[-1].same_as(iters[match.col].var)
    c_local = sch.cache_write(block, 0, "local")
    if not c_col_last:
        # keep the accumulator tile column-contiguous (vector registers), whatever C's layout
        c_dim = [n for n, idx in enumerate(stmt.body.indices)
                 if idx.same_as(iters[match.col].var)][0]
        sch.transform_layout(block, ("write", 0),
                             lambda *idx: (*[v for d, v in enumerate(idx) if d != c_dim],
                                           idx[c_dim]))
    loops = sch.get_loops(block)
    outer_rows = [loops[n] for n in match.rows[:-1]]
    *red_outer, red_last = [loops[n] for n in match.reds]
    j_o, j_i = sch.split(loops[match.col], [None, nr])
    j_v_o, j_v = sch.split(j_i, [None, lanes])
    red_extent = extents[match.reds[-1]]
    if red_extent > 4 and red_extent % K_UNROLL == 0:
        k_o, k_i = sch.split(red_last, [None, K_UNROLL])
        red_outer = [*red_outer, k_o]
    else:
        k_i = red_last
    i_o, i_i = sch.split(loops[row_inner], [None, mr])
    sch.reorder(j_o, *outer_rows, i_o, *red_outer, k_i, i_i, j_v_o, j_v)
    tile = sch.fuse(*outer_rows, i_o) if outer_rows else i_o
    row_tiles = const_extent(sch, tile) or 1
    cores = ctx.num_cores or os.cpu_count() or 1
    chunks = row_chunks(extents[match.col] // nr, row_tiles, mr, cores)
    if chunks > 1:
        chunk, tile = sch.split(tile, [chunks, None])
        task = sch.fuse(j_o, chunk)
    else:
        task = j_o
    sch.parallel(task)
    sch.vectorize(j_v)
    sch.unroll(j_v_o)
    sch.unroll(i_i)
    if red_extent <= 8:
        sch.unroll(k_i)

    # this task's panel: decoded once, innermost loop over its NR channels (vectorized)
    sch.compute_at(decode, task, preserve_unit_loops=True)
    d_loops = sch.get_loops(decode)
    d_loops = d_loops[len(d_loops) - len(d_stmt.iter_vars):]
    col_loop = d_loops[d_col_pos]
    sch.reorder(*[lp for n, lp in enumerate(d_loops) if n != d_col_pos], col_loop)
    if nr > lanes:
        c_o, c_v = sch.split(col_loop, [None, lanes])
        sch.unroll(c_o)
        sch.vectorize(c_v)
    else:
        sch.vectorize(col_loop)

    finish_register_tile(sch, block, c_local, tile, red_outer[0] if red_outer else k_i,
                         after, vector_write_back=c_col_last, lanes=lanes)
    # producers of A (padding, layout transposes) stay separate loop nests, in parallel
    for name in before:
        try:
            parallelize_side_nest(sch, sch.get_sblock(name), lanes)
        except Exception:  # noqa: BLE001 - best effort on a side loop nest
            pass
    return True


def _panel_map(col_dim: int, nr: int):
    def pack(*idx):
        rest = [v for d, v in enumerate(idx) if d != col_dim]
        return (idx[col_dim] // nr, *rest, idx[col_dim] % nr)

    return pack


def _prepack_decode_input(sch: s_tir.Schedule, decode_name: str, col_var, nr: int,
                          ctx: RuleContext) -> None:
    """The largest constant param the decode reads at ``[.., o, ..]`` (o not its last dim)
    is re-laid out to ``[o // NR, .., o % NR]`` by a compile-time preprocess.

    One per kernel: ``SplitLayoutRewritePreproc`` gathers a kernel's preprocess blocks
    into one function, and ``prepack.fold_weight_prepack`` folds single-output ones only.
    """
    params = list(sch.mod["main"].params)
    const_names = {str(params[n].name) for n in ctx.const_params if n < len(params)}
    best = None
    for index, region in enumerate(sch.get(sch.get_sblock(decode_name)).reads):
        buf = region.source
        if str(buf.name) not in const_names:
            continue
        dims = [n for n, r in enumerate(region.region)
                if r.min.same_as(col_var) and isinstance(r.extent, tirx.IntImm)
                and int(r.extent) == 1]
        shape = [int(d) if isinstance(d, tirx.IntImm) else 0 for d in buf.shape]
        if len(dims) != 1 or dims[0] == len(shape) - 1 or not shape[dims[0]] \
                or shape[dims[0]] % nr or 0 in shape:
            continue
        if best is None or math.prod(shape) > best[0]:
            best = (math.prod(shape), index, dims[0])
    if best is None:
        return
    _, index, dim = best
    packed = sch.cache_read(sch.get_sblock(decode_name), index, "global")
    sch.transform_layout(packed, ("write", 0), _panel_map(dim, nr))
    sch.annotate(packed, PREPROC_ANNOTATION, True)


__all__ = ["MIN_PIXELS_PER_PANEL", "DecodeConv", "row_chunks"]
