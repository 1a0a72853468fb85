"""ONNX ``NonMaxSuppression`` whose ``max_output_boxes_per_class``, ``iou_threshold`` or
``score_threshold`` is computed at run time (a graph input, say).

TVM's converter reads those operands only as constants (anything else becomes 0 / 0.5 /
0.0), and Relax's legalization of ``vision.all_class_non_max_suppression`` replaces a
runtime box limit by the box count. TOPI's kernel itself takes all three as tensors, so
kiln calls it directly:

- the limit is clamped to ``[0, num_boxes]`` and made int32 (an int64 limit past 2^31
  would wrap in TOPI's int32 counters; ONNX allows any non-negative value, 0 selects
  nothing);
- the IoU threshold is moved to the next float32 up (ONNX suppresses when ``IoU >
  threshold``, TOPI when ``>=``; the two agree on float32 IoUs), as for constants;
- the rows buffer has ``batch * classes * max(num_boxes, 10)`` rows: TOPI's collect
  kernel zero-fills ``batch * classes * 10`` rows when the limit is a tensor, so a
  smaller buffer would be written past its end; the valid rows (the total TOPI counts,
  each class clamped to the limit) are sliced off at run time as Relax's legalization
  does (a data-dependent output shape, like ``NonZero``'s).
"""

from __future__ import annotations

import numpy as np

from .expr_types import static_shape
from .nms_loop import greedy_loop

#: TOPI's collect kernel zero-fills ``batch * classes * this`` rows for a tensor limit
TOPI_TENSOR_LIMIT_ROWS = 10


def _corner_boxes(bb, boxes):
    """``center_point_box=1`` boxes ``[xc, yc, w, h]`` as corners ``[y1, x1, y2, x2]``."""
    from tvm import relax

    op = relax.op
    parts = bb.emit(op.split(boxes, 4, axis=2))
    xc, yc, w, h = (bb.emit(relax.TupleGetItem(parts, i)) for i in range(4))
    two = relax.const(2.0, str(boxes.ty.dtype))
    half_w, half_h = op.divide(w, two), op.divide(h, two)
    return bb.emit(op.concat([op.subtract(yc, half_h), op.subtract(xc, half_w),
                              op.add(yc, half_h), op.add(xc, half_w)], axis=2))


def _scalar(bb, value, dtype: str, default):
    """A 0-d ``dtype`` tensor of ``value`` (a constant ``default`` when absent)."""
    from tvm import relax

    if value is None:
        return relax.const(np.array(default, dtype))
    value = bb.emit(relax.op.reshape(value, [1]))
    value = bb.emit(relax.op.take(value, relax.const(0, "int64"), axis=0))
    return value if str(value.ty.dtype) == dtype else bb.emit(relax.op.astype(value, dtype))


def _next_float_up(bb, x):
    """``nextafter(x, +inf)`` of a 0-d float32 tensor (its bits + 1, - 1 below zero)."""
    from tvm import te, tirx

    def compute(t):
        def value():
            v = t[()]
            bits = tirx.reinterpret("int32", v)
            up = tirx.Select(v < tirx.const(0.0, "float32"), bits - 1, bits + 1)
            # +0 and -0 both go to the smallest positive subnormal (bits 1)
            up = tirx.Select(v == tirx.const(0.0, "float32"), tirx.const(1, "int32"), up)
            return tirx.reinterpret("float32", up)

        return te.compute((), value, name="kiln_iou_next_up")

    return bb.emit_te(compute, x, primfunc_name_hint="kiln_iou_next_up")


def _clamped_limit(bb, limit, num_boxes: int):
    """The per-class box limit as an int32 ``[1]`` tensor within ``[0, num_boxes]``."""
    from tvm import te, tirx

    def compute(t):
        def value(i):
            v = t[()]
            v = tirx.max(tirx.min(v, tirx.const(num_boxes, "int64")), tirx.const(0, "int64"))
            return v.astype("int32")

        return te.compute((1,), value, name="kiln_nms_limit")

    return bb.emit_te(compute, limit, primfunc_name_hint="kiln_nms_limit")


def emit_runtime_nms(bb, inputs, center_point_box: int):
    """NonMaxSuppression on runtime operands; ``inputs`` are the node's five (None:
    absent). Returns ``selected_indices`` ``[n, 3]`` int64 (``n`` known at run time)."""
    from tvm import relax, te, tirx, topi

    boxes, scores, limit, iou, score = (list(inputs) + [None] * 5)[:5]
    batch, classes, num_boxes = static_shape(scores)
    if center_point_box:
        boxes = _corner_boxes(bb, boxes)
    limit = _scalar(bb, limit, "int64", 0)
    limit = _clamped_limit(bb, limit, num_boxes)
    iou = _next_float_up(bb, _scalar(bb, iou, "float32", 0.0))
    score = _scalar(bb, score, "float32", float(np.finfo(np.float32).min))
    rows = batch * classes * max(num_boxes, TOPI_TENSOR_LIMIT_ROWS)

    def nms(b, s, k, t, m):
        return topi.vision.all_class_non_max_suppression(
            b, s, k, t, m, output_format="onnx", output_shape=(rows, 3))

    with greedy_loop():  # kiln's per-class parallel greedy loop (.nms_loop)
        result = bb.emit_te(nms, boxes, scores, limit, iou, score,
                            primfunc_name_hint="kiln_nms")
    selected = bb.emit(relax.TupleGetItem(result, 0))
    total = bb.emit(relax.TupleGetItem(result, 1))

    def bounds(count):
        begin = te.compute((2,), lambda i: tirx.const(0, "int64"), name="begin")
        end = te.compute((2,), lambda i: tirx.if_then_else(
            i == 0, count[0].astype("int64"), tirx.const(3, "int64")), name="end")
        strides = te.compute((2,), lambda i: tirx.const(1, "int64"), name="strides")
        return [begin, end, strides]

    parts = bb.emit_te(bounds, total, primfunc_name_hint="kiln_nms_rows")
    begin, end, strides = (bb.emit(relax.TupleGetItem(parts, i)) for i in range(3))
    return bb.emit(relax.op.dynamic_strided_slice(selected, begin, end, strides))
