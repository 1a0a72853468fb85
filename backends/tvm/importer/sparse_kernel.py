"""The converter of :data:`.internal_ops.SPARSE_DENSE`: one TE kernel over packed rows::

    y[m, g*16 + l] = bias[g*16 + l]
                     + sum_j values[g, j, l] * x[m, columns[g, j]]        (shared)
                     + sum_j values[g, j, l] * x[m, columns[g, j, l]]     (gather)

(:mod:`.sparse_weights` packs the weight; padding entries have value 0.) The kernel's
block is named :data:`kiln.backends.tvm.kernel_names.SPARSE_DENSE`, which the
``sparse_dense`` schedule rule finds: a parallel loop over row groups, the 16 lanes as
one vector, the ``x`` rows' accumulators in registers across the ``j`` loop.
"""

from __future__ import annotations

from kiln.backends.tvm.kernel_names import SPARSE_BIAS, SPARSE_DENSE

from .expr_types import attr_str, static_shape


def emit_sparse_dense(bb, x, values, columns, bias=None, *, layout: str, n: int):
    """``x @ W`` (+ bias) with W packed as ``values``/``columns`` (see the module doc); an
    ``x`` of rank > 2 is reshaped to its rows and the result back."""
    import math

    from tvm import relax, te

    x_shape = static_shape(x)
    rows = math.prod(x_shape[:-1])
    if len(x_shape) != 2:
        x = bb.normalize(relax.op.reshape(x, [rows, x_shape[-1]]))
    _, width, group = static_shape(values)

    def compute(xt, vt, ct, *rest):
        j = te.reduce_axis((0, width), "j")

        def column(g, jj, lane):
            c = ct[g, jj] if layout == "shared" else ct[g, jj, lane]
            return c.astype("int32")

        y = te.compute(
            (rows, n),
            lambda m, o: te.sum(vt[o // group, j, o % group]
                                * xt[m, column(o // group, j, o % group)], axis=j),
            name=SPARSE_DENSE)
        if not rest:
            return y
        (bt,) = rest
        return te.compute((rows, n), lambda m, o: y[m, o] + bt[o], name=SPARSE_BIAS)

    args = [x, values, columns] + ([bias] if bias is not None else [])
    y = bb.emit_te(compute, *args, primfunc_name_hint="kiln_sparse_dense")
    if len(x_shape) != 2:
        y = bb.normalize(relax.op.reshape(y, [*x_shape[:-1], n]))
    return y


class SparseDense:
    """Converter of the internal sparse op (inputs x, values, columns[, bias])."""

    @staticmethod
    def get_converter(opset: int):
        del opset

        def convert(bb, inputs, attr, params):
            del params
            x, values, columns = inputs[0], inputs[1], inputs[2]
            bias = inputs[3] if len(inputs) > 3 and inputs[3] is not None else None
            return emit_sparse_dense(bb, x, values, columns, bias,
                                     layout=attr_str(attr["layout"]), n=int(attr["n"]))

        return convert
