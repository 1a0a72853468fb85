"""The converter of :data:`.internal_ops.MOE_DISPATCH`: top-k MoE as sorted, grouped kernels.

With A = T*k (token, slot) pairs, pair a = t*k + s choosing expert ``e(a) = indices[t, s]``::

    rank[a]    = #{b : e(b) < e(a)} + #{b < a : e(b) = e(a)}        counting sort by expert
    src[r]     = the a with rank[a] = r;   rows[r] = (token, slot, expert) of src[r]
    xs[r, :]   = x[token_r]                                        gathered rows
    h[r, :]    = act(xs[r] W1[e_r] + b1[e_r]) [* (xs[r] W3[e_r] + b3[e_r])]
    o[r, :]    = (h[r] W2[e_r] + b2[e_r]) * values[token_r, slot_r]
    y[t, :]    = sum_s o[rank[t*k + s], :]                         back to token order

Row r of the grouped GEMMs reads its expert's weights: the rows of one expert are
consecutive, so only the chosen experts run on a token (k/E of the dense mixture's FLOPs)
and a row tile mostly reuses one expert's weight vectors. The token count T may be
symbolic: every extent is T*k. The GEMM blocks are named by
:mod:`kiln.backends.tvm.kernel_names` (``kiln_moe_*``) for ``schedules.grouped_gemm``.
"""

from __future__ import annotations

import math

from kiln.backends.tvm.kernel_names import (
    MOE_ACT,
    MOE_COMBINE,
    MOE_DOWN,
    MOE_GATED,
    MOE_GLU,
    MOE_RANK,
    MOE_ROWS,
    MOE_UP,
)

from .expr_types import attr_str

#: Column of ``rows`` with each sorted row's token, slot and expert.
TOKEN, SLOT, EXPERT = 0, 1, 2


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


def _rank(ind):
    from tvm import te, tirx

    t, k = ind.shape
    pairs = t * k
    b = te.reduce_axis((0, pairs), "b")

    def expert(a):
        return ind[a // k, a % k]

    def before(a):
        ea, eb = expert(a), expert(b)
        earlier = tirx.Or(eb < ea, tirx.And(eb == ea, b < a))
        return te.sum(tirx.Select(earlier, tirx.const(1, "int32"), tirx.const(0, "int32")),
                      axis=b)

    return te.compute((pairs,), before, name=MOE_RANK)


def _rows(rank, ind):
    from tvm import te, tirx

    k = ind.shape[1]
    pairs = rank.shape[0]
    a = te.reduce_axis((0, pairs), "a")
    src = te.compute((pairs,), lambda r: te.sum(
        tirx.Select(rank[a] == r.astype("int32"), a.astype("int32"), tirx.const(0, "int32")),
        axis=a), name="kiln_moe_source")

    def field(r, f):
        s = src[r]
        return tirx.Select(f == TOKEN, s // k.astype("int32"),
                           tirx.Select(f == SLOT, s % k.astype("int32"),
                                       ind[s // k.astype("int32"),
                                           s % k.astype("int32")].astype("int32")))

    return te.compute((pairs, 3), field, name=MOE_ROWS)


def _grouped_gemm(x, rows, w, name: str):
    """``acc[r, j] = sum_d x[r, d] * w[e_r, d, j]`` (x: the sorted rows; w ``[E, K, N]``
    or packed in column tiles ``[E, N/B, K, B]``)."""
    from tvm import te

    pairs = rows.shape[0]
    if len(w.shape) == 4:                       # packed [E, N/B, K, B] (moe_dispatch._stack)
        depth, block = w.shape[2], w.shape[3]
        d = te.reduce_axis((0, depth), "d")
        return te.compute((pairs, w.shape[1] * block), lambda r, j: te.sum(
            x[r, d] * w[rows[r, EXPERT], j // block, d, j % block], axis=d), name=name)
    d = te.reduce_axis((0, w.shape[1]), "d")
    return te.compute((pairs, w.shape[2]),
                      lambda r, j: te.sum(x[r, d] * w[rows[r, EXPERT], d, j], axis=d),
                      name=name)


def emit_moe_dispatch(bb, x, values, indices, w1, b1, w2, b2, w3=None, b3=None, *,
                      activation: str):
    """The dispatch kernels for one layer (see the module docstring); returns y [T, D']."""
    from tvm import te

    rank = bb.emit_te(_rank, indices, primfunc_name_hint="kiln_moe_rank")
    rows = bb.emit_te(_rows, rank, indices, primfunc_name_hint="kiln_moe_rows")
    # the sorted rows' tokens, copied once: the GEMMs then read their rows directly
    # (an x row read through the index inside the reduction runs several times slower)
    x = bb.emit_te(lambda xt, rt: te.compute((rt.shape[0], xt.shape[1]),
                                             lambda r, d: xt[rt[r, TOKEN], d],
                                             name="kiln_moe_gather"),
                   x, rows, primfunc_name_hint="kiln_moe_gather")
    up = None
    if w3 is not None:
        def glu(xt, rt, wt, *rest):
            acc = _grouped_gemm(xt, rt, wt, MOE_GLU)
            if not rest:
                return acc
            (bt,) = rest
            return te.compute(acc.shape, lambda r, j: acc[r, j] + bt[rt[r, EXPERT], j],
                              name="kiln_moe_glu_bias")
        up = bb.emit_te(glu, x, rows, w3, *([b3] if b3 is not None else []),
                        primfunc_name_hint="kiln_moe_glu")

    def first(xt, rt, wt, *rest):
        acc = _grouped_gemm(xt, rt, wt, MOE_UP)
        bt = rest[0] if b1 is not None else None
        ut = rest[-1] if up is not None else None

        def out(r, j):
            v = acc[r, j] + bt[rt[r, EXPERT], j] if bt is not None else acc[r, j]
            v = _activation(activation, v, acc.dtype)
            return v * ut[r, j] if ut is not None else v

        return te.compute(acc.shape, out, name=MOE_ACT)

    extra = ([b1] if b1 is not None else []) + ([up] if up is not None else [])
    h = bb.emit_te(first, x, rows, w1, *extra, primfunc_name_hint="kiln_moe_up")

    def second(ht, rt, vt, wt, *rest):
        acc = _grouped_gemm(ht, rt, wt, MOE_DOWN)
        bt = rest[0] if rest else None

        def out(r, c):
            v = acc[r, c] + bt[rt[r, EXPERT], c] if bt is not None else acc[r, c]
            return v * vt[rt[r, TOKEN], rt[r, SLOT]]

        return te.compute(acc.shape, out, name=MOE_GATED)

    o = bb.emit_te(second, h, rows, values, w2, *([b2] if b2 is not None else []),
                   primfunc_name_hint="kiln_moe_down")

    def combine(ot, rk, ind):
        k = ind.shape[1]
        s = te.reduce_axis((0, k), "s")
        tokens = ind.shape[0]
        return te.compute((tokens, ot.shape[1]),
                          lambda t, c: te.sum(ot[rk[t * k + s], c], axis=s), name=MOE_COMBINE)

    return bb.emit_te(combine, o, rank, indices, primfunc_name_hint="kiln_moe_combine")


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
