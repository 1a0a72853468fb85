"""Matmul/dense kernels that decode compressed weights inside the K loop (CPU).

``fuse_decode`` leaves one PrimFunc per (weight decode -> matmul) pair: injective
blocks that turn packed codes (int4 nibbles, int8, kiln's bit-packed or table codes)
plus scales into a float weight ``W[k, n]``, then ``C[i, n] += A[i, k] * W[k, n]`` and
an optional epilogue. This rule never writes the float weight to memory::

    parallel for n_o in N / NR:            # NR output columns per task
      acc[M, NR] = 0                       # registers
      for k:                               # (rows M <= GEMV_ROWS: decode inlined here)
        w[0:NR] = decode(packed[.., k, ..], scale[k // g, n_o*NR : +NR])   # vector unpack
        for i in M: acc[i, :] += A[i, k] * w[:]                             # fp32 FMA
      C[:, n_o*NR : +NR] = epilogue(acc)

A GEMV on a blocked 4-bit weight arrives instead as kiln's grouped GEMV (blocks
``kiln_gemv_group_sum`` / ``kiln_gemv``, from ``importer.grouped_gemv``): the
per-group sums ``part[g, n:n+NR]`` live in registers at the group loop, so a weight
costs one int->float conversion and one FMA, and the scale one FMA per group.

For more rows (prefill, encoders) the decoded ``[K, NR]`` panel is computed once per
``n_o`` into a thread-local buffer and a register-tiled micro-kernel runs over all
rows. With kiln's 32-column nibble tiles (``importer.nibbles.pack_nibbles_tiled``) a
16-byte load gives 32 codes: ``b & 15`` is columns 0..15, ``b >> 4`` columns 16..31,
so after the column split the nibble choice is a constant per unrolled vector.
"""

from __future__ import annotations

import logging

from tvm import s_tir, tirx
from tvm.s_tir.stmt import SBlock

from kiln.backends.tvm.keep_compressed import COMPRESSED_DTYPES
from kiln.backends.tvm.kernel_names import GROUPED_OUTPUT, GROUPED_PARTIAL, GROUPED_XSUM
from kiln.backends.tvm.schedules.analysis import (
    const_extent,
    inline_epilogue,
    match_contraction,
    normalize_prim_func,
    single_reduction,
)
from kiln.backends.tvm.schedules.dense import PREPROC_ANNOTATION
from kiln.backends.tvm.schedules.rule import KilnRule, RuleContext

log = logging.getLogger(__name__)

#: Element types whose presence among a decode's inputs marks a compressed weight (one
#: definition for folding, decode fusion and these rules).
LOW_BIT_DTYPES = COMPRESSED_DTYPES
#: Up to this many rows the decode is inlined into the K loop (decoded once per row).
GEMV_ROWS = 4
#: Rows per register tile in the panel (GEMM) form.
PANEL_MR = 4
#: Output columns per parallel task; 64 = two 32-column nibble tiles, four fp32 vectors.
GEMV_NR = 64
K_UNROLL = 4
#: Columns per nibble tile of a packed 4-bit weight (``importer.nibbles.TILE_COLUMNS``):
#: ``P[n // 32, k, n % 16]``, column ``n`` in the low nibble, ``n + 16`` in the high one.
NIBBLE_TILE = 32


def low_bit_params(func: tirx.PrimFunc) -> set[str]:
    """Names of ``func``'s compressed-weight params (in TVM 0.27 params are buffers)."""
    return {str(p.name) for p in func.params if str(getattr(p, "dtype", "")) in LOW_BIT_DTYPES}


class DecodeContraction(KilnRule):
    """A fused (weight decode -> matmul/dense) PrimFunc: decoded inside the K loop (GEMV)
    or per column panel (GEMM); kiln's grouped int4 GEMV."""

    name = "decode_contraction"

    def schedule(self, sch: s_tir.Schedule, ctx: RuleContext) -> s_tir.Schedule | None:
        return _schedule_decode_contraction(sch, ctx)


