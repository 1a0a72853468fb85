"""Depthwise convolution and pooling: window reductions vectorized along the output row.

``C[n, c, h, w] = reduce over (ry, rx) of f(X[n, c, h*s + ry, w*s + rx], W[c, ry, rx])``
has no column the weights could be vectorized over (each channel has its own few
taps), so the vector axis is the output's innermost spatial iter ``w``::

    parallel for (n, c, h, w_o):
      acc[U * lanes] = init
      for ry, rx:                        # the window, unrolled when small
        acc[:] = acc[:] (+|max) X[.., w_o*U*lanes + 0 .. U*lanes] * W[c, ry, rx]
      C[..] = epilogue(acc)

This serves depthwise conv, max/avg pooling and any reduction whose output's
innermost iter also indexes the input's innermost dim.
"""

from __future__ import annotations

from tvm import s_tir, tirx

from kiln.backends.tvm.schedules.analysis import (
    collect_vars_used_in_prim_expr,
    inline_epilogue,
    inline_injective,
    normalize_prim_func,
    single_reduction,
)
from kiln.backends.tvm.schedules.dense import PREPROC_ANNOTATION, inline_producers_if
from kiln.backends.tvm.schedules.elementwise import parallel_vectorize
from kiln.backends.tvm.schedules.rule import (
    KilnRule,
    RuleContext,
    choose,
    choose_factor,
)

# Vectors per accumulator tile (independent FMA chains hide the FMA latency).
VECTORS_PER_TILE = 6
# Tunable vectors per tile: 1 .. this many (analysis.choose_factor).
MAX_VECTORS_PER_TILE = 8
# Accumulator vectors of a pixel-blocked tile (NHWC depthwise), of 32 AVX-512 registers.
PIXEL_TILE_ACCUMULATORS = 24
# Window loops up to this extent are unrolled (tunable: all or none).
UNROLL_WINDOW_EXTENT = 7
# Padding read through a predicate in the window (no padded copy of the input).
INLINE_PADDING = True
# Windows up to this many taps read their producers inline (the stack of an ONNX Sum).
SMALL_WINDOW = 4


def _is_padding(body) -> bool:
    """A pad whose predicate does not read the innermost (vectorized) dim's index: the
    inlined predicate is then one scalar test per tap, not a per-lane select."""
    value = getattr(body, "value", None)
    op = getattr(value, "op", None)
    if not (isinstance(body, tirx.BufferStore) and op is not None and
            getattr(op, "name", "").endswith("if_then_else")):
        return False
    last = body.indices[-1]
    return isinstance(last, tirx.Var) and not any(
        u.same_as(last) for u in collect_vars_used_in_prim_expr(value.args[0]))


def _inline_padding(sch: s_tir.Schedule, names: list[str]) -> bool:
    """compute_inline TOPI's ``pad_temp`` (``if_then_else(inside, X[..], 0)``) into the
    window: the taps read the input through the predicate (scalar per tap: it depends
    on the pixel and tap, not on the vector's channels) instead of a padded copy of the
    whole input written first."""
    return inline_producers_if(sch, names, _is_padding)


def _inline_producers(sch: s_tir.Schedule, main: str) -> None:
    inline_injective(sch, main, side="before")


