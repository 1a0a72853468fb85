"""CPU legalization of transcendental ops into vectorizable arithmetic (the pre-legalize hook).

TVM legalizes ``erf`` and ``exp`` to calls of libm's ``erff``/``expf``, which LLVM
cannot vectorize: a GELU epilogue fused into a matmul, or a softmax, then runs one
scalar call per element. For float32 these ops are legalized instead to TOPI's
``fast_erf`` (a clamped rational polynomial, |error| < 1e-6 over the whole range) and
``fast_exp`` (range reduction to 2^n * e^r, degree-7 polynomial, relative error ~1e-7):
only multiplies, adds, a division and bit operations, which the elementwise and
contraction rules vectorize.

    gelu(x)    = x * (0.5 + 0.5 * fast_erf(x / sqrt(2)))
    softmax(x) = e / sum(e),  e = fast_exp(x - max(x))
                 (over a symbolic row: max and sum as 16 lane partials and a tail)
    sigmoid(x) = 1 / (1 + fast_exp(-x))      (SiLU/swish epilogues of YOLO-style convs)
    tanh(x)    = fast_tanh(x)                (TOPI's clamped rational approximation)

Other dtypes keep TVM's own legalization.
"""

from __future__ import annotations

import math

from tvm import relax, te, tirx, topi

SQRT_HALF = math.sqrt(0.5)
#: lane-wise partial results of a reduction over a symbolic row: AVX-512's fp32 lanes
#: (two independent 8-lane accumulators on AVX2)
LANE_PARTIALS = 16


def _default(op_name: str):
    import tvm

    return tvm.ir.Op.get(op_name).get_attr("FLegalize")


def _is_f32(call: relax.Call) -> bool:
    ty = call.args[0].ty
    return isinstance(ty, relax.TensorType) and str(ty.dtype) == "float32"


def _gelu_te(x):
    erf = topi.fast_erf(topi.multiply(x, SQRT_HALF))
    return topi.multiply(x, topi.add(topi.multiply(erf, 0.5), 0.5))


def _softmax_te(x, axis: int):
    axis = axis % len(x.shape)
    if axis == len(x.shape) - 1 and not isinstance(x.shape[-1], tirx.IntImm):
        # a symbolic row (attention over a sequence): no vector width divides it
        shifted = topi.subtract(x, _lane_reduce(x, "max"))
        e = topi.fast_exp(shifted)
        return topi.divide(e, _lane_reduce(e, "sum"))
    shifted = topi.subtract(x, topi.max(x, axis=axis, keepdims=True))
    e = topi.fast_exp(shifted)
    return topi.divide(e, topi.sum(e, axis=axis, keepdims=True))


def _lane_reduce(x, kind: str):
    """``x``'s max or sum over its last axis (symbolic, ``n``), keepdims, written as
    ``LANE_PARTIALS`` lane-wise partial results over the ``n // LANE_PARTIALS`` full
    vectors (``partial[.., l] = op_j x[.., j * lanes + l]``: vector loads and a vector
    max/add per ``j``), a reduction of the lanes, and a serial ``n % lanes`` tail. Each
    element enters once: max is exact, the sum only reassociated."""
    *rows, n = x.shape
    lanes = tirx.const(LANE_PARTIALS, str(n.ty.dtype))
    full = tirx.floordiv(n, lanes)
    reducer = te.max if kind == "max" else te.sum
    j = te.reduce_axis((0, full), "j")
    partial = te.compute((*rows, LANE_PARTIALS),
                         lambda *i: reducer(x[(*i[:-1], j * lanes + i[-1])], axis=j),
                         name=f"lane_partial_{kind}")
    lane = te.reduce_axis((0, LANE_PARTIALS), "lane")
    lanes_total = te.compute(tuple(rows), lambda *i: reducer(partial[(*i, lane)], axis=lane),
                             name=f"lanes_{kind}")
    t = te.reduce_axis((0, n - full * lanes), "t")
    tail = te.compute(tuple(rows), lambda *i: reducer(x[(*i, full * lanes + t)], axis=t),
                      name=f"tail_{kind}")
    combine = tirx.max if kind == "max" else (lambda a, b: a + b)
    # a reduction over an empty loop (no full vector, or no tail) never runs its init:
    # its result is read only when it has elements, whatever the schedule
    zero = tirx.const(0, n.ty.dtype)

    def row(*i):
        vectors, rest = lanes_total[i[:-1]], tail[i[:-1]]
        return tirx.Select(full > zero, tirx.Select(n > full * lanes, combine(vectors, rest),
                                                    vectors), rest)

    return te.compute((*rows, 1), row, name=f"row_{kind}")


def _sigmoid_te(x):
    # fast_exp clamps its argument to [-88.4, 88.4], so exp(-x) never overflows to inf
    return topi.divide(1.0, topi.add(topi.fast_exp(topi.negative(x)), 1.0))


def _float32_legalization(op_name: str, te_func, hint: str, *, axis_attr: bool = False):
    """Legalize ``op_name`` with ``te_func`` on float32 inputs, TVM's default otherwise."""

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        if not _is_f32(call):
            return _default(op_name)(bb, call)
        extra = (int(call.attrs.axis),) if axis_attr else ()
        return bb.call_te(te_func, call.args[0], *extra, primfunc_name_hint=hint)

    return legalize


def cpu_legalize_map() -> dict:
    """``LegalizeOps(customize_legalize_map=...)`` for CPU builds."""
    table = [("relax.erf", topi.fast_erf, "erf"), ("relax.nn.gelu", _gelu_te, "gelu"),
             ("relax.exp", topi.fast_exp, "exp"), ("relax.sigmoid", _sigmoid_te, "sigmoid"),
             ("relax.tanh", topi.fast_tanh, "tanh")]
    legalize = {op: _float32_legalization(op, te, hint) for op, te, hint in table}
    legalize["relax.nn.softmax"] = _float32_legalization("relax.nn.softmax", _softmax_te,
                                                         "softmax", axis_attr=True)
    return legalize


__all__ = ["cpu_legalize_map"]
