"""The converter of :data:`.internal_ops.INT8_DENSE`: one TE kernel of integer dot products
and a requantizing epilogue (:mod:`.int8_chains` gives the math and the packed layout)::

    acc[m, n] = sum_{i, g} int32(a[m, i*G + g]) * int32(w[n / L, i, n % L, g])
    v[m, n]   = act((acc - comp[n]) * mult[n] + bias[n])
    y[m, n]   = sat(rne(v / sy) + zy)        (or v itself, float32)

``a`` is ``x_q`` (uint8; int8 activations arrive shifted by +128 in a small kernel of
their own, as do activations widened to int16 for AVX2's int16 weights). The blocks are
named :data:`kiln.backends.tvm.kernel_names.INT8_ACC` and
``INT8_OUTPUT``, which the ``int8_dense`` schedule rule finds and tensorizes (the blocks
between them, Gelu's ``fast_erf``/``fast_tanh`` from TOPI, are inlined into the epilogue).
The kernel is opaque to FuseOps (its epilogue already holds the chain's elementwise work).
"""

from __future__ import annotations

import math

from kiln.backends.tvm.kernel_names import INT8_ACC, INT8_OUTPUT

from .expr_types import attr_str, dtype_of, static_shape

#: FuseOps pattern kOpaque: nothing is fused into or onto the integer kernel.
OPAQUE = {"op_pattern": 8}
_RANGES = {"uint8": (0.0, 255.0), "int8": (-128.0, 127.0)}
SQRT_HALF = math.sqrt(0.5)
#: sqrt(2 / pi), Gelu's tanh form: 0.5 v (1 + tanh(sqrt(2/pi) (v + 0.044715 v^3))).
TANH_SCALE = math.sqrt(2.0 / math.pi)


