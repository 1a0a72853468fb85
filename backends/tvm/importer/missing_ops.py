"""Converters for standard ops TVM 0.27's importer lacks or gets wrong on mixed types.

- ``LpNormalization`` (p = 1 or 2 along ``axis``): ``x / sum(|x|)`` or
  ``x / sqrt(sum(x^2))``, the norm kept as a size-1 axis; a zero norm divides by 1
  (0 out, as ONNX Runtime and onnx's expected outputs have it);
- ``BitCast`` to an element type of the same width: the bits reinterpreted
  (``topi.reinterpret``; bool <-> 8-bit is a cast); a different width is refused;
- ``Pow`` with different base and exponent types, or on integers (TVM's converter
  needs one type and a float): the exponent is cast to the base's float type; an
  integer power is computed in float64 (exact for the results int64 holds below 2^53)
  and cast back, as ONNX Runtime truncates it;
- ``ReduceMax``/``ReduceMin`` starting from -inf/+inf (TVM starts from the finite
  extremes: an all -inf row gave -3.4e38), and on bool;
- ``CumProd`` with a constant axis (Relax's ``cumprod``);
- ``ReverseSequence`` (a gather along time from reversed step indices);
- ``EyeLike`` of a static shape (a constant; TVM refuses another ``dtype``);
- ``MaxPool`` (2-D) with its ``Indices`` output (the first tap equal to the maximum);
- ``SpaceToDepth`` with ``mode="CRD"`` (opset 24; TVM ignores ``mode``);
- ``OneHot`` with runtime ``values`` (its depth fixed from the output shape by
  :mod:`.static_operands` when an input feeds it).

Found by onnx's conformance cases (all refused before).
"""

from __future__ import annotations

from onnx import helper

from .expr_types import dtype_of, static_shape


def _width(dtype: str) -> int:
    if dtype == "bool":
        return 8
    return int("".join(ch for ch in dtype if ch.isdigit()) or 0)


class LpNormalization:
    """ONNX ``LpNormalization`` as a reduce and a divide."""

    @classmethod
    def get_converter(cls, opset: int):
        def convert(bb, inputs, attr, params):
            from tvm import relax

            x = inputs[0]
            p = int(attr.get("p", 2))
            if p not in (1, 2):
                raise ValueError(f"LpNormalization with p={p} (ONNX allows 1 or 2)")
            axis = int(attr.get("axis", -1))
            if p == 1:
                norm = relax.op.sum(relax.op.abs(x), axis=[axis], keepdims=True)
            else:
                norm = relax.op.sqrt(relax.op.sum(relax.op.multiply(x, x), axis=[axis],
                                                  keepdims=True))
            zero = relax.op.equal(norm, relax.op.zeros_like(norm))
            return relax.op.divide(x, relax.op.where(zero, relax.op.ones_like(norm), norm))

        return convert


class BitCast:
    """ONNX ``BitCast`` between element types of one width: the same bits, retyped."""

    @classmethod
    def get_converter(cls, opset: int):
        def convert(bb, inputs, attr, params):
            from tvm import topi

            x = inputs[0]
            target = str(helper.tensor_dtype_to_np_dtype(int(attr["to"])))
            source = dtype_of(x)
            if _width(source) != _width(target):
                raise ValueError(f"BitCast from {source} to {target} changes the element "
                                 "width (and the shape): kiln supports same-width casts")
            if "bool" in (source, target):  # one byte, 0 or 1: the value is the bits
                from tvm import relax

                return relax.op.astype(x, target)
            return bb.emit_te(topi.reinterpret, x, target)

        return convert


class MixedTypePow:
    """ONNX ``Pow`` on one float type, whatever the operands' types."""

    def __init__(self, base) -> None:
        self.base = base

    def get_converter(self, opset: int):
        fallback = self.base.get_converter(opset)

        def convert(bb, inputs, attr, params):
            from tvm import relax

            x, y = inputs[0], inputs[1]
            tx, ty = dtype_of(x), dtype_of(y)
            if tx.startswith(("float", "bfloat")):
                if ty != tx:
                    y = relax.op.astype(y, tx)
                return relax.op.power(x, y)
            if tx.startswith(("int", "uint")):
                power = relax.op.power(relax.op.astype(x, "float64"),
                                       relax.op.astype(y, "float64"))
                return relax.op.astype(power, tx)
            return fallback(bb, inputs, attr, params)

        return convert



