"""GPTQ weight rounding (Frantar et al. 2022, after OBQ) for ``quantize``'s
``rounding: gptq``: integer codes chosen column by column so that the layer's *output* on
the calibration inputs moves least, instead of rounding each weight to its nearest code.

A layer's output error for a weight change dW (rows: output channels, columns: what one
output reads) is ``sum_rows dW H dW^T`` with ``H = E[x x^T]`` the second moment of the
inputs each row reads: for a Conv the im2col patches of its input (per group, so a
depthwise Conv has one [kh*kw, kh*kw] H per channel), for a Gemm/MatMul the input rows.
GPTQ quantizes one column at a time (the largest diagonal of H first) and moves the
error it made onto the columns not yet quantized, through the Cholesky factor of H^-1:

    q_i = Q(w_i);  e = (w_i - q_i) / U_ii;  w_j -= e U_ij  for j after i   (H^-1 = U^T U)

The scales and zero points stay those of round-to-nearest (``formats``), so the stored
form, its bits and the backends' kernels do not change; only the codes differ. ``H`` gets
``DAMPING`` x its mean diagonal added (as GPTQ does) and inputs that are always zero on
the calibration samples get no error moved onto them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx_ir as ir

from kiln.passes.quant.formats import Quantized
from kiln.passes.quant.weights import Grouping, WeightSite

#: Added to H's diagonal, as a fraction of its mean diagonal (GPTQ's percdamp).
DAMPING = 0.01
#: Columns quantized together before the error is moved onto the rest in one product.
BLOCK = 128
#: At most this many positions (of all samples) per Conv input enter H (a stride subsample).
MAX_POSITIONS = 1 << 16


@dataclass
class Hessian:
    """``H = E[x x^T]`` of the inputs of one weight layer, one per group: [G, D, D]."""

    matrix: np.ndarray
    groups: int


def _patches(x: np.ndarray, node: ir.Node, kernel: Sequence[int], groups: int) -> np.ndarray:
    """im2col of one Conv input [1 or N, C, *spatial] -> [G, C/G * prod(kernel), P]."""
    rank = len(kernel)
    pads = list(node.attributes.get_ints("pads", [0] * 2 * rank))
    strides = list(node.attributes.get_ints("strides", [1] * rank))
    dilations = list(node.attributes.get_ints("dilations", [1] * rank))
    x = np.asarray(x, np.float32)
    x = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + rank]) for i in range(rank)])
    out = [(x.shape[2 + i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
           for i in range(rank)]
    taps = []
    for tap in np.ndindex(*kernel):
        index = tuple(slice(t * d, t * d + s * (o - 1) + 1, s)
                      for t, d, s, o in zip(tap, dilations, strides, out))
        taps.append(x[(slice(None), slice(None)) + index])       # [N, C, *out]
    stacked = np.stack(taps, axis=2)                              # [N, C, T, *out]
    n, c, t = stacked.shape[:3]
    stacked = stacked.reshape(n, groups, c // groups * t, -1)    # [N, G, D, P]
    return np.moveaxis(stacked, 0, 2).reshape(groups, c // groups * t, -1)


def _auto_pad(node: ir.Node) -> bool:
    return node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID")


def hessian_problem(node: ir.Node) -> str | None:
    """Why GPTQ cannot see this layer's inputs (None: it can)."""
    if node.op_type == "Conv" and _auto_pad(node):
        return "Conv with auto_pad SAME"
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        return "Gemm with transA"
    return None


