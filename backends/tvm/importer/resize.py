"""ONNX ``Resize`` (opsets 10-19) lowered by kiln as one separable gather per resized axis.

TVM 0.27's importer has only a v18 conversion (taken for every opset, so Resize-10's
``asymmetric`` default and Resize-11/13's input order are lost); it derives the
coordinate scale from the output size (ONNX uses the given ``scales``), and has no
``axes``, ``keep_aspect_ratio_policy`` or ``antialias``. With constant scales/sizes
(the frontend folds them) everything about the resize is static, so kiln computes, per
resized axis, a table of source indices and weights exactly as the ONNX reference does
(``onnx.reference.ops.op_resize``), in float32 like ONNX Runtime::

    x_orig = transform(x_out)              # half_pixel: (x + 0.5) / scale - 0.5, ...
    base   = floor(x_orig)  (x_orig - 1 when it is an integer, with ratio 1)
    taps   = base + offsets, weights = kernel(offsets - ratio)
    y[.., i, ..] = sum_t weights[i, t] * x[.., clamp(taps[i, t]), ..]

(nearest keeps one tap; linear two, cubic four; antialias widens them by 1/scale when
downsampling). ``exclude_outside`` zeroes taps outside the input and renormalizes;
``tf_crop_and_resize`` writes ``extrapolation_value`` where ``x_orig`` falls outside.
Each axis is one injective TensorIR kernel (it fuses with its neighbours); the tables
are constants. Computed scales are read at run time, for the declared output shape
(:mod:`.resize_scales`); sizes fed by a model input are fixed from the declared output
shape before import; a computed roi or an input without a static shape goes to TVM's
converter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .decode import INJECTIVE
from .expr_types import attr_str, dtype_of, static_shape

_F = np.float32
_NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil", "simple")
_COORDINATE_MODES = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel",
                     "align_corners", "asymmetric", "tf_crop_and_resize")


class ResizeAttributeError(ValueError):
    """A Resize kiln cannot lower (the importer reports the node)."""


@dataclass(frozen=True)
class AxisResize:
    """How one axis is resized."""

    size_in: int
    size_out: int
    scale: float
    roi: tuple[float, float] = (0.0, 1.0)


@dataclass(frozen=True)
class ResizeMode:
    mode: str = "nearest"                   # nearest | linear | cubic
    coordinates: str = "half_pixel"
    nearest: str = "round_prefer_floor"
    cubic_a: float = -0.75
    exclude_outside: bool = False
    antialias: bool = False
    extrapolation: float = 0.0


def original_coordinates(axis: AxisResize, how: ResizeMode) -> np.ndarray:
    """``x_orig`` (float32) for every output index of ``axis``."""
    x = np.arange(axis.size_out, dtype=_F)
    scale, n_in, n_out = _F(axis.scale), _F(axis.size_in), _F(axis.size_out)
    mode = how.coordinates
    if mode == "asymmetric":
        return x / scale
    if mode == "half_pixel":
        return (x + _F(0.5)) / scale - _F(0.5)
    if mode == "pytorch_half_pixel":
        return (x + _F(0.5)) / scale - _F(0.5) if axis.size_out > 1 else np.full_like(x, -0.5)
    if mode == "half_pixel_symmetric":
        adjustment = n_out / (scale * n_in)
        offset = n_in / _F(2) * (_F(1) - adjustment)
        return offset + (x + _F(0.5)) / scale - _F(0.5)
    if mode == "align_corners":
        if axis.size_out == 1:
            return np.zeros_like(x)
        return x * (n_in - _F(1)) / (n_out - _F(1))
    if mode == "tf_crop_and_resize":
        start, end = _F(axis.roi[0]), _F(axis.roi[1])
        if axis.size_out == 1:
            return np.full_like(x, (end - start) * (n_in - _F(1)) / _F(2))
        return start * (n_in - _F(1)) + x * (end - start) * (n_in - _F(1)) / (n_out - _F(1))
    raise ResizeAttributeError(f"coordinate_transformation_mode={mode!r}")


def _cubic(s: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel at distances ``s``."""
    s = np.abs(s)
    near = ((a + 2) * s - (a + 3)) * s * s + 1
    far = ((a * s - 5 * a) * s + 8 * a) * s - 4 * a
    return np.where(s <= 1, near, np.where(s < 2, far, 0.0))


def offsets_and_kernel(how: ResizeMode, scale: float):
    """Tap offsets relative to ``base`` and ``kernel(offset - ratio)`` for one mode."""
    if how.mode == "linear":
        support, kernel = 1.0, (lambda s: np.clip(1.0 - np.abs(s), 0.0, 1.0))
    else:
        support, kernel = 2.0, (lambda s: _cubic(s, how.cubic_a))
    shrink = min(scale, 1.0) if how.antialias else 1.0
    start = int(np.floor(-support / shrink) + 1)
    offsets = np.arange(start, 2 - start)
    return offsets, (lambda d: kernel(d * shrink))


