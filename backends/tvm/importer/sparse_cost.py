"""When kiln's sparse kernel (:mod:`.sparse_kernel`) is expected to beat its dense one.

Both kernels cost about a fixed time per weight they read: the dense one per weight of
R [N, K], the sparse one per stored entry (``stored_density`` * N * K, padding included),
so ``dense / sparse = CROSSOVER / stored_density``, CROSSOVER being the stored density at
which both take the same time. It was measured (docs/passes.md, "Sparse kernels": one
Gemm layer, TVM's time_evaluator, minimum of 15 repeats, 1 thread, on the 2-core Xeon)
and depends on the layout, on whether x has more than :data:`GEMV_ROWS` rows, and on
whether the model's MatMul/Gemm weights together fit in one core's L2 (``cached``: from
one call to the next they stay there, the dense GEMV is not memory bound and the sparse
kernel has less to win; ``streamed``: every call reads them from L3 or DRAM, and
reading fewer bytes pays). The values below sit at or under the measured break-even
points (timings on this shared machine vary up to 3x from run to run; ratios of paired
runs are steadier); those marked "guess" had no measurement and were set low.
"""

from __future__ import annotations

from typing import Literal

Layout = Literal["shared", "gather"]

#: Up to this many rows of x a layer is a GEMV.
GEMV_ROWS = 4
#: Weights up to this size stay in one core's L2 (2 MiB here) next to x and the code.
CACHED_BYTES = 3 << 19
#: (layout, "gemv"/"gemm", "cached"/"streamed") -> stored density at break-even.
CROSSOVER: dict[tuple[Layout, str, str], float] = {
    # 1024x1024 at stored 0.23/0.34/0.54/0.74: 6.8x/3.7x/1.7x/0.99x; 512x1024 at 0.23: 3.6x
    ("shared", "gemv", "streamed"): 0.7,
    # 1024x256 at stored 0.22: 1.7x
    ("shared", "gemv", "cached"): 0.35,
    # 16 rows, 1024x1024 at stored 0.23/0.54: 3.4x/1.2x
    ("shared", "gemm", "streamed"): 0.6,
    ("shared", "gemm", "cached"): 0.3,          # guess
    # the bench MLP (7.3 MB) at 2:4, all layers gathered: medians of 40 paired runs
    # 1.14x-1.55x, but minima 0.81x-1.13x and bench.cases_sparse 0.85x-1.26x: no reliable
    # win, so 2:4 (stored 0.5) sits at break-even and stays dense; a lone 1024x1024 layer:
    # 0.62x-1.04x; unstructured at stored 0.24/0.13: 2.9x/5.1x
    ("gather", "gemv", "streamed"): 0.5,
    # 2:4, a lone 1024x256 / 512x1024 layer: 0.37x / 0.72x
    ("gather", "gemv", "cached"): 0.15,
    # 16 rows, 1024x1024: 2:4 0.59x, unstructured at stored 0.24: 0.16x
    ("gather", "gemm", "streamed"): 0.03,
    ("gather", "gemm", "cached"): 0.03,         # guess
}


def row_class(rows: int) -> str:
    return "gemv" if rows <= GEMV_ROWS else "gemm"


def estimate(layout: Layout, stored_density: float, *, rows: int, model_weight_bytes: int
             ) -> float:
    """Expected dense time / sparse time for x [rows, K] times one fp32 weight stored at
    ``stored_density``, in a model whose MatMul/Gemm weights take ``model_weight_bytes``."""
    cached = "cached" if model_weight_bytes <= CACHED_BYTES else "streamed"
    return CROSSOVER[(layout, row_class(rows), cached)] / max(stored_density, 1e-6)
