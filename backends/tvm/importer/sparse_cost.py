"""When kiln's sparse kernel (:mod:`.sparse_kernel`) is expected to beat its dense one.

Both kernels cost about a fixed time per weight they read: the dense one per weight of
R [N, K], the sparse one per stored entry (``stored_density`` * N * K, padding included),
so ``dense / sparse = CROSSOVER / stored_density``: CROSSOVER is the stored density at
which both take the same time, measured on the build machine for each layout and row
count (docs/passes.md, "Sparse kernels", has the measurements and how they were taken).
"""

from __future__ import annotations

from typing import Literal

Layout = Literal["shared", "gather"]

#: Stored density at which the sparse kernel takes as long as the dense one, by layout,
#: for a GEMV (x with at most GEMV_ROWS rows) and for more rows.
CROSSOVER: dict[tuple[Layout, str], float] = {
    ("shared", "gemv"): 0.5,
    ("shared", "gemm"): 0.3,
    ("gather", "gemv"): 0.2,
    ("gather", "gemm"): 0.1,
}
GEMV_ROWS = 4


def row_class(rows: int) -> str:
    return "gemv" if rows <= GEMV_ROWS else "gemm"


def estimate(layout: Layout, stored_density: float, *, rows: int, k: int, n: int) -> float:
    """Expected dense time / sparse time for ``rows`` x [K, N] (``k``, ``n``: the weight's
    size, kept for a finer model)."""
    del k, n
    return CROSSOVER[(layout, row_class(rows))] / max(stored_density, 1e-6)
