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


def ort_runner(case: PreparedCase, threads: int) -> Callable[[], list[np.ndarray]]:
    """ONNX Runtime on the case's model with ``threads`` intra-op threads, not spinning."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # ORT's idle workers spin by default and keep spinning between runs: in one process
    # with TVM's pool on 2 cores that made kiln 35x slower (ocr-cls: 2.4 ms -> 85 ms)
    # while ORT alone ran the same with or without spinning (1.59 vs 1.65 ms).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(case.onnx_path), options, providers=["CPUExecutionProvider"])
    feeds = dict(case.inputs)
    return lambda: session.run(None, feeds)


def ort_session(model_or_path, threads: int, *, optimize: bool = True):
    """An ONNX Runtime session (``threads`` intra-op, not spinning; ``optimize=False``: the
    graph as written) over a model path or proto."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model_or_path if isinstance(model_or_path, (str, Path)) else \
        model_or_path.SerializeToString()
    return ort.InferenceSession(str(source) if isinstance(source, Path) else source, options,
                                providers=["CPUExecutionProvider"])