class OneHotAnyValues:
    """ONNX ``OneHot`` with a constant depth and any ``values`` (TVM's converter takes
    constant values only): ``where(index == arange(depth), on, off)`` along ``axis``,
    negative indices counted from ``depth`` (an index out of range gives all ``off``)."""

    def __init__(self, base) -> None:
        self.base = base

    def get_converter(self, opset: int):
        fallback = self.base.get_converter(opset)

        def convert(bb, inputs, attr, params):
            import numpy as np
            import tvm
            from tvm import relax

            indices, depth_expr, values = inputs[0], inputs[1], inputs[2]
            if not isinstance(depth_expr, tvm.ir.GenericConst):
                return fallback(bb, inputs, attr, params)
            depth = int(np.asarray(depth_expr.value.numpy()).reshape(-1)[0])
            rank = len(indices.ty.shape.values) + 1
            axis = int(attr.get("axis", -1)) % rank
            index = relax.op.astype(indices, "int64")
            depth_const = relax.const(depth, "int64")
            index = relax.op.where(relax.op.less(index, relax.const(0, "int64")),
                                   relax.op.add(index, depth_const), index)
            positions = np.arange(depth, dtype=np.int64).reshape(
                [1] * axis + [depth] + [1] * (rank - axis - 1))
            hit = relax.op.equal(relax.op.expand_dims(index, axis), relax.const(positions, "int64"))
            off = relax.op.take(values, relax.const(0, "int64"), axis=0)
            on = relax.op.take(values, relax.const(1, "int64"), axis=0)
            return relax.op.where(hit, on, off)

        return convert


def _extreme(x, axes, keepdims: bool, largest: bool, name: str):
    """A max/min reduction of te tensor ``x`` over ``axes`` that starts from -inf/+inf
    (TVM's starts from the type's finite lowest/highest)."""
    from tvm import te, tirx

    rank = len(x.shape)
    axes = sorted({int(a) % rank for a in (range(rank) if axes is None else axes)})
    reduce_axes = [te.reduce_axis((0, x.shape[a]), name=f"k{a}") for a in axes]
    identity = float("-inf") if largest else float("inf")
    pick = tirx.max if largest else tirx.min
    reducer = te.comm_reducer(lambda a, b: pick(a, b), lambda t: tirx.const(identity, t),
                              name=name)
    out_shape = [1 if a in axes else x.shape[a] for a in range(rank)] if keepdims else \
        [x.shape[a] for a in range(rank) if a not in axes]

    def compute(*index):
        index, reduced, full = list(index), iter(reduce_axes), []
        for a in range(rank):
            if a in axes:
                full.append(next(reduced))
                if keepdims:
                    index.pop(0)
            else:
                full.append(index.pop(0))
        return reducer(x[tuple(full)], axis=reduce_axes)

    return te.compute(out_shape, compute, name=name)


class InfinityInitReduce:
    """ONNX ``ReduceMax``/``ReduceMin`` on floats starting from -inf/+inf, as ONNX defines
    them: TVM's start from the finite lowest/highest, so a row of -inf (an attention row
    masked off: the expanded Attention tests it) or an empty set gave -3.4e38, not -inf.
    On bool they reduce 0/1 as uint8 (TVM has no bool max/min)."""

    def __init__(self, base, largest: bool) -> None:
        self.base = base
        self.largest = largest

    def get_converter(self, opset: int):
        fallback = self.base.get_converter(opset)
        largest = self.largest

        def convert(bb, inputs, attr, params):
            from tvm import relax

            x = inputs[0]
            if dtype_of(x) == "bool":
                as_bytes = [relax.op.astype(x, "uint8"), *inputs[1:]]
                return relax.op.astype(fallback(bb, as_bytes, attr, params), "bool")
            result = fallback(bb, inputs, attr, params)
            name = "relax.max" if largest else "relax.min"
            if not dtype_of(x).startswith(("float", "bfloat")) or \
                    not isinstance(result, relax.Call) or getattr(result.op, "name", "") != name:
                return result
            axes = None if result.attrs.axis is None else [int(a) for a in result.attrs.axis]
            return bb.emit_te(_extreme, result.args[0], axes, bool(result.attrs.keepdims),
                              largest, "reduce_max" if largest else "reduce_min")

        return convert


