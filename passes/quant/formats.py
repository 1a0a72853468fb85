"""Number formats of the quantization passes and their rounding (numpy, data-free).

Every function here works on a *grouped view* ``g[n, L]`` of a weight: one row per
group (a block of ``L`` input channels, an output channel, or the whole tensor),
one scale (and zero point) per row.

- integer, symmetric:  s = c*max|g| / qmax,  q = clamp(round(g/s), -2^(b-1), qmax),
  qmax = 2^(b-1) - 1;  g^ = q*s
- integer, zero point: lo = c*min(g, 0), hi = c*max(g, 0), s = (hi - lo) / (2^b - 1),
  z = round(-lo/s);  q = clamp(round(g/s) + z, 0, 2^b - 1);  g^ = (q - z)*s
- floating point (a grid of representable magnitudes V, largest v_max):
  s = c*max|g| / v_max, g^ = s * sign(g) * nearest(V, |g|/s)
- power (NUPES): t = sign(g)|g|^a quantized as a symmetric integer, g^ = sign(t^)|t^|^(1/a)

``c`` is the clip ratio: 1 (``clip: none``) or, with ``clip: mse_search``, the
value of ``CLIP_GRID`` that minimizes the squared error of each group. The FP4/FP8
value tables and the bit packing of the codes are :mod:`kiln.compiler.core.packing`.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from kiln.compiler.core.packing import FP4_MAGNITUDES, FP8_DTYPES

#: Clip ratios tried by ``clip: mse_search`` (per group, the lowest squared error wins).
CLIP_GRID = np.linspace(1.0, 0.5, 21)


def bits_of(dtype: str) -> int:
    """Bits per element of a weight dtype name (int4, uint4, fp8_e4m3, fp4_e2m1 ...)."""
    if dtype.startswith("fp8"):
        return 8
    if dtype.startswith("fp4"):
        return 4
    return int(dtype.lstrip("uint"))


@dataclass
class Quantized:
    """The result of quantizing a grouped view: codes, per-group parameters, reconstruction."""

    codes: np.ndarray            # [n, L] integers (int formats, fp4 codes) or float8 values
    scale: np.ndarray            # [n]
    zero_point: np.ndarray | None  # [n] (zero-point integer formats only)
    dequantized: np.ndarray      # [n, L] float64
    clip: np.ndarray             # [n] the clip ratio used per group

    def mse(self, reference: np.ndarray) -> float:
        return float(np.mean((self.dequantized - reference) ** 2))


def _safe(scale: np.ndarray) -> np.ndarray:
    """All-zero groups get scale 1 (their codes are 0 and reconstruct exactly)."""
    return np.where(scale > 0, scale, 1.0)


def _search(g: np.ndarray, clip_search: bool, one) -> Quantized:
    """Run ``one(g, c)`` for c in the clip grid (or c = 1) and keep the best c per group."""
    grid = CLIP_GRID if clip_search else np.array([1.0])
    best: Quantized | None = None
    best_err = None
    for c in grid:
        q = one(g, np.full(g.shape[0], c))
        err = np.sum((q.dequantized - g) ** 2, axis=1)
        if best is None:
            best, best_err = q, err
            continue
        better = err < best_err
        if better.any():
            best.codes[better] = q.codes[better]
            best.scale[better] = q.scale[better]
            if best.zero_point is not None:
                best.zero_point[better] = q.zero_point[better]
            best.dequantized[better] = q.dequantized[better]
            best.clip[better] = c
            best_err = np.where(better, err, best_err)
    assert best is not None
    return best


def quantize_int(g: np.ndarray, bits: int, *, symmetric: bool, clip_search: bool) -> Quantized:
    """Uniform integer quantization of each row of ``g`` (see the module docstring)."""
    g = g.astype(np.float64)

    def one(g: np.ndarray, c: np.ndarray) -> Quantized:
        if symmetric:
            qmax = 2 ** (bits - 1) - 1
            s = _safe(c * np.abs(g).max(axis=1) / qmax)
            q = np.clip(np.round(g / s[:, None]), -qmax - 1, qmax)
            return Quantized(q.astype(np.int64), s, None, q * s[:, None], c.copy())
        levels = 2 ** bits - 1
        lo = c * np.minimum(g.min(axis=1), 0.0)
        hi = c * np.maximum(g.max(axis=1), 0.0)
        s = _safe((hi - lo) / levels)
        z = np.clip(np.round(-lo / s), 0, levels)
        q = np.clip(np.round(g / s[:, None]) + z[:, None], 0, levels)
        return Quantized(q.astype(np.int64), s, z.astype(np.int64), (q - z[:, None]) * s[:, None],
                         c.copy())

    return _search(g, clip_search, one)


def quantize_fp4(g: np.ndarray, dtype: str, *, clip_search: bool) -> Quantized:
    """4-bit floating point (E2M1 or kiln's E3M0): codes sign<<3 | magnitude index."""
    magnitudes = FP4_MAGNITUDES[dtype]
    midpoints = (magnitudes[1:] + magnitudes[:-1]) / 2
    g = g.astype(np.float64)

    def one(g: np.ndarray, c: np.ndarray) -> Quantized:
        s = _safe(c * np.abs(g).max(axis=1) / magnitudes[-1])
        x = g / s[:, None]
        # Ties round to the even code (the lower index here), like round-to-nearest-even.
        index = np.searchsorted(midpoints, np.abs(x), side="right")
        tie = np.isin(np.abs(x), midpoints) & (index % 2 == 1)
        index = index - tie
        sign = np.signbit(x)
        codes = (sign.astype(np.int64) << 3) | index
        value = np.where(sign, -1.0, 1.0) * magnitudes[index] * s[:, None]
        return Quantized(codes, s, None, value, c.copy())

    return _search(g, clip_search, one)


def quantize_fp8(g: np.ndarray, dtype: str, *, clip_search: bool) -> Quantized:
    """FP8 (E4M3FN / E5M2) with a per-group scale; codes are float8 values (saturated)."""
    np_dtype = FP8_DTYPES[dtype]
    finfo = ml_dtypes.finfo(np_dtype)
    vmax = float(finfo.max)
    g = g.astype(np.float64)

    def one(g: np.ndarray, c: np.ndarray) -> Quantized:
        s = _safe(c * np.abs(g).max(axis=1) / vmax)
        x = np.clip(g / s[:, None], -vmax, vmax).astype(np.float32).astype(np_dtype)
        return Quantized(x, s, None, x.astype(np.float64) * s[:, None], c.copy())

    return _search(g, clip_search, one)


def quantize_power(g: np.ndarray, bits: int, exponent: float, *,
                   clip_search: bool) -> Quantized:
    """NUPES: sign(g)|g|^a quantized as a symmetric integer; dequantized by the inverse power."""
    g = g.astype(np.float64)
    qmax = 2 ** (bits - 1) - 1
    t = np.sign(g) * np.abs(g) ** exponent

    def one(_g: np.ndarray, c: np.ndarray) -> Quantized:
        s = _safe(c * np.abs(t).max(axis=1) / qmax)
        q = np.clip(np.round(t / s[:, None]), -qmax - 1, qmax)
        y = q * s[:, None]
        return Quantized(q.astype(np.int64), s, None, np.sign(y) * np.abs(y) ** (1 / exponent),
                         c.copy())

    return _search(g, clip_search, one)


#: Exponents tried by the power (NUPES) search; 1.0 is plain uniform quantization.
POWER_GRID = np.round(np.arange(0.3, 1.51, 0.05), 2)


def search_power(g: np.ndarray, bits: int, *, clip_search: bool) -> tuple[float, Quantized]:
    """The exponent of ``POWER_GRID`` with the lowest weight MSE, and its quantization.

    The exponents are ranked without clipping; the best three are then compared with
    the clip search (when asked), which keeps the search about 4x the cost of one run.
    """
    ranked = sorted(POWER_GRID, key=lambda a: quantize_power(g, bits, float(a),
                                                             clip_search=False).mse(g))
    best: tuple[float, Quantized] | None = None
    for a in ranked[:3] if clip_search else ranked[:1]:
        q = quantize_power(g, bits, float(a), clip_search=clip_search)
        if best is None or q.mse(g) < best[1].mse(g):
            best = (float(a), q)
    assert best is not None
    return best


def kmeans(points: np.ndarray, k: int, *, iterations: int, seed: int) -> tuple[np.ndarray,
                                                                               np.ndarray]:
    """Deterministic k-means (k-means++ init from ``seed``, Lloyd iterations).

    Returns (centroids [k, d], assignment [n]). When there are at most k distinct
    points, they are the centroids (exact).
    """
    points = points.astype(np.float64)
    n = points.shape[0]
    rng = np.random.default_rng(seed)
    unique = np.unique(points, axis=0)
    if unique.shape[0] <= k:
        centroids = np.zeros((k, points.shape[1]))
        centroids[:unique.shape[0]] = unique
        return centroids, _assign(points, centroids[:unique.shape[0]])
    centroids = np.empty((k, points.shape[1]))
    centroids[0] = points[rng.integers(n)]
    closest = np.sum((points - centroids[0]) ** 2, axis=1)
    for i in range(1, k):
        total = closest.sum()
        pick = rng.choice(n, p=closest / total) if total > 0 else rng.integers(n)
        centroids[i] = points[pick]
        closest = np.minimum(closest, np.sum((points - centroids[i]) ** 2, axis=1))
    assignment = _assign(points, centroids)
    for _ in range(iterations):
        sums = np.stack([np.bincount(assignment, weights=points[:, j], minlength=k)
                         for j in range(points.shape[1])], axis=1)
        counts = np.bincount(assignment, minlength=k)[:, None]
        centroids = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        new = _assign(points, centroids)
        if np.array_equal(new, assignment):
            break
        assignment = new
    return centroids, assignment


def _assign(points: np.ndarray, centroids: np.ndarray, chunk: int = 8192) -> np.ndarray:
    # float32 distances, summed one coordinate at a time (BLAS is slow for d of 1..8);
    # ties may differ from float64 but the result stays deterministic.
    out = np.empty(points.shape[0], dtype=np.int64)
    c = centroids.astype(np.float32)
    for start in range(0, points.shape[0], chunk):
        p = points[start:start + chunk].astype(np.float32)
        d = np.zeros((p.shape[0], c.shape[0]), dtype=np.float32)
        for j in range(p.shape[1]):
            d += np.square(p[:, j, None] - c[None, :, j])
        out[start:start + chunk] = np.argmin(d, axis=1)
    return out