def emit_int8_dense(bb, x, w, comp, mult, bias, *, k: int, n: int, x_signed: bool,
                    activation: str, out_dtype: str, out_scale: float, out_zero: int,
                    program: list | None = None, columns: int = 0):
    """``y`` [..., N] of the integer dense (see the module docstring) for ``x`` [..., K];
    only its first ``columns`` when N was padded to the lanes."""
    from tvm import relax, te

    x_shape = static_shape(x)
    rows = math.prod(x_shape[:-1])
    _, _, lanes, group = static_shape(w)
    a = bb.normalize(relax.op.reshape(x, [rows, k])) if len(x_shape) != 2 else x
    wide = dtype_of(w) == "int16"  # AVX2's exact vpmaddwd kernel reads int16 activations
    if x_signed:  # a = x + 128 as uint8 (the zero point was shifted with it)
        a = relax.op.add(relax.op.astype(a, "int16"), relax.const(128, "int16"))
        a = bb.normalize(a if wide else relax.op.astype(a, "uint8"))
    elif wide:
        a = bb.normalize(relax.op.astype(a, "int16"))

    rows_p = tile_rows(rows, n, lanes)

    def compute(at, wt, ct, mt, bt):
        i = te.reduce_axis((0, k // group), "i")
        g = te.reduce_axis((0, group), "g")
        acc = te.compute(
            (rows_p, n),
            lambda m, j: te.sum(at[last_row(m, rows, rows_p), i * group + g].astype("int32")
                                * wt[j // lanes, i, j % lanes, g].astype("int32"), axis=[i, g]),
            name=INT8_ACC)
        return requantize(acc, ct, mt, bt, activation=activation, program=program,
                          out_dtype=out_dtype, out_scale=out_scale, out_zero=out_zero)

    y = bb.emit_te(compute, a, w, comp, mult, bias, primfunc_name_hint="kiln_int8_dense",
                   primfunc_attrs=OPAQUE)
    y = trim(bb, y, rows, columns or n)
    if len(x_shape) != 2:
        y = bb.normalize(relax.op.reshape(y, [*x_shape[:-1], columns]))
    return y


def tile_rows(rows: int, n: int, lanes: int) -> int:
    """The kernel's row count: ``rows`` or a few more, so the register tile of the
    ``int8_dense`` rule divides it (``schedules.int8_dense.padded_rows``)."""
    from kiln.backends.tvm.schedules.int8_dense import padded_rows, registers_of

    return padded_rows(rows, n // lanes, registers_of(lanes))


def last_row(m, rows: int, rows_p: int):
    """Row ``m`` of the input, the extra rows of a padded kernel reading the last one."""
    from tvm import tirx

    return m if rows_p == rows else tirx.min(m, rows - 1)


def trim(bb, y, rows: int, columns: int):
    """``y`` [rows_p, N] without the padded rows and lanes (``[:rows, :columns]``)."""
    from tvm import relax

    rows_p, n = static_shape(y)
    if (rows_p, n) == (rows, columns):
        return y
    return bb.normalize(relax.op.strided_slice(y, axes=[0, 1], begin=[0, 0],
                                               end=[rows, columns]))


def requantize(acc, ct, mt, bt, *, activation: str, program: list | None, out_dtype: str,
               out_scale: float, out_zero: int):
    """The ``INT8_OUTPUT`` block on ``acc`` [..., N]: ``act((acc - comp) * mult + bias)``,
    then the elementwise tail ``program`` (:mod:`.int8_epilogue`), then ``Q`` (or float)."""
    from tvm import te, tirx

    from .int8_epilogue import builder

    shape = tuple(acc.shape)

    def real(*idx):
        j = idx[-1]
        return (acc(*idx) - ct[j]).astype("float32") * mt[j] + bt[j]

    act = _activation(activation, real, shape)
    if program:
        act = builder(program, act, shape)

    def epilogue(*idx):
        v = act(*idx)
        if out_dtype == "float32":
            return v
        low, high = _RANGES[out_dtype]
        v = tirx.round(v * tirx.const(1.0 / out_scale, "float32")) \
            + tirx.const(float(out_zero), "float32")
        v = tirx.min(tirx.max(v, tirx.const(low, "float32")), tirx.const(high, "float32"))
        return v.astype(out_dtype)

    return te.compute(shape, epilogue, name=INT8_OUTPUT)


def _activation(kind: str, real, shape):
    """``(m, j) -> act(real(m, j))``; Gelu through TOPI's vectorizable fast_erf/fast_tanh
    (their blocks are inlined into the epilogue by the schedule rule)."""
    from tvm import te, tirx, topi

    zero = tirx.const(0.0, "float32")
    if kind == "relu":
        return lambda *idx: tirx.max(real(*idx), zero)
    if kind == "gelu":
        erf = topi.fast_erf(te.compute(shape, lambda *idx: real(*idx) * SQRT_HALF,
                                       name="kiln_int8_gelu_arg"))
        return lambda *idx: real(*idx) * (0.5 + 0.5 * erf(*idx))
    if kind == "gelu_tanh":
        def inner(*idx):
            v = real(*idx)
            return TANH_SCALE * (v + 0.044715 * v * v * v)

        tanh = topi.fast_tanh(te.compute(shape, inner, name="kiln_int8_gelu_arg"))
        return lambda *idx: real(*idx) * (0.5 + 0.5 * tanh(*idx))
    return real


class Int8Dense:
    """Converter of the internal integer dense op (inputs x_q, w, comp, mult, bias)."""

    @staticmethod
    def get_converter(opset: int):
        del opset

        def convert(bb, inputs, attr, params):
            del params
            return emit_int8_dense(
                bb, *inputs[:5], k=int(attr["k"]), n=int(attr["n"]),
                x_signed=bool(attr["x_signed"]), activation=attr_str(attr["activation"]),
                out_dtype=attr_str(attr["out_dtype"]), out_scale=float(attr["out_scale"]),
                out_zero=int(attr["out_zero"]), program=program_of(attr),
                columns=int(attr.get("columns", 0)))

        return convert


def program_of(attr) -> list:
    """The node's elementwise tail program (``epilogue`` attribute, JSON; empty if none)."""
    import json

    text = attr_str(attr.get("epilogue", b"")) if "epilogue" in attr else ""
    return json.loads(text) if text else []
