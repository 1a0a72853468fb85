"""Check a symbolic build against ONNX Runtime at several sizes in its range.

One compiled module serves every size of its symbolic dims
(:mod:`kiln.compiler.driver.symbolic`); the passes were verified at each symbol's low
end only. :func:`check_sizes` runs the compiled module and ONNX Runtime on the final
model at the low end, the middle and the high end of every range (seeded random
inputs drawn where the graph says they are valid) and gives the error at each.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import onnx_ir as ir

from kiln.compiler.core import graph as kir
from kiln.compiler.driver import symbolic
from kiln.compiler.driver.verify import ErrorMetrics, compare, random_samples

logger = logging.getLogger(__name__)


def check_sizes(model: ir.Model, compiled: Callable[..., list], *, seed: int, rtol: float,
                atol: float, samples: int = 1
                ) -> list[tuple[dict[str, int], ErrorMetrics]]:
    """(sizes, error vs ONNX Runtime) at each size :func:`symbolic.check_sizes_values`
    picks; empty for a static model."""
    from kiln.backends.ort import ReferenceRunner

    ranges = symbolic.model_ranges(model)
    if not ranges:
        return []
    names = [v.name for v in model.graph.outputs]
    runner = ReferenceRunner(model, label="symbolic build check")
    results = []
    for sizes in symbolic.check_sizes_values(ranges):
        shapes = {v.name: (symbolic.concrete_shape(v.shape.dims, sizes), kir.numpy_dtype(v))
                  for v in kir.graph_inputs(model)}
        feeds = random_samples(model, shapes, samples, seed)
        reference = [runner.run(f) for f in feeds]
        outputs = [compiled(**f) for f in feeds]
        metrics = compare(reference, outputs, names, rtol=rtol, atol=atol)
        logger.info("symbolic build at %s: %s", describe_sizes(sizes), metrics.describe())
        results.append((sizes, metrics))
    return results


def describe_sizes(sizes: dict[str, int]) -> str:
    """``W=16, T=100``."""
    return ", ".join(f"{k}={v}" for k, v in sizes.items())

