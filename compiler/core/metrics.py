"""Error metrics between a reference output and an actual one (float64 throughout).

- SQNR (dB) = 10 log10(sum(ref^2) / sum((ref - actual)^2)); identical outputs give +inf,
  a zero reference with any error, or a non-finite error, gives -inf.
- max abs error = max |ref - actual|.
- relative error = max |actual - ref| / max |ref| (the absolute error when ref is all 0).

Verification (``kiln.compiler.driver.verify``), the weight-quality choice of the quantizer,
the tests and bench/ all compute these here, so a figure means the same everywhere.
Argument order follows the name: ``sqnr_db(reference, actual)`` (signal over noise),
``relative_error(actual, reference)`` (the error of actual, relative to reference).
"""

from __future__ import annotations

import math

import numpy as np


def sqnr_db_from_sums(signal: float, noise: float) -> float:
    """SQNR in dB from sum(ref^2) and sum((ref - actual)^2), e.g. accumulated over samples."""
    if noise == 0:
        return math.inf
    if signal == 0 or not math.isfinite(noise):
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def sqnr_db(reference: np.ndarray, actual: np.ndarray) -> float:
    """SQNR of ``actual`` against ``reference`` in dB (``actual`` reshaped to its shape)."""
    ref = np.asarray(reference, dtype=np.float64)
    act = np.asarray(actual, dtype=np.float64).reshape(ref.shape)
    return sqnr_db_from_sums(float(np.sum(ref ** 2)), float(np.sum((ref - act) ** 2)))


def max_abs_error(reference: np.ndarray, actual: np.ndarray) -> float:
    """max |reference - actual| (0 for empty arrays)."""
    ref = np.asarray(reference, dtype=np.float64)
    act = np.asarray(actual, dtype=np.float64).reshape(ref.shape)
    return float(np.max(np.abs(ref - act))) if ref.size else 0.0


def relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """max |actual - reference| / max |reference|; the absolute error if reference is all 0."""
    ref = np.asarray(reference, dtype=np.float64)
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    return max_abs_error(ref, actual) / (scale or 1.0)