def axis_taps(axis: AxisResize, how: ResizeMode):
    """``(indices [out, taps] int64, weights [out, taps] float32 | None, inside [out] | None)``.

    ``weights`` is None for nearest (one tap); ``inside`` is None unless
    ``tf_crop_and_resize`` puts some outputs outside the input (those get the
    extrapolation value).
    """
    x = original_coordinates(axis, how)
    whole = x == np.floor(x)
    base = np.where(whole, x - 1, np.floor(x)).astype(np.int64)
    ratio = np.where(whole, 1.0, x - np.floor(x)).astype(np.float64)
    inside = None
    if how.coordinates == "tf_crop_and_resize":
        outside = (x < 0) | (x > axis.size_in - 1)
        inside = None if not outside.any() else ~outside
    last = axis.size_in - 1
    if how.mode == "nearest":
        up = {"round_prefer_floor": ratio > 0.5, "round_prefer_ceil": ratio >= 0.5,
              "floor": np.zeros_like(ratio, bool), "ceil": np.ones_like(ratio, bool),
              # Resize-10 (ONNX Runtime): ceil when downsampling, floor when upsampling
              "simple": np.full_like(ratio, axis.scale < 1.0, bool)}[how.nearest]
        index = np.where(whole, base + 1, base + up.astype(np.int64))
        return np.clip(index, 0, last)[:, None], None, inside
    offsets, kernel = offsets_and_kernel(how, axis.scale)
    taps = base[:, None] + offsets[None, :]
    weights = kernel(offsets[None, :] - ratio[:, None])
    if how.exclude_outside:
        weights = np.where((taps < 0) | (taps > last), 0.0, weights)
    if how.antialias or how.exclude_outside:
        weights = weights / weights.sum(axis=1, keepdims=True)
    return np.clip(taps, 0, last), weights.astype(_F), inside


def constant_operand(expr, dtype=None) -> np.ndarray | None:
    """The value of a constant input (None when absent or empty); raise when computed."""
    import tvm

    if expr is None:
        return None
    if not isinstance(expr, tvm.ir.GenericConst):
        raise TypeError("computed")
    value = expr.value.numpy()
    return None if value.size == 0 else value.astype(dtype) if dtype else value


def plan_resize(shape: list[int], attr, opset: int, roi, scales, sizes) -> list[AxisResize | None]:
    """Per axis of an input of ``shape``: how it is resized (None: unchanged)."""
    rank = len(shape)
    axes = [int(a) % rank for a in attr.get("axes", range(rank))] if opset >= 18 \
        else list(range(rank))
    if scales is not None and sizes is not None:
        raise ResizeAttributeError("both scales and sizes are given")
    if scales is None and sizes is None:
        raise ResizeAttributeError("neither scales nor sizes is given")
    given_in = [shape[a] for a in axes]
    if scales is not None:
        factors = [float(s) for s in np.asarray(scales, _F).reshape(-1)]
        outs = [int(np.floor(_F(n) * _F(s))) for n, s in zip(given_in, factors)]
    else:
        outs = [int(s) for s in np.asarray(sizes).reshape(-1)]
        factors = [float(_F(o) / _F(n)) for o, n in zip(outs, given_in)]
        policy = attr_str(attr.get("keep_aspect_ratio_policy", "stretch")) if opset >= 18 \
            else "stretch"
        if policy != "stretch":
            if policy not in ("not_larger", "not_smaller"):
                raise ResizeAttributeError(f"keep_aspect_ratio_policy={policy!r}")
            common = min(factors) if policy == "not_larger" else max(factors)
            factors = [common] * len(axes)
            outs = [int(np.floor(_F(common) * _F(n) + _F(0.5))) for n in given_in]
    if len(factors) != len(axes):
        raise ResizeAttributeError(f"{len(factors)} scales/sizes for {len(axes)} axes")
    rois = [(0.0, 1.0)] * len(axes)
    if roi is not None:
        values = [float(v) for v in np.asarray(roi).reshape(-1)]
        if len(values) == 2 * len(axes):
            rois = list(zip(values[:len(axes)], values[len(axes):]))
    plan: list[AxisResize | None] = [None] * rank
    for a, n, o, s, r in zip(axes, given_in, outs, factors, rois):
        plan[a] = AxisResize(n, o, s, r)
    return plan


