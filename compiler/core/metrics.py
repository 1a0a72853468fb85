"""Error metrics between a reference output and an actual one (float64 throughout).

- SQNR (dB) = 10 log10(sum(ref^2) / sum((ref - actual)^2)); identical outputs give +inf,
  a zero reference with any error, or a non-finite error, gives -inf.
- max abs error = max |ref - actual|.
- relative error = max |actual - ref| / max |ref| (the absolute error when ref is all 0).
- NaN where the reference has NaN, and the same infinity where it has one, are equal
  (:func:`equal_nonfinite`): no error there, and no signal either. A NaN or inf anywhere
  else is an infinite error (SQNR -inf, never "exact").

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
    if signal == 0 or not math.isfinite(noise) or not math.isfinite(signal):
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def equal_nonfinite(reference: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Where both are NaN, or both the same infinity (a boolean mask of ``reference``'s shape)."""
    ref = np.asarray(reference, dtype=np.float64)
    act = np.asarray(actual, dtype=np.float64).reshape(ref.shape)
    return (np.isnan(ref) & np.isnan(act)) | (np.isinf(ref) & (ref == act))


def _finite_pair(reference: np.ndarray, actual: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both as float64, with the positions :func:`equal_nonfinite` finds set to 0 in each."""
    ref = np.asarray(reference, dtype=np.float64)
    act = np.asarray(actual, dtype=np.float64).reshape(ref.shape)
    same = equal_nonfinite(ref, act)
    return np.where(same, 0.0, ref), np.where(same, 0.0, act)


def sqnr_db(reference: np.ndarray, actual: np.ndarray) -> float:
    """SQNR of ``actual`` against ``reference`` in dB (``actual`` reshaped to its shape)."""
    ref, act = _finite_pair(reference, actual)
    noise = float(np.sum((ref - act) ** 2))
    return sqnr_db_from_sums(float(np.sum(ref ** 2)), noise if noise == noise else math.inf)


def max_abs_error(reference: np.ndarray, actual: np.ndarray) -> float:
    """max |reference - actual| (0 for empty arrays)."""
    ref, act = _finite_pair(reference, actual)
    if not ref.size:
        return 0.0
    err = np.abs(ref - act)
    return math.inf if np.isnan(err).any() else float(np.max(err))


def relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """max |actual - reference| / max |reference|; the absolute error if reference is all 0."""
    ref = np.asarray(reference, dtype=np.float64)
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    return max_abs_error(ref, actual) / (scale or 1.0)
