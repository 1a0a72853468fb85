"""ONNX ``NonMaxSuppression`` whose ``max_output_boxes_per_class``, ``iou_threshold`` or
``score_threshold`` is computed at run time (a graph input, say).

TVM's converter reads those operands only as constants (anything else becomes 0 / 0.5 /
0.0), and Relax's legalization of ``vision.all_class_non_max_suppression`` replaces a
runtime box limit by the box count. kiln's NMS kernel (:func:`.nms_loop.nms_rows`) takes
all three as tensors:

- the limit is clamped to ``[0, num_boxes]`` and made int32 (ONNX allows any
  non-negative int64, 0 selects nothing);
- the IoU threshold is moved to the next float32 up (ONNX suppresses when ``IoU >
  threshold``, the kernel when ``>=``; the two agree on float32 IoUs), as for constants;
- the rows buffer has ``batch * classes * num_boxes`` rows; the valid ones (the total
  the kernel counts) are sliced off at run time (a data-dependent output shape, like
  ``NonZero``'s).
"""

from __future__ import annotations

import numpy as np

from .expr_types import static_shape
from .nms_loop import nms_rows, trimmed


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
    boxes, scores, limit, iou, score = (list(inputs) + [None] * 5)[:5]
    _, _, num_boxes = static_shape(scores)
    if center_point_box:
        boxes = _corner_boxes(bb, boxes)
    limit = _clamped_limit(bb, _scalar(bb, limit, "int64", 0), num_boxes)
    iou = _next_float_up(bb, _scalar(bb, iou, "float32", 0.0))
    score = None if score is None else _scalar(bb, score, "float32", None)
    result = bb.emit_te(nms_rows, boxes, scores, limit, iou, score,
                        primfunc_name_hint="kiln_nms")
    return trimmed(bb, result)[0]