def resize_mode(attr, opset: int) -> ResizeMode:
    mode = attr_str(attr.get("mode", "nearest"))
    if mode not in ("nearest", "linear", "cubic"):
        raise ResizeAttributeError(f"mode={mode!r}")
    if opset < 11:
        # Resize-10: asymmetric coordinates and ONNX Runtime's "simple" nearest rounding
        return ResizeMode(mode=mode, coordinates="asymmetric", nearest="simple")
    how = ResizeMode(
        mode=mode,
        coordinates=attr_str(attr.get("coordinate_transformation_mode", "half_pixel")),
        nearest=attr_str(attr.get("nearest_mode", "round_prefer_floor")),
        cubic_a=float(attr.get("cubic_coeff_a", -0.75)),
        exclude_outside=bool(int(attr.get("exclude_outside", 0))),
        antialias=bool(int(attr.get("antialias", 0))) and opset >= 18 and mode != "nearest",
        extrapolation=float(attr.get("extrapolation_value", 0.0)))
    if how.coordinates not in _COORDINATE_MODES:
        raise ResizeAttributeError(f"coordinate_transformation_mode={how.coordinates!r}")
    if how.nearest not in _NEAREST_MODES[:4]:
        raise ResizeAttributeError(f"nearest_mode={how.nearest!r}")
    return how


def emit_axis_resize(bb, x, axis: int, plan: AxisResize, how: ResizeMode):
    """One axis of the resize as an injective TE kernel reading constant tap tables."""
    from tvm import relax

    indices, weights, inside = axis_taps(plan, how)
    return emit_tap_gather(
        bb, x, axis, plan.size_out, relax.const(indices.astype(np.int64)),
        None if weights is None else relax.const(weights.astype(dtype_of(x))),
        None if inside is None else relax.const(inside), how.extrapolation)


def emit_tap_gather(bb, x, axis: int, size_out: int, indices, weights=None, inside=None,
                    extrapolation: float = 0.0):
    """``y[.., i, ..] = sum_t weights[i, t] * x[.., indices[i, t], ..]`` along ``axis``
    (one injective kernel); ``weights`` None: one tap, no weights; ``inside`` (``[out]``
    bool) None: every output inside, else the others get ``extrapolation``. The tables
    are Relax expressions: constants, or computed at run time (:mod:`.resize_scales`)."""
    from tvm import te, tirx

    shape = static_shape(x)
    out_shape = shape[:axis] + [size_out] + shape[axis + 1:]
    dtype = dtype_of(x)
    tables = [t for t in (indices, weights, inside) if t is not None]
    taps = static_shape(indices)[1]

    def compute(data, idx, *rest):
        weight = rest[0] if weights is not None else None
        mask = rest[-1] if inside is not None else None

        def value(*i):
            def at(t):
                return data(*i[:axis], idx[i[axis], t], *i[axis + 1:])

            if weight is None:
                result = at(0)
            else:
                result = weight[i[axis], 0] * at(0)
                for t in range(1, taps):
                    result = result + weight[i[axis], t] * at(t)
            if mask is not None:
                result = tirx.Select(mask[i[axis]], result, tirx.const(extrapolation, dtype))
            return result

        return te.compute(out_shape, value, name="kiln_resize")

    return bb.emit_te(compute, x, *tables, primfunc_name_hint="kiln_resize",
                      primfunc_attrs=INJECTIVE)


#: Coordinate modes and nearest roundings TVM's ``image.resize2d`` computes as ONNX does.
_RESIZE2D_COORDINATES = frozenset({"half_pixel", "pytorch_half_pixel", "align_corners",
                                   "asymmetric"})
_RESIZE2D_NEAREST = frozenset(_NEAREST_MODES[:4])


def resize2d_form(plan: list[AxisResize | None], how: ResizeMode) -> list[int] | None:
    """The output ``[H, W]`` when Relax's ``image.resize2d`` (NCHW) computes this resize
    exactly as ONNX does, else None.

    That op is layout-aware (``ConvertLayout`` keeps a channels-last CNN channels-last
    through it; a TensorIR kernel would be wrapped in transposes), but it derives the
    scale from the sizes: only resizes whose output is exactly ``scale * input`` on H and
    W alone, with a coordinate mode and rounding it implements, qualify.
    """
    if len(plan) != 4 or how.antialias or how.exclude_outside:
        return None
    if how.coordinates not in _RESIZE2D_COORDINATES or how.nearest not in _RESIZE2D_NEAREST:
        return None
    if any(p is not None and (p.size_out != p.size_in or p.scale != 1.0) for p in plan[:2]):
        return None
    sizes = []
    for axis in plan[2:]:
        if axis is None:
            return None
        if _F(axis.size_out) / _F(axis.size_in) != _F(axis.scale):
            return None
        sizes.append(axis.size_out)
    return sizes
