"""Integer KxK and depthwise convolutions of QDQ chains (see :mod:`.int8_chains`).

A quantized ``Conv`` (any kernel size, stride, padding, dilation; 2-D, NCHW) reading
``DQ(x_q)`` and ``DQ(w int8)`` becomes one internal ``KilnInt8Conv`` node on NHWC
tensors (between ``Transpose`` nodes, which cancel between consecutive integer layers),
in one of two forms:

``gemm`` (one group): an implicit GEMM. The input is padded with its own zero point
(``zx`` as uint8), so a padded tap contributes exactly what the zero-point term
removes, and its channels up to ``Cp``, a multiple of 4 (weights 0 there)::

    acc[m, n] = sum_{ry, rx, c} a_pad[b, oh*s + ry*d, ow*s + rx*d, c] * w[(ry, rx, c), n]
    m = (b, oh, ow),  K = KH * KW * Cp  in groups of G = 4 (VNNI) or 2 (AVX2 int16)

The ``[K, N]`` weight is packed like a dense layer's and the reduction is the dense
kernel's (``schedules.int8_dense``): one reduction axis over ``K / G``, the tap and
channel recovered from it, so the same register tile and dot-product instruction run.

``depthwise`` (groups = channels): a window kernel, vectorized over channels::

    acc[b, oh, ow, c] = sum_{ry, rx} int32(int16(a_pad[b, oh*s + ry*d, ow*s + rx*d, c])
                                           * int16(w[ry * KW + rx, c]))

(``u8 * s8`` is exact in int16; ``schedules.int8_window`` schedules it). Both end in the
dense kernel's requantizing epilogue (``comp[n] = zx * sum w[:, n]``, the elementwise
tail, ``Q``).
"""

from __future__ import annotations

import numpy as np

from kiln.backends.tvm.kernel_names import INT8_ACC, INT8_DW_ACC

from .expr_types import attr_str, dtype_of, static_shape
from .int8_dense import OPAQUE, last_row, program_of, requantize, tile_rows, trim
from .packed_weights import attributes

_VALID_PADS = (b"NOTSET", "NOTSET", b"VALID", "VALID")


def geometry(node, w: np.ndarray) -> tuple[dict | None, str]:
    """(kernel/strides/dilations/pads/mode of a 2-D Conv on weight ``w`` [N, C/g, KH, KW],
    or None, the reason)."""
    attrs = attributes(node)
    if w.ndim != 4:
        return None, f"a {w.ndim - 2}-D conv"
    if attrs.get("auto_pad", b"NOTSET") not in _VALID_PADS:
        return None, "auto_pad SAME"
    group = int(attrs.get("group", 1))
    n, cg, kh, kw = w.shape
    if group == 1:
        mode = "gemm"
    elif cg == 1 and n == group:
        mode = "depthwise"
    else:
        return None, f"grouped conv ({group} groups of {cg} channels)"
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    return {"mode": mode, "kernel": [kh, kw], "strides": list(attrs.get("strides", [1, 1])),
            "dilations": list(attrs.get("dilations", [1, 1])),
            "pads": pads if len(pads) == 4 else [0, 0, 0, 0]}, ""


