"""ONNX ``Resize`` whose ``scales`` are computed at run time (a graph input, say).

The output size is ``floor(input * scale)``, so kiln, which builds static shapes, takes
it from the declared output shape (:func:`annotate_runtime_scales` writes it on the node
as :data:`OUTPUT_SHAPE_ATTR` before import; no declared shape: refused as before). The
scale itself still sets the coordinates (``x_orig = (x + 0.5) / scale - 0.5``, ...), so
each resized axis gets a small kernel that reads the scale from the ``scales`` tensor
and computes the tap tables that :func:`.resize.axis_taps` makes for a constant scale
(the gather kernel then reads them as it reads the constant ones): ``x_orig`` in float32 (as
ONNX Runtime does), the weights in float64 then float32, the same rounding, clamping,
``exclude_outside`` and ``antialias`` renormalization. With antialias the tap count
depends on the scale: the kernel takes the count for the smallest scale the output
size allows (``output / input``) plus one tap each side; the taps outside the kernel's
support weigh exactly 0. ``tf_crop_and_resize`` with runtime scales is refused.

Every axis the scales cover is resized except those of size 1 in and out (any scale
gives back the input there): an axis whose size does not change may still have a scale
other than 1 (``floor(4 * 1.2) = 4``).
"""

from __future__ import annotations

import numpy as np
import onnx

from .expr_types import dtype_of, static_shape
from .resize import ResizeAttributeError, ResizeMode, emit_tap_gather
from .static_operands import annotate_declared_out

#: The attribute kiln writes on a runtime-scales Resize: the declared output shape.
OUTPUT_SHAPE_ATTR = "kiln_output_shape"


def _scales_operand(node: onnx.NodeProto, opset: int) -> str:
    index = 1 if opset < 11 else 2
    return node.input[index] if len(node.input) > index else ""


