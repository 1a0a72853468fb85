"""Importance scores of ``prune``: what a weight's magnitude is judged by.

- ``magnitude``: ``|R|`` (the reduction matrix, see :mod:`.patterns`);
- ``lowrank_magnitude`` with rank r: ``|R_r|``, R_r the rank-r truncated SVD
  ``U_r diag(s_r) V_r^T`` of R. Weights the dominant subspace carries score high even when
  small, isolated large entries (noise on top of a low-rank structure) score low; the
  kept weights keep their original values, only the choice changes.
"""

from __future__ import annotations

import numpy as np


def magnitude_scores(matrix: np.ndarray) -> np.ndarray:
    return np.abs(matrix.astype(np.float64))


def lowrank_scores(matrix: np.ndarray, rank: int) -> np.ndarray:
    """``|R_r|``: the magnitude of the rank-r approximation (full rank when r >= min(shape))."""
    m = matrix.astype(np.float64)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    r = min(rank, s.shape[0])
    return np.abs((u[:, :r] * s[:r]) @ vt[:r])


def scores_for(matrix: np.ndarray, criterion: str, rank: int | None) -> np.ndarray:
    if criterion == "lowrank_magnitude":
        assert rank is not None  # the config requires it
        return lowrank_scores(matrix, rank)
    return magnitude_scores(matrix)
