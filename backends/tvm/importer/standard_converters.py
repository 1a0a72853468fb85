"""kiln's converters for standard ONNX ops whose TVM conversion kernels cannot use well.

Each takes the cases it improves and hands the rest to TVM's own converter
(``fallback``):

- ``Sum`` as a chain of broadcasting adds (TVM stacks the inputs into a 5-D tensor);
- ``Clip`` with constant bounds as Relax ``maximum``/``minimum`` (layout conversion
  sees through them; TVM's prebuilt kernels it cannot);
- ``HardSigmoid`` / ``HardSwish`` the same way (TVM's ``relax.clip`` made layout
  conversion put two transposes around every HardSwish of a channels-last CNN);
- ``Elu`` with its constants in the input's type (float16);
- ``ConvTranspose`` whose kernel equals its stride as a 1x1 conv + pixel shuffle;
- ``ScatterND`` writing every row once as an injective row gather;
- ``NonMaxSuppression`` with ONNX's defaults and IoU comparison (runtime operands: :mod:`.runtime_nms`).
"""

from __future__ import annotations

import numpy as np

from .decode import INJECTIVE
from .expr_types import attr_str, dtype_of, static_shape


class SumAsAdds:
    """ONNX ``Sum`` as a chain of broadcasting adds.

    TVM's importer stacks the inputs (broadcast_to + stack + sum over a new axis): a
    5-D intermediate that layout conversion cannot follow and the kernels must
    materialize. Elementwise adds fuse into the producing conv's epilogue instead.
    """

    @classmethod
    def get_converter(cls, opset: int):
        def convert(bb, inputs, attr, params):
            from tvm import relax

            total = inputs[0]
            for term in inputs[1:]:
                total = relax.op.add(total, term)
            return total

        return convert


def _constant_bound(expr) -> float | None:
    """A Clip bound as a float when it is a scalar constant (NaN: no bound), else raise."""
    import tvm

    if expr is None:
        return None
    if not isinstance(expr, tvm.ir.GenericConst) or expr.value.numpy().size != 1:
        raise TypeError("not a constant scalar")
    value = float(expr.value.numpy().reshape(()))
    return None if np.isnan(value) else value


class ClipAsMinMax:
    """ONNX ``Clip`` with constant bounds as Relax ``maximum``/``minimum`` with scalars.

    TVM's importer emits prebuilt TensorIR kernels (and NaN checks of the bounds) that
    layout conversion cannot see through; Relax's elementwise ops it can. Clips with
    computed bounds keep the importer's conversion.
    """

    def __init__(self, fallback) -> None:
        self.fallback = fallback

    def get_converter(self, opset: int):
        fallback = self.fallback.get_converter(opset)

        def convert(bb, inputs, attr, params):
            from tvm import relax

            x = inputs[0]
            dtype = x.ty.dtype
            try:
                if opset < 11:
                    lo = attr.get("min")
                    hi = attr.get("max")
                    lo = None if lo is None else float(lo)
                    hi = None if hi is None else float(hi)
                else:
                    extra = list(inputs[1:]) + [None, None]
                    lo, hi = _constant_bound(extra[0]), _constant_bound(extra[1])
            except TypeError:
                return fallback(bb, inputs, attr, params)
            if not str(dtype).startswith("float"):
                return fallback(bb, inputs, attr, params)
            if lo is not None:
                x = relax.op.maximum(x, relax.const(lo, dtype))
            if hi is not None:
                x = relax.op.minimum(x, relax.const(hi, dtype))
            return x

        return convert


def _hard_sigmoid(x, alpha: float, beta: float):
    """``max(0, min(1, alpha * x + beta))`` with the activation first in every op."""
    from tvm import relax

    dtype = x.ty.dtype
    y = relax.op.add(relax.op.multiply(x, relax.const(alpha, dtype)), relax.const(beta, dtype))
    return relax.op.minimum(relax.op.maximum(y, relax.const(0.0, dtype)), relax.const(1.0, dtype))


class _FloatOnly:
    """A converter for float inputs (``convert_float``); other dtypes go to TVM's."""

    def __init__(self, fallback) -> None:
        self.fallback = fallback

    def get_converter(self, opset: int):
        fallback = self.fallback.get_converter(opset)

        def convert(bb, inputs, attr, params):
            if not str(inputs[0].ty.dtype).startswith("float"):
                return fallback(bb, inputs, attr, params)
            return self.convert_float(inputs[0], attr)

        return convert

    def convert_float(self, x, attr):
        raise NotImplementedError


class HardSigmoidAsMinMax(_FloatOnly):
    """ONNX ``HardSigmoid`` as multiply-add and ``maximum``/``minimum`` (float inputs)."""

    def convert_float(self, x, attr):
        return _hard_sigmoid(x, float(attr.get("alpha", 0.2)), float(attr.get("beta", 0.5)))


