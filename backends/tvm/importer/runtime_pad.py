"""ONNX ``Pad`` whose ``pads`` (and ``axes``, ``constant_value``) are computed at run time.

TVM's converter reads ``pads`` only as a constant (``'Var' object has no attribute
'value'``). The output shape is ``input + begin + end`` per axis, so kiln, which builds
static shapes, takes it from the declared output shape (:func:`annotate_runtime_pads`
writes it on the node as :data:`OUTPUT_SHAPE_ATTR` before import; no declared shape:
refused as before). How the padding splits between the two ends is only known at run
time, so one kernel reads ``pads`` (and ``axes``) and maps each output index back to its
source ``s = o - begin``: ``constant`` (``constant_value`` outside ``[0, n)``), ``edge``
(clamped), ``reflect`` (mirrored, period ``2 (n - 1)``) and ``wrap`` (``s mod n``).
Negative pads (cropping) need nothing special. The declared output shape must agree
with the runtime pads; kiln does not check it at run time.
"""

from __future__ import annotations

import onnx

from .expr_types import attr_str, dtype_of, static_shape
from .static_operands import annotate_declared_out

#: The attribute kiln writes on a runtime-pads Pad: the declared output shape.
OUTPUT_SHAPE_ATTR = "kiln_output_shape"

MODES = ("constant", "edge", "reflect", "wrap")


class RuntimePadError(ValueError):
    """A Pad with runtime pads kiln cannot lower (the importer reports the node)."""


def annotate_runtime_pads(model: onnx.ModelProto) -> int:
    """Write the declared output shape on each Pad (opset >= 11) whose ``pads`` is neither
    an initializer nor a Constant's output (in place); returns how many."""
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    if opset < 11:
        return 0
    constants = {t.name for t in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    todo = [n for n in graph.node if n.op_type == "Pad" and n.domain in ("", "ai.onnx")
            and len(n.input) > 1 and n.input[1] not in ("", *constants)
            and not any(a.name == OUTPUT_SHAPE_ATTR for a in n.attribute)]
    return annotate_declared_out(model, todo, OUTPUT_SHAPE_ATTR)


def emit_runtime_pad(bb, inputs, out_shape: list[int], mode: str):
    """``Pad(x, pads[, constant_value[, axes]])`` for the static ``out_shape``, the pads
    (and axes) read at run time."""
    from tvm import te, tirx

    x, pads = inputs[0], inputs[1]
    value = inputs[2] if len(inputs) > 2 else None
    axes = inputs[3] if len(inputs) > 3 else None
    shape = static_shape(x)
    rank = len(shape)
    if mode not in MODES:
        raise RuntimePadError(f"mode {mode!r} with pads computed at run time")
    if len(out_shape) != rank:
        raise RuntimePadError(f"declared output rank {len(out_shape)} for input rank {rank}")
    count = rank if axes is None else static_shape(axes)[0]
    if static_shape(pads) != [2 * count]:
        raise RuntimePadError(f"pads of shape {static_shape(pads)} for {count} axes")
    if mode != "constant" and any(n == 0 and o for n, o in zip(shape, out_shape)):
        raise RuntimePadError(f"{mode} padding of an empty axis")
    dtype = dtype_of(x)

    def i64(v):
        return tirx.const(v, "int64")

    def begins(p, a):
        if a is None:
            return [p[i].astype("int64") for i in range(rank)]
        out = []
        for i in range(rank):
            total = i64(0)
            for k in range(count):
                ax = a[k].astype("int64")
                ax = tirx.Select(ax < i64(0), ax + i64(rank), ax)
                total = total + tirx.Select(ax == i64(i), p[k].astype("int64"), i64(0))
            out.append(total)
        return out

    def source(s, n: int):
        if mode == "edge":
            return tirx.max(tirx.min(s, i64(n - 1)), i64(0))
        if mode == "wrap":
            return tirx.floormod(s, i64(n))
        if n == 1:  # reflect over one element
            return i64(0)
        period = 2 * (n - 1)
        m = tirx.floormod(s, i64(period))
        return tirx.Select(m < i64(n), m, i64(period) - m)

    def compute(data, p, *rest):
        fill = rest[0] if value is not None else None
        a = rest[-1] if axes is not None else None
        starts = begins(p, a)

        def element(*index):
            src = [idx.astype("int64") - b for idx, b in zip(index, starts)]
            if mode != "constant":
                return data[tuple(source(s, n) for s, n in zip(src, shape))]
            inside = tirx.const(True, "bool")
            for s, n in zip(src, shape):
                inside = tirx.And(inside, tirx.And(s >= i64(0), s < i64(n)))
            if not all(shape):  # an empty input: everything is padding
                picked = None
            else:
                picked = data[tuple(tirx.max(tirx.min(s, i64(n - 1)), i64(0))
                                    for s, n in zip(src, shape))]
            if fill is None:
                pad = tirx.const(0, dtype)
            else:
                pad = fill[()] if not fill.shape else fill[(0,) * len(fill.shape)]
                pad = pad.astype(dtype)
            return pad if picked is None else tirx.Select(inside, picked, pad)

        return te.compute(out_shape, element, name="kiln_runtime_pad")

    args = [x, pads] + ([value] if value is not None else []) + \
        ([axes] if axes is not None else [])
    return bb.emit_te(compute, *args, primfunc_name_hint="kiln_runtime_pad")


class RuntimePad:
    """ONNX ``Pad`` through TVM's converter when ``pads`` is constant; pads computed at
    run time go to :func:`emit_runtime_pad` for the declared output shape."""

    def __init__(self, fallback) -> None:
        self.fallback = fallback

    def get_converter(self, opset: int):
        fallback = self.fallback.get_converter(opset)

        def convert(bb, inputs, attr, params):
            import tvm

            declared = attr.pop(OUTPUT_SHAPE_ATTR, None)  # kiln's, never TVM's
            if opset < 11 or len(inputs) < 2 or isinstance(inputs[1], tvm.ir.GenericConst):
                return fallback(bb, inputs, attr, params)  # TVM's onnx_input: missing -> None
            inputs = list(inputs)
            if declared is None:
                raise RuntimePadError("pads computed at run time need the output's "
                                      "declared static shape")
            try:
                static_shape(inputs[0])
            except (TypeError, ValueError, AttributeError):
                raise RuntimePadError("runtime pads need an input of a static shape") from None
            mode = attr_str(attr.get("mode", b"constant"))
            return emit_runtime_pad(bb, inputs, [int(d) for d in declared], mode)

        return convert
