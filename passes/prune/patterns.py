"""Sparsity patterns of ``prune`` on a weight's reduction view, and the keep masks they make.

Every weight is seen as a matrix ``R [out, K]`` whose rows are output units and whose
columns are the reduction (input) axis, so that patterns mean the same for every op:

    MatMul W [K, N]            R = W^T
    Gemm   B [K, N] / [N, K]   R = B^T (transB=0) / B (transB=1)
    Conv   W [O, I/g, kh, kw]  R = W.transpose(0, 2, 3, 1).reshape(O, kh*kw*I/g)

(for a Conv the input channels are the fastest axis of K, so an N:M group of M
consecutive columns spans M input channels at one kernel tap).

- ``unstructured``: a unit is one weight;
- ``block [br, bc]``: a unit is a ``br x bc`` tile of R (br output rows, bc consecutive
  reduction columns), scored by its mean score;
- ``N:M``: in every M consecutive columns of a row the N highest scores are kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

NM_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class ReductionView:
    """How a weight maps to its reduction matrix ``R [out, K]`` and back."""

    op: str
    shape: tuple[int, ...]
    trans_b: bool = False

    def to_matrix(self, weight: np.ndarray) -> np.ndarray:
        if self.op == "Conv":
            axes = (0, *range(2, weight.ndim), 1)       # input channels last
            return weight.transpose(axes).reshape(weight.shape[0], -1)
        return weight if self.trans_b else weight.T

    def from_matrix(self, matrix: np.ndarray) -> np.ndarray:
        if self.op == "Conv":
            o, i, *taps = self.shape
            nd = len(self.shape)
            return matrix.reshape(o, *taps, i).transpose(0, nd - 1, *range(1, nd - 1))
        return matrix if self.trans_b else matrix.T


def parse_nm(pattern: str) -> tuple[int, int] | None:
    """(N, M) for ``"N:M"``, None for any other text."""
    match = NM_PATTERN.match(pattern)
    return (int(match.group(1)), int(match.group(2))) if match else None


def fit_reason(matrix_shape: tuple[int, int], *, nm: tuple[int, int] | None,
               block: tuple[int, int] | None, conv_in: int | None) -> str | None:
    """Why a pattern does not tile a reduction matrix of this shape (None: it does)."""
    out, k = matrix_shape
    if nm is not None:
        m = nm[1]
        span = conv_in if conv_in is not None else k
        if span % m:
            what = "input channels" if conv_in is not None else "reduction axis"
            return f"{nm[0]}:{m} needs the {what} ({span}) to be a multiple of {m}"
    if block is not None:
        br, bc = block
        if out % br or k % bc:
            return f"block {br}x{bc} does not tile the weight's {out}x{k} reduction matrix"
    return None


def unit_scores(scores: np.ndarray, block: tuple[int, int] | None) -> np.ndarray:
    """Per-unit scores: the element scores, or each block's mean ([out/br, K/bc])."""
    if block is None:
        return scores
    br, bc = block
    out, k = scores.shape
    return scores.reshape(out // br, br, k // bc, bc).mean(axis=(1, 3))


def expand_units(keep: np.ndarray, block: tuple[int, int] | None) -> np.ndarray:
    """A unit keep mask back to the element mask of R."""
    if block is None:
        return keep
    br, bc = block
    return np.repeat(np.repeat(keep, br, axis=0), bc, axis=1)


def nm_mask(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep the n highest of every m consecutive scores along each row (ties: first wins)."""
    out, k = scores.shape
    groups = scores.reshape(out, k // m, m)
    order = np.argsort(-groups, axis=-1, kind="stable")
    keep = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    return keep.reshape(out, k)


def is_nm_sparse(matrix: np.ndarray, n: int, m: int) -> bool:
    """True when every group of m consecutive entries of each row has at most n nonzeros."""
    out, k = matrix.shape
    return bool(((matrix.reshape(out, k // m, m) != 0).sum(axis=-1) <= n).all())


def top_keep(scores: np.ndarray, keep: int) -> np.ndarray:
    """A boolean mask of the ``keep`` highest scores (ties broken by position)."""
    flat = scores.reshape(-1)
    mask = np.zeros(flat.shape, dtype=bool)
    if keep > 0:
        mask[np.argsort(-flat, kind="stable")[:keep]] = True
    return mask.reshape(scores.shape)


def min_keep_count(units: int, min_keep: int | float) -> int:
    """Units a layer keeps at least: a count, or a fraction of its units (rounded up)."""
    if isinstance(min_keep, float):
        return min(units, int(np.ceil(min_keep * units)))
    return min(units, int(min_keep))


def layer_masks(scores: list[np.ndarray], sparsity: float, min_keep: int | float
                ) -> list[np.ndarray]:
    """Each layer keeps round((1 - sparsity) * units) of its own units, at least min_keep."""
    masks = []
    for s in scores:
        keep = max(int(round((1.0 - sparsity) * s.size)), min_keep_count(s.size, min_keep))
        masks.append(top_keep(s, keep))
    return masks


def global_masks(scores: list[np.ndarray], sparsity: float, min_keep: int | float
                 ) -> list[np.ndarray]:
    """One ranking over every layer's units: round((1 - sparsity) * total) are kept.

    Each layer's ``min_keep`` best units are kept first (so no layer collapses); the rest
    of the budget goes to the highest remaining scores of any layer."""
    total = sum(s.size for s in scores)
    budget = int(round((1.0 - sparsity) * total))
    forced = [top_keep(s, min_keep_count(s.size, min_keep)) for s in scores]
    left = budget - sum(int(f.sum()) for f in forced)
    if left <= 0:
        return forced
    flat = np.concatenate([np.where(f, -np.inf, s).reshape(-1) for s, f in zip(scores, forced,
                                                                             strict=True)])
    chosen = top_keep(flat, left)
    masks, start = [], 0
    for s, f in zip(scores, forced, strict=True):
        masks.append(f | chosen[start:start + s.size].reshape(s.shape))
        start += s.size
    return masks