class HardSwishAsMinMax(_FloatOnly):
    """ONNX ``HardSwish``: ``x * hard_sigmoid(x, 1/6, 1/2)`` (float inputs)."""

    def convert_float(self, x, attr):
        from tvm import relax

        return relax.op.multiply(x, _hard_sigmoid(x, 1.0 / 6.0, 0.5))


class EluInInputType(_FloatOnly):
    """ONNX ``Elu`` as TVM writes it, ``relu(x) - alpha * relu(1 - exp(x))``, with its
    constants in ``x``'s type (TVM's are float32: float16 Elu, and Celu's function body,
    failed to import on a float32 - float16 subtract)."""

    def convert_float(self, x, attr):
        from tvm import relax

        dtype = x.ty.dtype
        tail = relax.op.nn.relu(relax.op.subtract(relax.const(1.0, dtype), relax.op.exp(x)))
        scaled = relax.op.multiply(relax.const(-float(attr.get("alpha", 1.0)), dtype), tail)
        return relax.op.add(scaled, relax.op.nn.relu(x))


def _as_ints(values, default: list[int]) -> list[int]:
    return [int(v) for v in values] if values is not None else default


class ConvTransposeAsConv:
    """ONNX ``ConvTranspose`` whose kernel equals its stride (no overlap: U-Net and
    DB-head upsamplers) as a 1x1 ``conv2d`` to ``C_out * kH * kW`` channels followed by
    a pixel shuffle. Each output pixel then takes exactly one kernel tap, so no
    multiply-by-zero of a dilated input is done, and the 1x1 conv is a GEMM for kiln's
    contraction rule. Other ConvTransposes keep the importer's conversion.
    """

    def __init__(self, fallback) -> None:
        self.fallback = fallback

    def get_converter(self, opset: int):
        fallback = self.fallback.get_converter(opset)

        def convert(bb, inputs, attr, params):
            import tvm
            from tvm import relax

            x, weight = inputs[0], inputs[1]
            bias = inputs[2] if len(inputs) > 2 else None
            if not (isinstance(weight, tvm.ir.GenericConst)
                    and getattr(x.ty, "ndim", -1) == 4
                    and (bias is None or isinstance(bias, tvm.ir.GenericConst))):
                return fallback(bb, inputs, attr, params)
            w = weight.value.numpy()
            kernel = _as_ints(attr.get("kernel_shape"), list(w.shape[2:]))
            strides = _as_ints(attr.get("strides"), [1, 1])
            plain = (int(attr.get("group", 1)) == 1
                     and _as_ints(attr.get("dilations"), [1, 1]) == [1, 1]
                     and _as_ints(attr.get("pads"), [0] * 4) == [0] * 4
                     and _as_ints(attr.get("output_padding"), [0, 0]) == [0, 0]
                     and "output_shape" not in attr
                     and attr.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
                     and kernel == strides == list(w.shape[2:]))
            if not plain:
                return fallback(bb, inputs, attr, params)
            c_in, c_out, kh, kw = w.shape
            # W1[co*kh*kw + a*kw + b, ci] = W[ci, co, a, b]
            w1 = np.ascontiguousarray(w.transpose(1, 2, 3, 0).reshape(c_out * kh * kw, c_in, 1, 1))
            n, _, h, wd = (int(d) for d in x.ty.shape.values)
            z = relax.op.nn.conv2d(x, relax.const(w1, str(w.dtype)))
            z = relax.op.reshape(z, (n, c_out, kh, kw, h, wd))
            z = relax.op.permute_dims(z, [0, 1, 4, 2, 5, 3])
            y = relax.op.reshape(z, (n, c_out, h * kh, wd * kw))
            if bias is not None:
                b = bias.value.numpy().reshape(1, c_out, 1, 1)
                y = relax.op.add(y, relax.const(b, str(b.dtype)))
            return y

        return convert


def row_permutation(indices, rows: int) -> np.ndarray | None:
    """``inverse`` with ``out[r] = updates[inverse[r]]`` when a constant ScatterND
    ``indices[rows, 1]`` writes every row once, else None."""
    import tvm

    if not isinstance(indices, tvm.ir.GenericConst):
        return None
    order = indices.value.numpy()
    if order.shape != (rows, 1) or order.dtype.kind not in "iu":
        return None
    order = order[:, 0].astype(np.int64)
    order = np.where(order < 0, order + rows, order)
    if not np.array_equal(np.sort(order), np.arange(rows)):
        return None
    # int64 like the weight's own indices: the gathered row is substituted into the
    # decode's index expressions (Concat's ``64 <= r``) when it is inlined
    inverse = np.empty(rows, np.int64)
    inverse[order] = np.arange(rows, dtype=np.int64)
    return inverse