def _pack_constant_along(sch: s_tir.Schedule, block, ctx: RuleContext, v: tirx.Var) -> str | None:
    """Re-lay out a constant operand so the vectorized iter ``v`` indexes its last dim.

    A depthwise conv in NHWC reads ``W[c, ry, rx, 0]`` (OHWI with I = 1) while the
    vector runs over ``c``: a gather of strided weights per tap. The weight is packed
    to ``W[ry, rx, 0, c]`` by a layout-rewrite block that runs at compile time (as for
    dense weights). Returns the packing block's name, or None.
    """
    stmt = sch.get(block)
    params = list(sch.mod["main"].params)
    for index, region in enumerate(stmt.reads):
        buf = region.source
        position = next((n for n, p in enumerate(params) if p.same_as(buf)), None)
        if position is None or position not in ctx.const_params:
            continue
        uses = [collect_vars_used_in_prim_expr(r.min) for r in region.region]

        def has_v(used) -> bool:
            return any(u.same_as(v) for u in used)

        if has_v(uses[-1]):
            return None  # already contiguous along v
        dims = [d for d, used in enumerate(uses) if has_v(used)]
        if len(dims) != 1 or len(uses[dims[0]]) != 1:
            continue
        v_dim = dims[0]
        pack = sch.cache_read(block, index, "global")
        sch.transform_layout(pack, ("write", 0),
                             lambda *idx: (*[x for d, x in enumerate(idx) if d != v_dim],  # noqa: B023
                                           idx[v_dim]))  # noqa: B023 (called at once)
        sch.annotate(pack, PREPROC_ANNOTATION, True)
        return sch.get(pack).name_hint
    return None


class Window(KilnRule):
    """Depthwise conv, pooling: the output row vectorized, a few vectors per tile
    (scheduled in place; vectors per tile, pixel block, window unroll are choice points)."""

    name = "window"
    has_choice_points = True

    def schedule(self, sch: s_tir.Schedule, ctx: RuleContext) -> s_tir.Schedule | None:
        return schedule_window_reduction(sch, ctx)