def gemm_weight(w: np.ndarray) -> np.ndarray:
    """``w`` [N, C, KH, KW] as the implicit GEMM's [K, N], K ordered (ry, rx, c) with C
    padded to a multiple of 4 by zero rows."""
    n, c, kh, kw = w.shape
    cp = -(-c // 4) * 4
    taps = np.zeros((kh, kw, cp, n), np.int8)
    taps[:, :, :c, :] = w.transpose(2, 3, 1, 0)
    return taps.reshape(kh * kw * cp, n)


def pad_columns(lanes: int, w: np.ndarray, sw: np.ndarray, bias: np.ndarray):
    """``w`` [K, N], ``sw``, ``bias`` with N padded to a multiple of ``lanes`` (zero weights:
    the kernel computes those columns and the converter slices them off)."""
    n = w.shape[1]
    extra = -n % lanes
    if not extra:
        return w, sw, bias
    return (np.pad(w, [(0, 0), (0, extra)]), np.pad(sw, (0, extra), constant_values=1.0),
            np.pad(bias, (0, extra)))


def depthwise_weight(w: np.ndarray) -> np.ndarray:
    """``w`` [C, 1, KH, KW] as [KH * KW, C] (taps by channel)."""
    c, _, kh, kw = w.shape
    return np.ascontiguousarray(w.reshape(c, kh * kw).T)


def _pad_input(bb, x, *, x_signed: bool, zx: int, pads, channels_to: int, wide: bool):
    """``x`` NHWC as uint8 (int16 when ``wide``), padded with the zero point."""
    from tvm import relax

    a = x
    if x_signed:  # a = x + 128 as uint8 (the zero point was shifted with it)
        a = bb.normalize(relax.op.astype(relax.op.add(relax.op.astype(a, "int16"),
                                                      relax.const(128, "int16")), "uint8"))
    zu = zx + (128 if x_signed else 0)
    c = static_shape(a)[3]
    top, left, bottom, right = pads
    if any(pads) or channels_to != c:
        a = bb.normalize(relax.op.nn.pad(a, [0, 0, top, bottom, left, right, 0, channels_to - c],
                                         pad_value=float(zu)))
    if wide:
        a = bb.normalize(relax.op.astype(a, "int16"))
    return a


def _out_size(size: int, pad: int, kernel: int, stride: int, dilation: int) -> int:
    return (size + pad - dilation * (kernel - 1) - 1) // stride + 1


def emit_int8_conv(bb, x, w, comp, mult, bias, *, attr: dict):
    from tvm import relax, te

    mode = attr_str(attr["mode"])
    kh, kw = (int(v) for v in attr["kernel"])
    sh, sw = (int(v) for v in attr["strides"])
    dh, dw = (int(v) for v in attr["dilations"])
    pads = [int(v) for v in attr["pads"]]
    x_signed, zx = bool(attr["x_signed"]), int(attr["zx"])
    batch, height, width, channels = static_shape(x)
    oh = _out_size(height, pads[0] + pads[2], kh, sh, dh)
    ow = _out_size(width, pads[1] + pads[3], kw, sw, dw)
    epilogue = {"activation": attr_str(attr["activation"]), "program": program_of(attr),
                "out_dtype": attr_str(attr["out_dtype"]), "out_scale": float(attr["out_scale"]),
                "out_zero": int(attr["out_zero"])}
    if mode == "depthwise":
        a = _pad_input(bb, x, x_signed=x_signed, zx=zx, pads=pads, channels_to=channels,
                       wide=False)

        def depthwise(at, wt, ct, mt, bt):
            ry = te.reduce_axis((0, kh), "ry")
            rx = te.reduce_axis((0, kw), "rx")
            acc = te.compute(
                (batch, oh, ow, channels),
                lambda b, i, j, c: te.sum(
                    (at[b, i * sh + ry * dh, j * sw + rx * dw, c].astype("int16")
                     * wt[ry * kw + rx, c].astype("int16")).astype("int32"), axis=[ry, rx]),
                name=INT8_DW_ACC)
            return requantize(acc, ct, mt, bt, **epilogue)

        return bb.emit_te(depthwise, a, w, comp, mult, bias,
                          primfunc_name_hint="kiln_int8_depthwise", primfunc_attrs=OPAQUE)

    n_tiles, steps, lanes, group = static_shape(w)
    n = n_tiles * lanes
    cp = steps * group // (kh * kw)
    a = _pad_input(bb, x, x_signed=x_signed, zx=zx, pads=pads, channels_to=cp,
                   wide=dtype_of(w) == "int16")
    rows = batch * oh * ow
    rows_p = tile_rows(rows, n, lanes)
    per_tap = cp // group

    def gemm(at, wt, ct, mt, bt):
        i = te.reduce_axis((0, steps), "i")
        g = te.reduce_axis((0, group), "g")

        def pixel(m, i):
            m = last_row(m, rows, rows_p)
            tap, c = i // per_tap, i % per_tap
            b, p = m // (oh * ow), m % (oh * ow)
            return at[b, (p // ow) * sh + (tap // kw) * dh, (p % ow) * sw + (tap % kw) * dw,
                      c * group + g]

        acc = te.compute(
            (rows_p, n),
            lambda m, j: te.sum(pixel(m, i).astype("int32")
                                * wt[j // lanes, i, j % lanes, g].astype("int32"), axis=[i, g]),
            name=INT8_ACC)
        return requantize(acc, ct, mt, bt, **epilogue)

    y = bb.emit_te(gemm, a, w, comp, mult, bias, primfunc_name_hint="kiln_int8_conv",
                   primfunc_attrs=OPAQUE)
    columns = int(attr.get("n", n))  # below n: the lanes' padding (pad_columns)
    y = trim(bb, y, rows, columns)
    return bb.normalize(relax.op.reshape(y, [batch, oh, ow, columns]))


class Int8Conv:
    """Converter of the internal integer conv op (inputs x_q NHWC, w, comp, mult, bias)."""

    @staticmethod
    def get_converter(opset: int):
        del opset

        def convert(bb, inputs, attr, params):
            del params
            return emit_int8_conv(bb, *inputs[:5], attr=attr)

        return convert
