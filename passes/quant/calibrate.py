"""Activation ranges for static QDQ: a per-tensor (scale, zero point) from calibration values,
by min/max, a percentile, or the clip of the range with the least quantization MSE."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from kiln.passes.quant.config import ActivationQuant

_ACT_RANGE = {"uint8": (0, 255), "int8": (-128, 127)}
#: Clip ratios of the calibrated range tried by ``calibration: mse``.
ACTIVATION_CLIP_GRID = np.linspace(1.0, 0.3, 36)
#: At most this many values enter the MSE search (a deterministic stride subsample).
ACTIVATION_MSE_VALUES = 1 << 20


def _qparams(lo: float, hi: float, dtype: str) -> tuple[float, int]:
    qmin, qmax = _ACT_RANGE[dtype]
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / (qmax - qmin) or 1.0
    zero_point = int(np.clip(round(qmin - lo / scale), qmin, qmax))
    return float(scale), zero_point


def _fake_quant(x: np.ndarray, scale: float, zero_point: int, dtype: str) -> np.ndarray:
    qmin, qmax = _ACT_RANGE[dtype]
    return (np.clip(np.round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale


def calibrate_range(values: Sequence[np.ndarray], cfg: ActivationQuant) -> tuple[float, int]:
    """Per-tensor (scale, zero point) of an activation from its calibration values."""
    flat = np.concatenate([np.asarray(v, dtype=np.float64).reshape(-1) for v in values])
    if cfg.calibration == "percentile":
        lo, hi = np.percentile(flat, [100 - cfg.percentile, cfg.percentile])
        return _qparams(float(lo), float(hi), cfg.dtype)
    lo, hi = float(flat.min()), float(flat.max())
    if cfg.calibration == "minmax":
        return _qparams(lo, hi, cfg.dtype)
    sample = flat[::max(1, flat.size // ACTIVATION_MSE_VALUES)]
    best, best_err = _qparams(lo, hi, cfg.dtype), math.inf
    for c in ACTIVATION_CLIP_GRID:
        params = _qparams(c * lo, c * hi, cfg.dtype)
        err = float(np.mean((_fake_quant(sample, *params, cfg.dtype) - sample) ** 2))
        if err < best_err:
            best, best_err = params, err
    return best