class StaticEyeLike:
    """ONNX ``EyeLike`` of a static shape as a constant (TVM's converter refuses a
    ``dtype`` other than the input's)."""

    def __init__(self, base) -> None:
        self.base = base

    def get_converter(self, opset: int):
        fallback = self.base.get_converter(opset)

        def convert(bb, inputs, attr, params):
            import numpy as np
            from tvm import relax

            x = inputs[0]
            try:
                rows, cols = static_shape(x)
            except (TypeError, ValueError, AttributeError):
                return fallback(bb, inputs, attr, params)
            dtype = helper.tensor_dtype_to_np_dtype(int(attr["dtype"])) if "dtype" in attr \
                else np.dtype(dtype_of(x))
            eye = np.eye(rows, cols, k=int(attr.get("k", 0)), dtype=dtype)
            return relax.const(eye, str(eye.dtype))

        return convert


class CumProd:
    """ONNX ``CumProd`` with a constant axis (``exclusive``/``reverse`` as CumSum's):
    Relax's ``cumprod``, flipped around for ``reverse``."""

    @classmethod
    def get_converter(cls, opset: int):
        def convert(bb, inputs, attr, params):
            import numpy as np
            import tvm
            from tvm import relax, topi

            data, axis_expr = inputs[0], inputs[1]
            if not isinstance(axis_expr, tvm.ir.GenericConst):
                raise ValueError("CumProd axis computed at run time (kiln needs it constant)")
            axis = int(np.asarray(axis_expr.value.numpy()).reshape(-1)[0])
            reverse = bool(attr.get("reverse", 0))
            if reverse:
                data = bb.emit_te(topi.flip, data, axis=axis)
            data = bb.normalize(relax.op.cumprod(data, axis,
                                                 exclusive=bool(attr.get("exclusive", 0))))
            if reverse:
                data = bb.emit_te(topi.flip, data, axis=axis)
            return data

        return convert


class ReverseSequence:
    """ONNX ``ReverseSequence``: along ``time_axis``, the first ``sequence_lens[b]``
    steps of each batch entry reversed, the rest kept: a gather along time from
    ``t < L ? L - 1 - t : t`` (``L`` broadcast along ``batch_axis``)."""

    @classmethod
    def get_converter(cls, opset: int):
        def convert(bb, inputs, attr, params):
            import numpy as np
            from tvm import relax

            op = relax.op
            x, lens = inputs[0], inputs[1]
            shape = static_shape(x)
            rank = len(shape)
            time, batch = int(attr.get("time_axis", 0)) % rank, int(attr.get("batch_axis", 1)) % rank
            along = [1] * rank
            along[time] = shape[time]
            steps = relax.const(np.arange(shape[time], dtype=np.int64).reshape(along), "int64")
            per_batch = [1] * rank
            per_batch[batch] = shape[batch]
            length = op.reshape(op.astype(lens, "int64"), per_batch)
            one = relax.const(1, "int64")
            source = op.where(op.less(steps, length),
                              op.subtract(op.subtract(length, one), steps), steps)
            source = op.broadcast_to(source, shape)
            return op.gather_elements(x, source, axis=time)

        return convert


#: a MaxPool's Indices are picked tap by tap: kernels of at most this many taps
MAX_INDEXED_TAPS = 64


