"""The ONNX ``Resize`` converter: constant scales/sizes as per-axis gathers
(:mod:`.resize`), scales computed at run time for a declared output shape
(:mod:`.resize_scales`), anything else to TVM's converter."""

from __future__ import annotations

import numpy as np

from .expr_types import dtype_of, static_shape
from .resize import (
    ResizeAttributeError,
    constant_operand,
    emit_axis_resize,
    plan_resize,
    resize2d_form,
    resize_mode,
)
from .resize_scales import OUTPUT_SHAPE_ATTR, emit_runtime_scales_resize


def _over_every_axis(bb, inputs: list, attr: dict, shape: list[int], opset: int) -> list:
    """``inputs`` with roi/scales/sizes given over ``axes`` (opset 18) written for every
    axis and ``axes`` dropped from ``attr`` (in place): TVM's converter ignores ``axes``
    (a runtime roi over axes [2, 3] failed with 'list index out of range'). The roi may be
    computed; scales and sizes must be constants (else ``inputs`` are left as they are)."""
    from tvm import relax

    rank = len(shape)
    if opset < 18 or "axes" not in attr:
        return inputs
    axes = [int(a) % rank for a in attr["axes"]]
    try:
        scales, sizes = constant_operand(inputs[2], np.float32), constant_operand(inputs[3],
                                                                                 np.int64)
    except TypeError:
        return inputs
    inputs = list(inputs)
    for index, given, fill in ((2, scales, [1.0] * rank), (3, sizes, list(shape))):
        if given is not None:
            for a, v in zip(axes, given.reshape(-1).tolist()):
                fill[a] = v
            inputs[index] = relax.const(np.asarray(fill, given.dtype))
    roi = inputs[1]
    if roi is not None:
        dtype = dtype_of(roi)
        n = len(axes)

        def bound(i: int, end: bool):
            if i not in axes:
                return relax.const(np.full([1], 1.0 if end else 0.0, dtype))
            j = axes.index(i) + (n if end else 0)
            return relax.op.strided_slice(roi, axes=[0], begin=[j], end=[j + 1])

        inputs[1] = bb.normalize(relax.op.concat(
            [bound(i, False) for i in range(rank)] + [bound(i, True) for i in range(rank)],
            axis=0))
    del attr["axes"]
    return inputs


class SeparableResize:
    """ONNX ``Resize`` with constant scales/sizes as per-axis gathers; others go to
    ``fallback`` (TVM's converter)."""

    def __init__(self, fallback) -> None:
        self.fallback = fallback

    def get_converter(self, opset: int):
        fallback = self.fallback.get_converter(opset)

        def convert(bb, inputs, attr, params):
            declared = attr.pop(OUTPUT_SHAPE_ATTR, None)  # kiln's, never TVM's
            inputs = list(inputs) + [None] * 4
            x = inputs[0]
            try:
                shape = static_shape(x)
            except (TypeError, ValueError, AttributeError):
                return fallback(bb, inputs, attr, params)
            operands = {"scales": (inputs[1], np.float32)} if opset < 11 else {
                "roi": (inputs[1], np.float32), "scales": (inputs[2], np.float32),
                "sizes": (inputs[3], np.int64)}
            values = {}
            for name, (expr, dtype) in operands.items():
                try:
                    values[name] = constant_operand(expr, dtype)
                except TypeError:
                    if name != "scales":  # TVM's converter takes a runtime roi
                        return fallback(bb, _over_every_axis(bb, inputs, attr, shape, opset),
                                        attr, params)
                    # runtime scales change the numbers, not just the shape (sizes fed
                    # by a model input were fixed by static_operands): TVM has no form;
                    # kiln's reads them at run time for the declared output shape
                    if declared is None or inputs[3] is not None:
                        raise ResizeAttributeError(
                            "scales computed at run time and no declared output shape "
                            "(kiln builds static shapes: declare it, or give constant "
                            "scales, or sizes)") from None
                    how = resize_mode(attr, opset)
                    if how.mode != "nearest" and not dtype_of(x).startswith(("float",
                                                                             "bfloat")):
                        return fallback(bb, inputs, attr, params)
                    return emit_runtime_scales_resize(bb, x, expr, [int(d) for d in declared],
                                                      attr, opset, how)
            roi, scales, sizes = (values.get(k) for k in ("roi", "scales", "sizes"))
            how = resize_mode(attr, opset)
            if how.mode != "nearest" and not dtype_of(x).startswith(("float", "bfloat")):
                return fallback(bb, inputs, attr, params)
            plan = plan_resize(shape, attr, opset, roi, scales, sizes)
            form = resize2d_form(plan, how)
            if form is not None:
                from tvm import relax

                return relax.op.image.resize2d(
                    x, size=relax.ShapeExpr(form), roi=[0.0] * 4, layout="NCHW",
                    method="nearest_neighbor" if how.mode == "nearest" else how.mode,
                    coordinate_transformation_mode=how.coordinates,
                    rounding_method=how.nearest if how.mode == "nearest" else "",
                    cubic_alpha=how.cubic_a, cubic_exclude=0)
            # downsampled axes first: the later kernels read less
            order = sorted((a for a, p in enumerate(plan) if p is not None
                            and (p.size_out != p.size_in or p.scale != 1.0
                                 or (how.coordinates == "tf_crop_and_resize"
                                     and p.roi != (0.0, 1.0)))),
                           key=lambda a: plan[a].size_out / plan[a].size_in)
            y = x
            for a in order:
                y = emit_axis_resize(bb, y, a, plan[a], how)
            return y

        return convert
