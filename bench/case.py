"""What one benchmark case gives the runner: an ONNX model, its inputs, optionally torch."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np

SEED = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreparedCase:
    """What one case gives the runner."""

    name: str
    onnx_path: Path  # the model ORT runs as is and kiln compiles
    input_shapes: dict[str, list[int]]
    inputs: dict[str, np.ndarray]
    torch_fn: Callable[[], object] | None = None  # runs eager once on the same inputs
    flops: float | None = None


def random_inputs(shapes: dict[str, list[int]], seed: int = SEED) -> dict[str, np.ndarray]:
    """Seeded standard-normal float32 inputs of the given shapes."""
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
