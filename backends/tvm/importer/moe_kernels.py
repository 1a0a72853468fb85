"""The converter of :data:`.internal_ops.MOE_DISPATCH`: top-k MoE as sorted, grouped kernels.

With A = T*k (token, slot) pairs, pair a = t*k + s choosing expert ``e(a) = indices[t, s]``,
and row tiles of MR = :data:`ROW_TILE` rows that each hold rows of one expert::

    rank[a]   = #{b : e(b) < e(a)} + #{b < a : e(b) = e(a)}        counting sort by expert
    n[e]      = #{a : e(a) = e};  start[e] = sum_{e' < e} n[e'];
    tile0[e]  = sum_{e' < e} ceil(n[e'] / MR)                        expert e's first tile
    slot[a]   = MR tile0[e(a)] + rank[a] - start[e(a)]               padded position of a
    rows[t, i] = (token, slot) of the a with slot[a] = t MR + i (-1: padding); the tile's
                 expert e_t = e of its row 0 (a tile past the used ones, t MR >= MR
                 tile0[E]: tile 0's expert, whose weights are read anyway)
    xs[t, i]  = x[token_ti] (0 for padding)                          gathered rows
    h[t, i]   = act(xs[t, i] W1[e_t] + b1[e_t]) [* (xs[t, i] W3[e_t] + b3[e_t])]
    o[t, i]   = (h[t, i] W2[e_t] + b2[e_t]) * values[token_ti, slot_ti]
    y[t, :]   = sum_s o[slot[t*k + s] / MR, slot[t*k + s] % MR, :]   back to token order

Only the chosen experts run on a token (k/E of the dense mixture's FLOPs), and since a
tile's MR rows share one expert the grouped GEMM (``schedules.grouped_gemm``) loads each
weight vector once per tile and reuses it across the tile's rows (register tiles of MR
rows). The padding costs at most ``min(E, A) (MR - 1)`` rows (:func:`row_tiles`). The
token count T may be symbolic: every extent is an expression of T*k. The GEMM blocks are
named by :mod:`kiln.backends.tvm.kernel_names` (``kiln_moe_*``).
"""

from __future__ import annotations

import math

from kiln.backends.tvm.kernel_names import (
    MOE_ACT,
    MOE_COMBINE,
    MOE_COUNT,
    MOE_DOWN,
    MOE_FIRST,
    MOE_GATED,
    MOE_GLU,
    MOE_RANK,
    MOE_ROWS,
    MOE_UP,
)

from .expr_types import attr_str

#: Column of ``rows`` with each padded row's token and slot (-1: padding) and its tile's
#: expert.
TOKEN, SLOT, EXPERT = 0, 1, 2
#: Rows of a tile (all of one expert): the grouped GEMM's register tile height.
ROW_TILE = 4


def _activation(name: str, v, dtype: str):
    from tvm import te, tirx

    if name == "relu":
        return te.max(v, tirx.const(0, dtype))
    if name == "tanh":
        return te.tanh(v)
    if name == "silu":
        return v * te.sigmoid(v)
    if name == "gelu":
        return v * tirx.const(0.5, dtype) * (
            tirx.const(1, dtype) + te.erf(v * tirx.const(1 / math.sqrt(2), dtype)))
    return v


def row_tiles(pairs, experts: int):
    """Tiles enough for ``pairs`` rows of at most ``experts`` experts, each expert's rows
    padded to whole tiles: sum_e ceil(n_e / MR) <= (A + min(E, A) (MR - 1)) / MR."""
    from tvm import tirx

    used = tirx.min(pairs, experts) if not isinstance(pairs, int) else min(pairs, experts)
    return (pairs + used * (ROW_TILE - 1)) // ROW_TILE