class MaxPoolWithIndices:
    """ONNX 2-D ``MaxPool`` with its ``Indices`` output (TVM's converter makes only the
    values): the values by ``fallback``; the indices, flat into the input
    (``((n*C + c)*H + h)*W + w``, or ``... + w*H + h`` with ``storage_order=1``), from
    the first kernel tap (in row-major order, as ONNX Runtime scans) whose input equals
    the maximum. Explicit pads only (``auto_pad`` other than NOTSET goes to ``fallback``)."""

    def __init__(self, fallback) -> None:
        self.fallback = fallback

    def get_converter(self, opset: int):
        fallback = self.fallback.get_converter(opset)

        def convert(bb, inputs, attr, params):
            outputs = attr.get("tvm_custom", {}).get("num_outputs", 1)
            auto_pad = attr.get("auto_pad", b"NOTSET")
            kernel = [int(k) for k in attr.get("kernel_shape", [])]
            if outputs < 2 or auto_pad not in (b"NOTSET", "NOTSET") or len(kernel) != 2 or \
                    kernel[0] * kernel[1] > MAX_INDEXED_TAPS:
                return fallback(bb, inputs, attr, params)
            storage = int(attr.get("storage_order", 0))
            values = bb.normalize(fallback(bb, inputs, dict(attr), params))
            return _with_indices(bb, inputs[0], values, kernel, attr, storage)

        return convert


def _with_indices(bb, x, values, kernel: list[int], attr, storage: int):
    import numpy as np
    from tvm import relax

    op = relax.op
    n, c, h, w = static_shape(x)
    out_h, out_w = static_shape(values)[2:]
    strides = [int(s) for s in attr.get("strides", [1, 1])]
    dilations = [int(d) for d in attr.get("dilations", [1, 1])]
    pads = [int(p) for p in attr.get("pads", [0, 0, 0, 0])]
    # the taps' extent (ceil_mode may reach past the end padding)
    need = [(o - 1) * s + (k - 1) * d + 1 for o, s, k, d in
            zip((out_h, out_w), strides, kernel, dilations)]
    ends = [max(pads[2 + i], need[i] - pads[i] - (h, w)[i]) for i in range(2)]
    width = [0, 0, 0, 0, pads[0], ends[0], pads[1], ends[1]]
    flat = np.arange(n * c * h * w, dtype=np.int64).reshape(n, c, h, w)
    if storage:  # column-major within each plane
        flat = (np.arange(n * c, dtype=np.int64).reshape(n, c, 1, 1) * h * w
                + np.arange(w, dtype=np.int64).reshape(1, 1, 1, w) * h
                + np.arange(h, dtype=np.int64).reshape(1, 1, h, 1))
    data = bb.normalize(op.nn.pad(x, width, pad_value=float("-inf")))
    index = bb.normalize(op.nn.pad(relax.const(flat, "int64"), width, pad_value=-1))
    taps = []
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            begin = [i * dilations[0], j * dilations[1]]
            end = [b + (o - 1) * s + 1 for b, o, s in zip(begin, (out_h, out_w), strides)]
            taps.append([bb.normalize(op.strided_slice(t, axes=[2, 3], begin=begin, end=end,
                                                       strides=strides))
                         for t in (data, index)])
    chosen = taps[-1][1]
    for tap, where in reversed(taps[:-1]):
        chosen = op.where(op.equal(tap, values), where, chosen)
    return relax.Tuple([values, bb.normalize(chosen)])


class SpaceToDepthWithMode:
    """ONNX ``SpaceToDepth`` with ``mode`` (opset 24; TVM ignores it): the blocks as
    reshape -> transpose -> reshape, ``DCR`` taking the block offsets before the
    channels (``[0, 3, 5, 1, 2, 4]``), ``CRD`` after them (``[0, 1, 3, 5, 2, 4]``)."""

    def __init__(self, fallback) -> None:
        self.fallback = fallback

    def get_converter(self, opset: int):
        fallback = self.fallback.get_converter(opset)

        def convert(bb, inputs, attr, params):
            from tvm import relax

            mode = attr.get("mode", b"DCR")
            mode = mode.decode() if isinstance(mode, bytes) else mode
            if mode == "DCR":
                return fallback(bb, inputs, attr, params)
            n, c, h, w = static_shape(inputs[0])
            b = int(attr["blocksize"])
            x = relax.op.reshape(inputs[0], [n, c, h // b, b, w // b, b])
            x = relax.op.permute_dims(x, [0, 1, 3, 5, 2, 4])
            return relax.op.reshape(x, [n, c * b * b, h // b, w // b])

        return convert