def schedule_window_reduction(sch: s_tir.Schedule, ctx: RuleContext) -> s_tir.Schedule | None:
    """Schedule ``sch``'s window reduction in place (also decode_conv's depthwise form)."""
    found = single_reduction(sch)
    if found is None:
        return None
    name = found[1].name
    block = found[1].block_rv
    stmt = sch.get(block)
    if not isinstance(stmt.body, tirx.BufferStore) or stmt.init is None:
        return None
    iters = list(stmt.iter_vars)
    # a symbolic extent (symbolic-shape build) is allowed on the output's spatial dims
    symbolic = {n for n, iv in enumerate(iters) if not isinstance(iv.dom.extent, tirx.IntImm)}
    if any(iters[n].iter_type != tirx.IterVar.DataPar for n in symbolic):
        return None
    last = stmt.body.indices[-1]
    if not isinstance(last, tirx.Var):
        return None
    v_pos = next((n for n, iv in enumerate(iters) if iv.var.same_as(last)), None)
    if v_pos is None or iters[v_pos].iter_type != tirx.IterVar.DataPar:
        return None
    # some read must have v in its innermost index (contiguous along the output row)
    reads = [r for r in stmt.reads if not r.source.same_as(stmt.body.buffer)]
    if not any(iters[v_pos].var in collect_vars_used_in_prim_expr(r.region[-1].min) for r in reads):
        return None
    window = 1
    for iv in iters:
        if iv.iter_type != tirx.IterVar.DataPar:
            window *= int(iv.dom.extent)
    lanes = ctx.vector_lanes_f32
    if v_pos in symbolic:  # a symbolic row: full vectors, the last one guarded
        unroll = vectors = 1
    else:
        extent = int(iters[v_pos].dom.extent)
        while lanes > 4 and extent % lanes:
            lanes //= 2
        if extent % lanes and window <= SMALL_WINDOW and extent <= 4 * ctx.vector_lanes_f32:
            lanes = extent  # a short row (7x7 maps): one odd-width vector
        elif extent % lanes:
            return None
        unroll = 1
        for u in range(VECTORS_PER_TILE, 0, -1):
            if extent % (u * lanes) == 0:
                unroll = u
                break
        vectors = unroll  # the heuristic's int (``unroll`` is a sampled factor when tuning)
        unroll = choose_factor(sch, ctx, [u for u in range(1, MAX_VECTORS_PER_TILE + 1)
                                          if extent % (u * lanes) == 0], unroll)

    if window <= SMALL_WINDOW:
        # a sum over a few stacked inputs (ONNX Sum -> broadcast_to + stack + sum): read
        # the inputs in the reduction instead of materializing the stack
        _inline_producers(sch, name)
        block = sch.get_sblock(name)
    after = inline_epilogue(sch, name)
    if len(after) > 1:
        return None
    block = sch.get_sblock(name)
    # the block's iter vars were re-created by the epilogue's normalization: v afresh
    pack = _pack_constant_along(sch, block, ctx, sch.get(block).body.indices[-1])
    block = sch.get_sblock(name)
    before = [info.name for info in normalize_prim_func(sch)]
    before = before[: before.index(name)]
    if INLINE_PADDING and _inline_padding(sch, before):
        block = sch.get_sblock(name)
        before = [info.name for info in normalize_prim_func(sch)]
        before = before[: before.index(name)]
    loops = sch.get_loops(block)
    if len(loops) != len(iters):
        return None
    local = sch.cache_write(block, 0, "local")
    spatial = [loops[n] for n, iv in enumerate(iters)
               if iv.iter_type == tirx.IterVar.DataPar and n != v_pos]
    reds = [loops[n] for n, iv in enumerate(iters) if iv.iter_type != tirx.IterVar.DataPar]
    v_o, v_u, v_l = sch.split(loops[v_pos], [None, unroll, lanes])
    pixels = []
    if pack is not None and spatial:
        # weights vary along v (NHWC depthwise): a few output pixels per tile reuse each
        # weight vector (loads per FMA 2 -> ~1.25)
        last = [iv for n, iv in enumerate(iters)
                if iv.iter_type == tirx.IterVar.DataPar and n != v_pos][-1]
        cap = PIXEL_TILE_ACCUMULATORS if lanes >= 16 else PIXEL_TILE_ACCUMULATORS // 2
        options = [p for p in (4, 3, 2, 1)
                   if isinstance(last.dom.extent, tirx.IntImm) and
                   int(last.dom.extent) % p == 0 and p * vectors <= cap] or [1]
        block_pixels = choose(sch, ctx, options, options[0])
        if block_pixels > 1:
            spatial[-1], pixel = sch.split(spatial[-1], [None, block_pixels])
            pixels = [pixel]
    sch.reorder(*spatial, v_o, *reds, *pixels, v_u, v_l)
    for pixel in pixels:
        sch.unroll(pixel)
    if spatial:
        rows = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
        sch.parallel(rows)
    outer = v_o
    sch.vectorize(v_l)
    sch.unroll(v_u)
    red_extents = [int(iv.dom.extent) for iv in iters if iv.iter_type != tirx.IterVar.DataPar]
    unroll_window = any(e <= UNROLL_WINDOW_EXTENT for e in red_extents) and \
        choose(sch, ctx, (True, False), True)
    for red, red_extent in zip(reds, red_extents, strict=True):
        if unroll_window and red_extent <= UNROLL_WINDOW_EXTENT:
            sch.unroll(red)
    sch.reverse_compute_at(local, outer, preserve_unit_loops=True)
    if reds:
        sch.decompose_reduction(block, reds[0])
    if after:
        try:
            sch.reverse_compute_inline(sch.get_sblock(after[0]))
        except Exception:  # noqa: BLE001 - fall back to computing the epilogue per tile
            sch.reverse_compute_at(sch.get_sblock(after[0]), outer, preserve_unit_loops=True)
    for blk in (local, sch.get_sblock(name + "_init")):
        inner = sch.get_loops(blk)[-1]
        ext = sch.get(inner).extent
        if isinstance(ext, tirx.IntImm) and int(ext) % lanes == 0:
            _, vec = sch.split(inner, [None, lanes])
            sch.vectorize(vec)
    for producer in before:
        if pack is not None and producer == pack:
            continue
        try:
            parallel_vectorize(sch, sch.get_sblock(producer), ctx.vector_lanes_f32)
        except Exception:  # noqa: BLE001 - best effort on a side loop nest
            pass
    return sch