def _expert(ind):
    """e(a) = indices[a // k, a % k] as int32."""
    k = ind.shape[1]
    return lambda a: ind[a // k, a % k].astype("int32")


def _counts(ind, experts: int):
    """n[e]: the pairs that chose expert e."""
    from tvm import te, tirx

    expert = _expert(ind)
    c = te.reduce_axis((0, ind.shape[0] * ind.shape[1]), "c")
    return te.compute((experts,), lambda e: te.sum(tirx.Select(
        expert(c) == e.astype("int32"), tirx.const(1, "int32"), tirx.const(0, "int32")),
        axis=c), name=MOE_COUNT)


def _tile_starts(count):
    """MR tile0[e] for e = 0..E: expert e's first padded row (the tiles of the experts
    before it); entry E is the end of the used tiles."""
    from tvm import te, tirx

    f = te.reduce_axis((0, count.shape[0]), "f")
    tile, one = tirx.const(ROW_TILE, "int32"), tirx.const(1, "int32")
    return te.compute((count.shape[0] + 1,), lambda e: te.sum(tirx.Select(
        f < e, (count[f] + tile - one) // tile * tile, tirx.const(0, "int32")), axis=f),
        name=MOE_FIRST)


def _slots(ind, first):
    """slot[a] = MR tile0[e(a)] + #{b < a : e(b) = e(a)}: pair a's padded row position.

    count, tile starts and this are separate kernels, each one reduction: a producer
    reduction computed inside a consumer's parallel loop would share its buffer across
    threads."""
    from tvm import te, tirx

    expert = _expert(ind)
    b = te.reduce_axis((0, ind.shape[0] * ind.shape[1]), "b")
    within = te.compute((ind.shape[0] * ind.shape[1],), lambda a: te.sum(tirx.Select(
        tirx.And(b < a, expert(b) == expert(a)), tirx.const(1, "int32"),
        tirx.const(0, "int32")), axis=b), name=MOE_RANK)
    return te.compute(within.shape, lambda a: first[expert(a)] + within[a],
                      name="kiln_moe_slot")


def _rows(slot, ind, first, tiles):
    """rows[t, i, :] = (token, slot, tile expert) of padded row t MR + i.

    The tile's expert is the last e with MR tile0[e] <= t MR (an unused expert's start
    equals the next one's; a tile past the used ones gets tile 0's expert, so it reads no
    weights the used tiles do not: an unused expert's would be a third expert's worth of
    memory traffic for one token), a sum written out
    over the E experts: each (t, i) reads only its own row of ``src`` (a reduction shared
    by the rows of a tile would be recomputed by parallel iterations into one buffer)."""
    from tvm import te, tirx

    k = ind.shape[1]
    pairs = slot.shape[0]
    a = te.reduce_axis((0, pairs), "a")
    src = te.compute((tiles, ROW_TILE), lambda t, i: te.sum(tirx.Select(
        slot[a] == (t * ROW_TILE + i).astype("int32"), a.astype("int32") + 1,
        tirx.const(0, "int32")), axis=a), name="kiln_moe_source")     # a + 1 (0: padding)
    kk = k.astype("int32") if not isinstance(k, int) else k
    one, zero = tirx.const(1, "int32"), tirx.const(0, "int32")

    def field(t, i, f):
        s = src[t, i] - 1
        experts = int(first.shape[0]) - 1
        start = (t * ROW_TILE).astype("int32")
        start = tirx.Select(start < first[experts], start, zero)
        tile_expert = sum((tirx.Select(first[e] <= start, one, zero)
                           for e in range(1, experts)), zero)
        return tirx.Select(f == TOKEN, tirx.Select(s >= 0, s // kk, -1),
                           tirx.Select(f == SLOT, tirx.Select(s >= 0, s % kk, -1),
                                       tile_expert))

    return te.compute((tiles, ROW_TILE, 3), field, name=MOE_ROWS)


def _grouped_gemm(x, rows, w, name: str):
    """``acc[t, i, j] = sum_d x[t, i, d] * w[e_t, d, j]`` (x: the padded rows in tiles; w
    ``[E, K, N]`` or packed in column tiles ``[E, N/B, K, B]``). The weight index does not
    depend on the row within a tile."""
    from tvm import te

    tiles = rows.shape[0]
    if len(w.shape) == 4:                       # packed [E, N/B, K, B] (moe_dispatch._stack)
        depth, block = w.shape[2], w.shape[3]
        d = te.reduce_axis((0, depth), "d")
        return te.compute((tiles, ROW_TILE, w.shape[1] * block), lambda t, i, j: te.sum(
            x[t, i, d] * w[rows[t, 0, EXPERT], j // block, d, j % block], axis=d), name=name)
    d = te.reduce_axis((0, w.shape[1]), "d")
    return te.compute((tiles, ROW_TILE, w.shape[2]), lambda t, i, j: te.sum(
        x[t, i, d] * w[rows[t, 0, EXPERT], d, j], axis=d), name=name)


def emit_moe_dispatch(bb, x, values, indices, w1, b1, w2, b2, w3=None, b3=None, *,
                      activation: str):
    """The dispatch kernels for one layer (see the module docstring); returns y [T, D']."""
    from tvm import te, tirx

    experts = int(w1.ty.shape[0]) if hasattr(w1, "ty") else int(w1.struct_info.shape[0])
    count = bb.emit_te(lambda ind: _counts(ind, experts), indices,
                       primfunc_name_hint=MOE_COUNT)
    first = bb.emit_te(_tile_starts, count, primfunc_name_hint=MOE_FIRST)
    slot = bb.emit_te(_slots, indices, first, primfunc_name_hint="kiln_moe_rank")
    tiles = row_tiles(_pairs(indices), experts)
    rows = bb.emit_te(lambda s, ind, fs: _rows(s, ind, fs, tiles), slot, indices, first,
                      primfunc_name_hint="kiln_moe_rows")
    # the padded rows' tokens, copied once: the GEMMs then read their rows directly
    # (an x row read through the index inside the reduction runs several times slower)
    x = bb.emit_te(lambda xt, rt: te.compute(
        (rt.shape[0], ROW_TILE, xt.shape[1]), lambda t, i, d: tirx.Select(
            rt[t, i, TOKEN] >= 0, xt[tirx.max(rt[t, i, TOKEN], 0), d],
            tirx.const(0, xt.dtype)), name="kiln_moe_gather"),
        x, rows, primfunc_name_hint="kiln_moe_gather")
    up = None
    if w3 is not None:
        def glu(xt, rt, wt, *rest):
            acc = _grouped_gemm(xt, rt, wt, MOE_GLU)
            if not rest:
                return acc
            (bt,) = rest
            return te.compute(acc.shape, lambda t, i, j: acc[t, i, j] + bt[rt[t, 0, EXPERT], j],
                              name="kiln_moe_glu_bias")
        up = bb.emit_te(glu, x, rows, w3, *([b3] if b3 is not None else []),
                        primfunc_name_hint="kiln_moe_glu")

    def first(xt, rt, wt, *rest):
        acc = _grouped_gemm(xt, rt, wt, MOE_UP)
        bt = rest[0] if b1 is not None else None
        ut = rest[-1] if up is not None else None

        def out(t, i, j):
            v = acc[t, i, j] + bt[rt[t, 0, EXPERT], j] if bt is not None else acc[t, i, j]
            v = _activation(activation, v, acc.dtype)
            return v * ut[t, i, j] if ut is not None else v

        return te.compute(acc.shape, out, name=MOE_ACT)

    extra = ([b1] if b1 is not None else []) + ([up] if up is not None else [])
    h = bb.emit_te(first, x, rows, w1, *extra, primfunc_name_hint="kiln_moe_up")

    def second(ht, rt, vt, wt, *rest):
        acc = _grouped_gemm(ht, rt, wt, MOE_DOWN)
        bt = rest[0] if rest else None

        def out(t, i, c):
            v = acc[t, i, c] + bt[rt[t, 0, EXPERT], c] if bt is not None else acc[t, i, c]
            gate = vt[tirx.max(rt[t, i, TOKEN], 0), tirx.max(rt[t, i, SLOT], 0)]
            return v * gate

        return te.compute(acc.shape, out, name=MOE_GATED)

    o = bb.emit_te(second, h, rows, values, w2, *([b2] if b2 is not None else []),
                   primfunc_name_hint="kiln_moe_down")

    def combine(ot, st, ind):
        k = ind.shape[1]
        s = te.reduce_axis((0, k), "s")
        tokens = ind.shape[0]

        def out(t, c):
            p = st[t * k + s]
            return te.sum(ot[p // ROW_TILE, p % ROW_TILE, c], axis=s)

        return te.compute((tokens, ot.shape[2]), out, name=MOE_COMBINE)

    return bb.emit_te(combine, o, slot, indices, primfunc_name_hint="kiln_moe_combine")


def _pairs(indices):
    """T*k of ``indices`` [T, k] (an int when T is static)."""
    from tvm import tirx

    t, k = indices.ty.shape if hasattr(indices, "ty") else indices.struct_info.shape
    pairs = t * k
    if isinstance(pairs, tirx.IntImm):
        return int(pairs)
    return pairs


class MoeDispatch:
    """Converter of the internal MoE op (inputs x, values, indices, W1, b1, W2, b2, W3, b3;
    absent optional inputs are empty names)."""

    @staticmethod
    def get_converter(opset: int):
        del opset

        def convert(bb, inputs, attr, params):
            del params
            padded = list(inputs) + [None] * (9 - len(inputs))
            x, values, indices, w1, b1, w2, b2, w3, b3 = padded[:9]
            return emit_moe_dispatch(bb, x, values, indices, w1, b1, w2, b2, w3, b3,
                                     activation=attr_str(attr.get("activation", "none")))

        return convert