def _schedule_decode_contraction(sch: s_tir.Schedule, ctx: RuleContext) -> s_tir.Schedule | None:
    low_bit = low_bit_params(sch.mod["main"])
    if not low_bit:
        return None
    infos = normalize_prim_func(sch)
    if infos is not None and any(i.name == GROUPED_PARTIAL for i in infos):
        return sch if _schedule_grouped_gemv(sch, ctx) else None
    found = single_reduction(sch)
    if found is None:
        return None
    infos, reduction = found
    main_name = reduction.name
    names = [info.name for info in infos]
    producers = infos[: names.index(main_name)]
    if not producers:
        return None
    # the decode chain reads constants only (at least one low-bit) and feeds B
    reads = {region.source.name for p in producers for region in sch.get(p.block_rv).reads}
    if not reads & low_bit:
        return None
    match = match_contraction(sch, reduction.block_rv)
    if match is None or match.b.name not in {str(sch.get(p.block_rv).writes[0].source.name)
                                             for p in producers}:
        return None
    if match.batch or len(match.reds) != 1:
        return None
    stmt = sch.get(reduction.block_rv)
    extents = [int(iv.dom.extent) for iv in stmt.iter_vars]
    n = extents[match.col]
    lanes = ctx.vector_lanes_f32
    nr = next((t for t in (GEMV_NR, 32, 2 * lanes, lanes) if n % t == 0), None)
    if nr is None:
        return None
    rows = 1
    for r in match.rows:
        rows *= extents[r]

    # inline every decode block but the last (its output is the weight B)
    last = producers[-1]
    for info in reversed(producers[:-1]):
        sch.compute_inline(sch.get_sblock(info.name))
    after = inline_epilogue(sch, main_name)
    if len(after) > 1:
        return None
    if rows <= GEMV_ROWS:
        sch.compute_inline(sch.get_sblock(last.name))
        _schedule_gemv(sch, main_name, match, extents, nr, lanes, after)
    else:
        _schedule_panel(sch, main_name, last.name, match, extents, nr, lanes, after)
    return sch


def _finish(sch, main_name, c_local, fused, red_outer, after, lanes) -> None:
    sch.reverse_compute_at(c_local, fused, preserve_unit_loops=True)
    sch.decompose_reduction(sch.get_sblock(main_name), red_outer)
    if after:
        epilogue = sch.get_sblock(after[0])
        try:
            sch.reverse_compute_inline(epilogue)
        except Exception:  # noqa: BLE001 - TVM raises several kinds; fall back to compute_at
            sch.reverse_compute_at(epilogue, fused, preserve_unit_loops=True)
    for block in (c_local, sch.get_sblock(main_name + "_init")):
        loops = sch.get_loops(block)
        inner = loops[-1]
        extent = const_extent(sch, inner)
        if extent and extent > lanes and extent % lanes == 0:
            _, inner = sch.split(inner, [None, lanes])
        if extent and extent >= 2:
            sch.vectorize(inner)