def hessian(values: Sequence[np.ndarray], site: WeightSite,
            quantize: Callable[[np.ndarray], np.ndarray] | None = None) -> Hessian:
    """``E[x x^T]`` of the inputs the weight's rows read, from calibration values of x
    (passed through ``quantize`` first: the activation's fake quantization, when the
    layer will read quantized inputs)."""
    node = site.node
    if quantize is not None:
        values = [quantize(v) for v in values]
    if node.op_type != "Conv":
        rows = np.concatenate([np.asarray(v, np.float32).reshape(-1, np.shape(v)[-1])
                               for v in values])
        rows = rows[::max(1, rows.shape[0] // MAX_POSITIONS)]
        return Hessian((rows.T @ rows).astype(np.float64)[None] / rows.shape[0], 1)
    groups = node.attributes.get_int("group", 1)
    kernel = site.array.shape[2:]
    per_sample = max(1, MAX_POSITIONS // max(1, len(values)))
    total, count = 0.0, 0
    for v in values:
        p = _patches(v, node, kernel, groups)
        p = p[:, :, ::max(1, p.shape[2] // per_sample)]
        total = total + np.matmul(p, p.transpose(0, 2, 1)).astype(np.float64)
        count += p.shape[2]
    return Hessian(total / max(1, count), groups)


def _as_rows(w: np.ndarray, site: WeightSite, groups: int) -> np.ndarray:
    """The weight as [G, R, D]: per group, rows (outputs) by the inputs H is over."""
    if site.node.op_type == "Conv":
        return w.reshape(groups, w.shape[0] // groups, -1)
    return np.moveaxis(w, site.in_axis, -1)[None]


def _from_rows(rows: np.ndarray, site: WeightSite) -> np.ndarray:
    shape = site.array.shape
    if site.node.op_type == "Conv":
        return rows.reshape(shape)
    moved = rows[0]
    return np.moveaxis(moved, -1, site.in_axis)


def _inverse_factor(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(upper Cholesky factor U of H^-1 per group [G, D, D], dead-input mask [G, D])."""
    h = h.copy()
    diag = np.einsum("gii->gi", h)
    dead = diag <= 0
    for g in range(h.shape[0]):
        idx = np.flatnonzero(dead[g])
        h[g][idx, :] = 0.0
        h[g][:, idx] = 0.0
        h[g][idx, idx] = 1.0
    diag = np.einsum("gii->gi", h)
    damp = DAMPING * diag.mean(axis=1)
    h = h + damp[:, None, None] * np.eye(h.shape[1])[None]
    inverse = np.linalg.inv(h)
    inverse = (inverse + inverse.transpose(0, 2, 1)) / 2
    lower = np.linalg.cholesky(inverse)
    return lower.transpose(0, 2, 1), dead


def gptq_round(site: WeightSite, h: Hessian, scale: np.ndarray, zero: np.ndarray,
               qmin: int, qmax: int) -> np.ndarray:
    """Integer codes (the weight's shape) chosen by GPTQ for per-element ``scale`` and
    ``zero`` (the weight's shape, round-to-nearest's), clamped to [qmin, qmax]."""
    groups = h.groups
    w = _as_rows(site.array.astype(np.float64), site, groups).copy()
    s = _as_rows(scale.astype(np.float64), site, groups)
    z = _as_rows(zero.astype(np.float64), site, groups)
    order = np.argsort(-np.einsum("gii->gi", h.matrix), axis=1, kind="stable")   # act order
    take = np.take_along_axis
    w = take(w, order[:, None, :], axis=2)
    s = take(s, order[:, None, :], axis=2)
    z = take(z, order[:, None, :], axis=2)
    hp = take(take(h.matrix, order[:, :, None], axis=1), order[:, None, :], axis=2)
    u, _ = _inverse_factor(hp)
    d = w.shape[2]
    codes = np.empty_like(w)
    for start in range(0, d, BLOCK):
        stop = min(d, start + BLOCK)
        block_err = np.empty(w.shape[:2] + (stop - start,))
        for i in range(start, stop):
            column = w[:, :, i]
            q = np.clip(np.round(column / s[:, :, i]) + z[:, :, i], qmin, qmax)
            codes[:, :, i] = q
            err = (column - (q - z[:, :, i]) * s[:, :, i]) / u[:, i, i][:, None]
            block_err[:, :, i - start] = err
            if i + 1 < stop:
                w[:, :, i + 1:stop] -= err[:, :, None] * u[:, None, i, i + 1:stop]
        if stop < d:
            w[:, :, stop:] -= np.matmul(block_err, u[:, start:stop, stop:])
    inverse_order = np.argsort(order, axis=1)
    codes = take(codes, inverse_order[:, None, :], axis=2)
    return _from_rows(codes, site).astype(np.int64)


def output_error(site: WeightSite, h: Hessian, w_hat: np.ndarray) -> float:
    """``sum_rows dW H dW^T`` (the layer's mean squared output error, summed over outputs)."""
    dw = _as_rows(site.array.astype(np.float64) - w_hat, site, h.groups)
    return float(np.einsum("grd,gde,gre->", dw, h.matrix, dw))


def rounded(q: Quantized, grouping: Grouping, site: WeightSite, h: Hessian, bits: int,
            symmetric: bool) -> Quantized:
    """Round-to-nearest's ``q`` (a grouped view) with its codes chosen by GPTQ instead."""
    shape = q.codes.shape
    scale = grouping.unview(np.broadcast_to(q.scale[:, None], shape))
    zeros = np.zeros(shape[0]) if q.zero_point is None else q.zero_point
    zero = grouping.unview(np.broadcast_to(zeros[:, None].astype(np.float64), shape))
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)
    codes = grouping.view(gptq_round(site, h, scale, zero, qmin, qmax))
    z = zeros[:, None]
    return replace(q, codes=codes.astype(np.int64),
                   dequantized=(codes - z) * q.scale[:, None])
