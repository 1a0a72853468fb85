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
    sigmoid(x) = 1 / (1 + fast_exp(-x))      (SiLU/swish epilogues of YOLO-style convs)
    tanh(x)    = fast_tanh(x)                (TOPI's clamped rational approximation)

Other dtypes keep TVM's own legalization.
"""

from __future__ import annotations

import math

from tvm import relax, topi

SQRT_HALF = math.sqrt(0.5)


def _default(op_name: str):
    import tvm

    return tvm.ir.Op.get(op_name).get_attr("FLegalize")


def _is_f32(call: relax.Call) -> bool:
    ty = call.args[0].ty
    return isinstance(ty, relax.TensorType) and str(ty.dtype) == "float32"


def _erf(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    if not _is_f32(call):
        return _default("relax.erf")(bb, call)
    return bb.call_te(topi.fast_erf, call.args[0], primfunc_name_hint="erf")


def _gelu_te(x):
    erf = topi.fast_erf(topi.multiply(x, SQRT_HALF))
    return topi.multiply(x, topi.add(topi.multiply(erf, 0.5), 0.5))


def _gelu(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    if not _is_f32(call):
        return _default("relax.nn.gelu")(bb, call)
    return bb.call_te(_gelu_te, call.args[0], primfunc_name_hint="gelu")


def _exp(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    if not _is_f32(call):
        return _default("relax.exp")(bb, call)
    return bb.call_te(topi.fast_exp, call.args[0], primfunc_name_hint="exp")


def _softmax_te(x, axis: int):
    shifted = topi.subtract(x, topi.max(x, axis=axis, keepdims=True))
    e = topi.fast_exp(shifted)
    return topi.divide(e, topi.sum(e, axis=axis, keepdims=True))


def _softmax(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    if not _is_f32(call):
        return _default("relax.nn.softmax")(bb, call)
    return bb.call_te(_softmax_te, call.args[0], int(call.attrs.axis),
                      primfunc_name_hint="softmax")


def _sigmoid_te(x):
    # fast_exp clamps its argument to [-88.4, 88.4], so exp(-x) never overflows to inf
    return topi.divide(1.0, topi.add(topi.fast_exp(topi.negative(x)), 1.0))


def _sigmoid(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    if not _is_f32(call):
        return _default("relax.sigmoid")(bb, call)
    return bb.call_te(_sigmoid_te, call.args[0], primfunc_name_hint="sigmoid")


def _tanh(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    if not _is_f32(call):
        return _default("relax.tanh")(bb, call)
    return bb.call_te(topi.fast_tanh, call.args[0], primfunc_name_hint="tanh")


def cpu_legalize_map() -> dict:
    """``LegalizeOps(customize_legalize_map=...)`` for CPU builds."""
    return {"relax.erf": _erf, "relax.nn.gelu": _gelu, "relax.exp": _exp,
            "relax.nn.softmax": _softmax, "relax.sigmoid": _sigmoid, "relax.tanh": _tanh}


__all__ = ["cpu_legalize_map"]