def annotate_runtime_scales(model: onnx.ModelProto) -> int:
    """Write the declared output shape on each Resize whose ``scales`` is neither an
    initializer nor a Constant's output (in place); returns how many."""
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    constants = {t.name for t in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    todo = [n for n in graph.node if n.op_type == "Resize" and n.domain in ("", "ai.onnx")
            and _scales_operand(n, opset) not in ("", *constants)
            and not any(a.name == OUTPUT_SHAPE_ATTR for a in n.attribute)]
    return annotate_declared_out(model, todo, OUTPUT_SHAPE_ATTR)


def _coordinate(i, scale, n_in: int, n_out: int, how: ResizeMode):
    """``x_orig`` (float32 TIR) of output index ``i`` (as
    :func:`.resize.original_coordinates`, with a runtime ``scale``)."""
    from tvm import tirx

    def f(v):
        return tirx.const(v, "float32")

    x = i.astype("float32")
    mode = how.coordinates
    if mode == "asymmetric":
        return x / scale
    if mode == "half_pixel":
        return (x + f(0.5)) / scale - f(0.5)
    if mode == "pytorch_half_pixel":
        return (x + f(0.5)) / scale - f(0.5) if n_out > 1 else f(-0.5)
    if mode == "half_pixel_symmetric":
        adjustment = f(n_out) / (scale * f(n_in))
        offset = f(n_in) / f(2) * (f(1) - adjustment)
        return offset + (x + f(0.5)) / scale - f(0.5)
    if mode == "align_corners":
        return f(0.0) if n_out == 1 else x * (f(n_in) - f(1)) / (f(n_out) - f(1))
    raise ResizeAttributeError(f"coordinate_transformation_mode={mode!r} with runtime scales")


def _kernel(how: ResizeMode, d):
    """The linear or cubic kernel at float64 distances ``d`` (TIR)."""
    from tvm import tirx

    def f(v):
        return tirx.const(v, "float64")

    s = tirx.abs(d)
    if how.mode == "linear":
        return tirx.max(tirx.min(f(1.0) - s, f(1.0)), f(0.0))
    a = f(how.cubic_a)
    near = ((a + f(2)) * s - (a + f(3))) * s * s + f(1)
    far = ((a * s - f(5) * a) * s + f(8) * a) * s - f(4) * a
    return tirx.Select(s <= f(1), near, tirx.Select(s < f(2), far, f(0.0)))


def tap_offsets(how: ResizeMode, n_in: int, n_out: int) -> np.ndarray:
    """Tap offsets (relative to ``base``) enough for any scale that gives ``n_out``."""
    support = 1.0 if how.mode == "linear" else 2.0
    shrink = min(n_out / n_in, 1.0) if how.antialias and n_out else 1.0
    start = int(np.floor(-support / shrink) + 1) - (1 if how.antialias else 0)
    return np.arange(start, 2 - start)


def emit_runtime_taps(bb, scales, position: int, n_in: int, size_out: int, how: ResizeMode,
                      dtype: str):
    """The tap tables of one axis, from ``scales[position]`` at run time: indices
    ``[out, taps]`` int64 and (linear / cubic) weights ``[out, taps]`` in ``dtype``, as
    :func:`.resize.axis_taps` computes them for a constant scale."""
    from tvm import relax, te, tirx

    last = n_in - 1
    nearest = how.mode == "nearest"
    offsets = [0] if nearest else [int(o) for o in tap_offsets(how, n_in, size_out)]
    taps = len(offsets)

    def f64(v):
        return tirx.const(v, "float64")

    def i64(v):
        return tirx.const(v, "int64")

    def compute(table):
        scale = table[position].astype("float32")

        def base_ratio(j):
            xo = _coordinate(j, scale, n_in, size_out, how)
            low = tirx.floor(xo)
            whole = xo == low
            base = tirx.Select(whole, xo - tirx.const(1, "float32"), low).astype("int64")
            return whole, base, tirx.Select(whole, f64(1.0), (xo - low).astype("float64"))

        def tap(j, t):
            whole, base, ratio = base_ratio(j)
            if nearest:
                up = {"round_prefer_floor": ratio > f64(0.5),
                      "round_prefer_ceil": ratio >= f64(0.5),
                      "floor": tirx.const(False, "bool"), "ceil": tirx.const(True, "bool"),
                      "simple": scale < tirx.const(1.0, "float32")}[how.nearest]
                index = base + tirx.Select(tirx.Or(whole, up), i64(1), i64(0))
            else:
                index = base + i64(offsets[0]) + t
            return tirx.max(tirx.min(index, i64(last)), i64(0))

        indices = te.compute((size_out, taps), tap, name="kiln_resize_taps")
        if nearest:
            return indices
        shrink = tirx.min(scale, tirx.const(1.0, "float32")).astype("float64") \
            if how.antialias else f64(1.0)

        def raw(j, t):
            _, base, ratio = base_ratio(j)
            offset = (t + i64(offsets[0])).astype("float64")
            w = _kernel(how, (offset - ratio) * shrink)
            if how.exclude_outside:
                where = base + i64(offsets[0]) + t
                w = tirx.Select(tirx.Or(where < i64(0), where > i64(last)), f64(0.0), w)
            return w

        weights = te.compute((size_out, taps), raw, name="kiln_resize_raw_weights")
        if how.antialias or how.exclude_outside:
            k = te.reduce_axis((0, taps), name="k")
            total = te.compute((size_out,), lambda j: te.sum(weights[j, k], axis=k),
                               name="kiln_resize_weight_sum")
            weights = te.compute((size_out, taps), lambda j, t: weights[j, t] / total[j],
                                 name="kiln_resize_norm_weights")
        cast = te.compute((size_out, taps),
                          lambda j, t: weights[j, t].astype("float32").astype(dtype),
                          name="kiln_resize_weights")
        return [indices, cast]

    result = bb.emit_te(compute, scales, primfunc_name_hint="kiln_resize_taps")
    if nearest:
        return result, None
    return (bb.emit(relax.TupleGetItem(result, 0)), bb.emit(relax.TupleGetItem(result, 1)))


def emit_runtime_scales_resize(bb, x, scales, out_shape, attr, opset: int, how: ResizeMode):
    """The whole Resize: the scaled axes one kernel each, the shrinking ones first."""
    shape = static_shape(x)
    rank = len(shape)
    if len(out_shape) != rank:
        raise ResizeAttributeError(f"declared output rank {len(out_shape)} for input rank {rank}")
    if how.coordinates == "tf_crop_and_resize":
        raise ResizeAttributeError("tf_crop_and_resize with scales computed at run time")
    axes = [int(a) % rank for a in attr.get("axes", range(rank))] if opset >= 18 \
        else list(range(rank))
    if len(static_shape(scales)) != 1 or static_shape(scales)[0] != len(axes):
        raise ResizeAttributeError(f"scales of shape {static_shape(scales)} for {len(axes)} axes")
    if any(out_shape[a] != shape[a] for a in range(rank) if a not in axes):
        raise ResizeAttributeError("declared output shape changes an axis Resize leaves alone")
    work = [(p, a) for p, a in enumerate(axes) if not (shape[a] == 1 and out_shape[a] == 1)]
    work.sort(key=lambda pa: out_shape[pa[1]] / shape[pa[1]])
    y = x
    for position, axis in work:
        size_out = int(out_shape[axis])
        indices, weights = emit_runtime_taps(bb, scales, position, static_shape(y)[axis],
                                             size_out, how, dtype_of(x))
        y = emit_tap_gather(bb, y, axis, size_out, indices, weights)
    return y