class ScatterRowsAsGather:
    """ScatterND that writes every row of ``data`` once (constant indices ``[K, 1]``, a
    permutation: salient_split's ``ScatterND(zeros, rows, Concat(W_s, W_b))``) as an
    injective row gather of ``updates``: ``data`` is never read, and the gather fuses
    with the weight's decode (then into its MatMul, ``fuse_decode``) instead of
    scattering a float32 weight into memory. Other ScatterNDs go to ``fallback``.
    """

    def __init__(self, fallback) -> None:
        self.fallback = fallback

    def get_converter(self, opset: int):
        fallback = self.fallback.get_converter(opset)

        def convert(bb, inputs, attr, params):
            from tvm import relax, te

            data, indices, updates = inputs[0], inputs[1], inputs[2]
            reduction = attr_str(attr.get("reduction", "none"))
            try:
                shape = static_shape(data)
                same = static_shape(updates) == shape and dtype_of(updates) == dtype_of(data)
            except (AttributeError, TypeError, ValueError):
                same = False
            inverse = row_permutation(indices, shape[0]) \
                if same and shape and reduction == "none" else None
            if inverse is None:
                return fallback(bb, inputs, attr, params)

            def compute(u, inv):
                return te.compute(shape, lambda r, *rest: u[(inv[r], *rest)],
                                  name="kiln_permute_rows")

            return bb.emit_te(compute, updates, relax.const(inverse, "int64"),
                              primfunc_name_hint="kiln_permute_rows",
                              primfunc_attrs=INJECTIVE)

        return convert


class NonMaxSuppressionError(ValueError):
    """A NonMaxSuppression kiln cannot lower (the importer reports the node)."""


class ConstantThresholdNMS:
    """ONNX ``NonMaxSuppression`` through TVM's converter, with its scalar operands checked.

    TVM's converter reads ``max_output_boxes_per_class`` / ``iou_threshold`` /
    ``score_threshold`` only when they are constants and otherwise substitutes 0 / 0.5 /
    0.0 (silently no boxes, or other boxes, than ONNX Runtime); absent ones it sets to 0.5
    and 0.0 where ONNX means 0 and "no score filter". kiln passes ONNX's defaults; operands
    computed at run time go to kiln's NMS kernel as tensors (:mod:`.runtime_nms`).
    """

    #: ONNX's defaults for absent operands: no score threshold is -inf, which kiln's NMS
    #: legalization (:mod:`.nms_loop`) reads as "every box is a candidate" (-inf too).
    DEFAULTS = ((2, "max_output_boxes_per_class", 0, "int64"), (3, "iou_threshold", 0.0, "float32"),
                (4, "score_threshold", float("-inf"), "float32"))

    def __init__(self, fallback) -> None:
        self.fallback = fallback

    def get_converter(self, opset: int):
        fallback = self.fallback.get_converter(opset)

        def convert(bb, inputs, attr, params):
            import tvm
            from tvm import relax

            inputs = list(inputs) + [None] * (5 - len(inputs))
            if any(v is not None and not isinstance(v, tvm.ir.GenericConst)
                   for v in inputs[2:5]):
                from .runtime_nms import emit_runtime_nms

                try:
                    static_shape(inputs[1])
                except (TypeError, ValueError, AttributeError):
                    raise NonMaxSuppressionError(
                        "runtime operands need scores of a static shape") from None
                return emit_runtime_nms(bb, inputs, int(attr.get("center_point_box", 0)))
            for index, _name, default, dtype in self.DEFAULTS:
                if inputs[index] is None:
                    inputs[index] = relax.const(np.array([default], dtype))
            # ONNX suppresses a box whose IoU is > the threshold, TOPI's when it is >=:
            # the next float32 up makes them agree (on float32 IoUs)
            iou = inputs[3].value.numpy().astype(np.float32).reshape(-1)[:1]
            inputs[3] = relax.const(np.nextafter(iou, np.float32(np.inf)), "float32")
            return fallback(bb, inputs, attr, params)

        return convert


class RMSNormalizationAsRelax:
    """ONNX ``RMSNormalization`` (opset 23): ``x / sqrt(mean(x^2 over axis..-1) + eps) *
    scale`` with the mean kept at full rank (TVM's conversion over every axis made a 0-d
    tensor its legalized kernels mis-index: 'Tensor dimension mismatch'). Computed in
    float32 (``stash_type`` 1, the default) for float16/bfloat16 inputs."""

    @classmethod
    def get_converter(cls, opset: int):
        def convert(bb, inputs, attr, params):
            from tvm import relax

            op = relax.op
            x, scale = inputs[0], inputs[1]
            dtype = dtype_of(x)
            rank = len(static_shape(x))
            axis = int(attr.get("axis", -1)) % rank
            work = "float32" if int(attr.get("stash_type", 1)) == 1 else dtype
            xs = x if dtype == work else op.astype(x, work)
            mean = op.mean(op.multiply(xs, xs), axis=list(range(axis, rank)), keepdims=True)
            eps = relax.const(float(attr.get("epsilon", 1e-5)), work)
            y = op.multiply(xs, op.rsqrt(op.add(mean, eps)))
            if dtype != work:
                y = op.astype(y, dtype)
            return op.multiply(y, scale)

        return convert