def _schedule_gemv(sch, main_name, match, extents, nr, lanes, after) -> None:
    block = sch.get_sblock(main_name)
    c_local = sch.cache_write(block, 0, "local")
    loops = sch.get_loops(block)
    rows = [loops[r] for r in match.rows]
    j_o, j_t, j_v = sch.split(loops[match.col], [None, nr // lanes, lanes])
    k = loops[match.reds[0]]
    k_extent = extents[match.reds[0]]
    if k_extent % K_UNROLL == 0 and k_extent > K_UNROLL:
        k_o, k_i = sch.split(k, [None, K_UNROLL])
    else:
        k_o, k_i = k, None
    inner = [k_i] if k_i is not None else []
    sch.reorder(j_o, k_o, *inner, *rows, j_t, j_v)
    sch.parallel(j_o)
    sch.vectorize(j_v)
    sch.unroll(j_t)
    for r in rows:
        sch.unroll(r)
    if k_i is not None:
        sch.unroll(k_i)
    _finish(sch, main_name, c_local, j_o, k_o, after, lanes)


def _schedule_panel(sch, main_name, decode_name, match, extents, nr, lanes, after) -> None:
    block = sch.get_sblock(main_name)
    c_local = sch.cache_write(block, 0, "local")
    loops = sch.get_loops(block)
    *outer_rows, row = [loops[r] for r in match.rows]
    m = extents[match.rows[-1]]
    mr = next(t for t in (PANEL_MR, 3, 2, 1) if m % t == 0)
    j_o, j_t, j_v = sch.split(loops[match.col], [None, nr // lanes, lanes])
    i_o, i_i = sch.split(row, [None, mr])
    k = loops[match.reds[0]]
    sch.reorder(j_o, *outer_rows, i_o, k, i_i, j_t, j_v)
    sch.parallel(j_o)
    sch.vectorize(j_v)
    sch.unroll(j_t)
    sch.unroll(i_i)
    # the decoded [K, NR] panel: once per column task, reused by every row tile
    decode = sch.get_sblock(decode_name)
    sch.compute_at(decode, j_o, preserve_unit_loops=True)
    d_loops = sch.get_loops(decode)[1:]
    if d_loops:
        inner = d_loops[-1]
        extent = const_extent(sch, inner)
        if extent and extent > lanes and extent % lanes == 0:
            _, inner = sch.split(inner, [None, lanes])
        if extent and extent >= 2:
            sch.vectorize(inner)
    tile = sch.fuse(*outer_rows, i_o) if outer_rows else i_o
    sch.reverse_compute_at(c_local, tile, preserve_unit_loops=True)
    sch.decompose_reduction(sch.get_sblock(main_name), k)
    if after:
        epilogue = sch.get_sblock(after[0])
        try:
            sch.reverse_compute_inline(epilogue)
        except Exception:  # noqa: BLE001
            sch.reverse_compute_at(epilogue, tile, preserve_unit_loops=True)
    for blk in (c_local, sch.get_sblock(main_name + "_init")):
        inner = sch.get_loops(blk)[-1]
        extent = const_extent(sch, inner)
        if extent and extent > lanes and extent % lanes == 0:
            _, inner = sch.split(inner, [None, lanes])
        if extent and extent >= 2:
            sch.vectorize(inner)


def _schedule_grouped_gemv(sch: s_tir.Schedule, ctx: RuleContext) -> bool:
    """``part[m, g, n] = sum_b x * code`` kept in registers at the group loop, then
    ``y[m, n] += part * s[g, n]``: parallel over column tiles, vectorized columns."""
    lanes = ctx.vector_lanes_f32
    infos = normalize_prim_func(sch)
    names = [info.name for info in infos]
    if GROUPED_OUTPUT not in names:
        return False
    for info in infos[: names.index(GROUPED_PARTIAL)]:  # x's reshape
        if info.name == GROUPED_XSUM:
            continue
        if not info.is_injective():
            return False
        sch.compute_inline(info.block_rv)
    if GROUPED_XSUM in names:  # per-group sums of x: tiny, once per call
        xsum = sch.get_sblock(GROUPED_XSUM)
        sch.decompose_reduction(xsum, sch.get_loops(xsum)[-1])
    after = inline_epilogue(sch, GROUPED_OUTPUT)
    if len(after) > 1:
        return False
    out = sch.get_sblock(GROUPED_OUTPUT)
    *rows, n, g = sch.get_loops(out)  # a unit row loop may be gone after normalizing
    extent = const_extent(sch, n)
    nr = next((t for t in (GEMV_NR, 32, 2 * lanes, lanes) if extent and extent % t == 0), None)
    if nr is None:
        return False
    _prepack_code_panels(sch, ctx, nr)
    part = sch.get_sblock(GROUPED_PARTIAL)
    out_local = sch.cache_write(out, 0, "local")
    n_o, n_t, n_v = sch.split(n, [None, nr // lanes, lanes])
    sch.reorder(n_o, g, *rows, n_t, n_v)
    sch.parallel(n_o)
    for m in rows:
        sch.unroll(m)
    sch.unroll(n_t)
    sch.vectorize(n_v)
    sch.compute_at(part, g, preserve_unit_loops=True)
    sch.set_scope(part, 0, "local")
    p_loops = sch.get_loops(part)
    g_at = [sch.get(loop).same_as(sch.get(g)) for loop in p_loops].index(True)
    *p_rows, pn, pb = p_loops[g_at + 1:]  # rows and the unit group loop, columns, b
    pn_t, pn_v = sch.split(pn, [None, lanes])
    b_extent = const_extent(sch, pb) or 1
    if b_extent % K_UNROLL == 0 and b_extent > K_UNROLL:
        b_o, b_i = sch.split(pb, [None, K_UNROLL])
        sch.reorder(b_o, b_i, *p_rows, pn_t, pn_v)
        sch.unroll(b_i)
    else:
        b_o = pb
        sch.reorder(b_o, *p_rows, pn_t, pn_v)
    for loop in p_rows:
        sch.unroll(loop)
    sch.unroll(pn_t)
    sch.vectorize(pn_v)
    sch.reverse_compute_at(out_local, n_o, preserve_unit_loops=True)
    sch.decompose_reduction(out, g)
    sch.decompose_reduction(part, b_o)
    if after:
        epilogue = sch.get_sblock(after[0])
        try:
            sch.reverse_compute_inline(epilogue)
        except Exception:  # noqa: BLE001 - TVM raises several kinds; fall back to compute_at
            sch.reverse_compute_at(epilogue, n_o, preserve_unit_loops=True)
    for name in (GROUPED_OUTPUT + "_init", GROUPED_PARTIAL + "_init"):
        _vectorize_last(sch, sch.get_sblock(name), lanes)
    _vectorize_last(sch, out_local, lanes)
    return True


def _prepack_code_panels(sch: s_tir.Schedule, ctx: RuleContext, nr: int) -> None:
    """A constant code buffer ``P[n // 32, k, n % 16]`` is re-laid out at compile time to
    ``[n // nr, k, (n % nr) // 32, n % 16]``: the ``nr // 32`` nibble tiles of one column
    task interleaved per ``k``, so that a task streams one contiguous panel (``nr / 2``
    bytes per ``k``) instead of ``nr // 32`` streams a tile apart. For int4 the copy also
    stores ``byte ^ 0x88`` (both nibbles ``^ 8``), so the kernel's per-weight ``^ 8`` goes.

    On the bench Llama's 85 GEMVs (63 MB, read from DRAM as in a decode step) this cut
    1-thread CPU time ~17% (AMD Zen 4; numbers in the commit messages). One preprocess
    per kernel (``prepack``'s limit): the codes, not the scales (a fifth of the bytes,
    which gained less).
    """
    tiles = nr // NIBBLE_TILE
    if tiles < 2:
        return
    params = list(sch.mod["main"].params)
    const_names = {str(params[i].name) for i in ctx.const_params if i < len(params)}
    block = sch.get_sblock(GROUPED_PARTIAL)
    for index, region in enumerate(sch.get(block).reads):
        buf = region.source
        shape = [int(d) if isinstance(d, tirx.IntImm) else 0 for d in buf.shape]
        if str(buf.name) in const_names and str(buf.dtype) == "uint8" and len(shape) == 3 \
                and shape[0] and shape[0] % tiles == 0 and shape[2] == NIBBLE_TILE // 2:
            packed = sch.cache_read(block, index, "global")
            sch.transform_layout(packed, ("write", 0),
                                 lambda t, k, c: (t // tiles, k, t % tiles, c))
            sch.annotate(packed, PREPROC_ANNOTATION, True)
            if _drop_code_xor(sch, block):
                _xor_copy(sch, packed, 0x88)
            return


def _replace_value(sch: s_tir.Schedule, block_rv, value) -> None:
    block = sch.get(block_rv)
    store = block.body
    new = SBlock(block.iter_vars, block.reads, block.writes, block.name_hint,
                 tirx.BufferStore(store.buffer, value, store.indices), block.init,
                 block.alloc_buffers, block.match_buffers, block.annotations)
    sch.state.replace(sch.get_sref(block_rv), new, {block: new})


def _drop_code_xor(sch: s_tir.Schedule, block_rv) -> bool:
    """``part + x * float(nibble ^ 8)`` (int4's offset code) -> ``part + x * float(nibble)``;
    False (unchanged) for any other form."""
    store = sch.get(block_rv).body
    value = getattr(store, "value", None)
    if not isinstance(store, tirx.BufferStore) or not isinstance(value, tirx.Add) \
            or not isinstance(value.b, tirx.Mul) or not isinstance(value.b.b, tirx.Cast):
        return False
    code = value.b.b.value
    if not (isinstance(code, tirx.BitwiseXor) and isinstance(code.b, tirx.IntImm)
            and int(code.b.value) == 8 and isinstance(code.a, tirx.Select)):
        return False
    _replace_value(sch, block_rv, tirx.Add(value.a, tirx.Mul(
        value.b.a, tirx.Cast(str(value.b.b.ty), code.a))))
    return True


def _xor_copy(sch: s_tir.Schedule, block_rv, mask: int) -> None:
    """The code copy ``P'[..] = P[..]`` stores ``P[..] ^ mask`` (both nibbles ^ 8)."""
    load = sch.get(block_rv).body.value
    _replace_value(sch, block_rv, tirx.BitwiseXor(load, tirx.const(mask, "uint8")))


def _vectorize_last(sch, block, lanes: int) -> None:
    inner = sch.get_loops(block)[-1]
    extent = const_extent(sch, inner)
    if extent and extent > lanes and extent % lanes == 0:
        _, inner = sch.split(inner, [None, lanes])
    if extent and extent >= 2:
        sch.vectorize(inner)


__all__ = ["GEMV_ROWS", "DecodeContraction", "low_bit_params"]
