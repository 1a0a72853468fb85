"""Activation ranges for static QDQ: a per-tensor (scale, zero point) from calibration values,
by min/max, a percentile, the clip of the range with the least quantization MSE (``mse``),
or the clip with the least error in the output of the layers that read it (``search``).

``search`` scores a clip ratio c (the range [c lo, c hi]) by the error that quantizing x
puts into the consumers' outputs, e = Q_c(x) - x over a subsample of calibration rows:

- a MatMul, Gemm or 1x1 group-1 Conv reads x through a matrix M [C, K]: the error is the
  exact ``mean ||e M||^2`` (while rows x C x K stays under ``EXACT_BUDGET``, else as below);
- any other Conv (k x k, grouped, depthwise): ``sum_j E_j mean(e_j^2)`` with E_j the sum
  of the squared weights that read channel j, i.e. the output MSE when the errors of
  different channels and positions are uncorrelated.

A channel with large weights then counts more than one the layer barely reads, which is
what per-tensor MSE on x alone (``mse``) misses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kiln.passes.quant.config import ActivationQuant
from kiln.passes.quant.weights import WeightSite

_ACT_RANGE = {"uint8": (0, 255), "int8": (-128, 127), "int16": (-32768, 32767)}
#: Clip ratios of the calibrated range tried by ``calibration: mse``.
ACTIVATION_CLIP_GRID = np.linspace(1.0, 0.3, 36)
#: At most this many values enter the MSE search (a deterministic stride subsample).
ACTIVATION_MSE_VALUES = 1 << 20
#: Clip ratios tried by ``calibration: search`` (finer and lower than ``mse``'s grid).
SEARCH_CLIP_GRID = np.linspace(1.0, 0.2, 41)
#: At most this many rows (positions x samples, all channels) enter the output-error search.
SEARCH_ROWS = 1 << 12
#: The exact ``e M`` costs rows x C x K per clip tried: above this many multiply-adds the
#: channel energies (the diagonal of M M^T) stand in for M.
EXACT_BUDGET = 1 << 22


@dataclass(frozen=True)
class Consumer:
    """How one weight layer reads an activation: the channel axis of the activation and
    either the weight as a matrix [C, K] (exact output error) or the energy of each input
    channel [C] (sum of the squared weights that read it)."""

    axis: int
    matrix: np.ndarray | None       # float32 (the search's rows are float32 too)
    energy: np.ndarray


def consumer_of(site: WeightSite) -> Consumer:
    """The ``Consumer`` view of a Conv/Gemm/MatMul weight (see the module docstring)."""
    w = site.array.astype(np.float64)
    if site.node.op_type != "Conv":
        matrix = np.moveaxis(w, site.in_axis, 0)
        return Consumer(-1, matrix.astype(np.float32), (matrix ** 2).sum(axis=1))
    groups = site.node.attributes.get_int("group", 1)
    if groups == 1 and all(d == 1 for d in w.shape[2:]):
        matrix = w.reshape(w.shape[0], w.shape[1]).T
        return Consumer(1, matrix.astype(np.float32), (matrix ** 2).sum(axis=1))
    out, per_group = w.shape[0], w.shape[1]
    rows = out // groups
    squares = (w ** 2).reshape(groups, rows, per_group, -1).sum(axis=(1, 3))   # [g, C/g]
    return Consumer(1, None, squares.reshape(-1))


def _qparams(lo: float, hi: float, dtype: str) -> tuple[float, int]:
    qmin, qmax = _ACT_RANGE[dtype]
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / (qmax - qmin) or 1.0
    zero_point = int(np.clip(round(qmin - lo / scale), qmin, qmax))
    return float(scale), zero_point


def widened(params: tuple[float, int], dtype: str, wide: str = "int16") -> tuple[float, int]:
    """The (scale, zero point) of ``wide`` over the range ``params`` covers in ``dtype``:
    the same clip, 2^8 times finer steps for int16."""
    qmin, qmax = _ACT_RANGE[dtype]
    scale, zero_point = params
    return _qparams((qmin - zero_point) * scale, (qmax - zero_point) * scale, wide)


def fake_quant(x: np.ndarray, scale: float, zero_point: int, dtype: str) -> np.ndarray:
    qmin, qmax = _ACT_RANGE[dtype]
    return (np.clip(np.round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale


def _rows(values: Sequence[np.ndarray], axis: int, channels: int) -> np.ndarray:
    """Calibration values as rows [N, C] (channel last), stride-subsampled to SEARCH_ROWS."""
    rows = np.concatenate([np.moveaxis(np.asarray(v, np.float32), axis, -1).reshape(-1, channels)
                           for v in values])
    return np.ascontiguousarray(rows[::max(1, rows.shape[0] // SEARCH_ROWS)])


def output_error(e: np.ndarray, consumers: Sequence[Consumer]) -> float:
    total = 0.0
    for c in consumers:
        if c.matrix is not None and e.shape[0] * c.matrix.size <= EXACT_BUDGET:
            total += float(np.mean(np.sum((e @ c.matrix) ** 2, axis=1)))
        else:
            total += float(np.mean(e ** 2, axis=0) @ c.energy)
    return total


def _search(values: Sequence[np.ndarray], cfg: ActivationQuant, lo: float, hi: float,
            consumers: Sequence[Consumer]) -> tuple[float, int]:
    channels = consumers[0].energy.shape[0]
    x = _rows(values, consumers[0].axis, channels)
    best, best_err = _qparams(lo, hi, cfg.dtype), math.inf
    for c in SEARCH_CLIP_GRID:
        params = _qparams(c * lo, c * hi, cfg.dtype)
        err = output_error(fake_quant(x, *params, cfg.dtype) - x, consumers)
        if err < best_err:
            best, best_err = params, err
    return best


def calibrate_range(values: Sequence[np.ndarray], cfg: ActivationQuant,
                    consumers: Sequence[Consumer] = ()) -> tuple[float, int]:
    """Per-tensor (scale, zero point) of an activation from its calibration values;
    ``search`` needs the ``consumers`` that read it (without them it is ``mse``)."""
    flat = np.concatenate([np.asarray(v, dtype=np.float64).reshape(-1) for v in values])
    if cfg.calibration == "percentile":
        lo, hi = np.percentile(flat, [100 - cfg.percentile, cfg.percentile])
        return _qparams(float(lo), float(hi), cfg.dtype)
    lo, hi = float(flat.min()), float(flat.max())
    if cfg.calibration == "minmax":
        return _qparams(lo, hi, cfg.dtype)
    shapes = {c.energy.shape for c in consumers}
    if cfg.calibration == "search" and consumers and len(shapes) == 1:
        return _search(values, cfg, lo, hi, consumers)
    sample = flat[::max(1, flat.size // ACTIVATION_MSE_VALUES)]
    best, best_err = _qparams(lo, hi, cfg.dtype), math.inf
    for c in ACTIVATION_CLIP_GRID:
        params = _qparams(c * lo, c * hi, cfg.dtype)
        err = float(np.mean((fake_quant(sample, *params, cfg.dtype) - sample) ** 2))
        if err < best_err:
            best, best_err = params, err
    return best
