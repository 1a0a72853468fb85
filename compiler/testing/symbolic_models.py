"""Small ONNX models with a symbolic input dim (kiln.compiler.driver.symbolic's tests).

- :func:`conv_line_model`: Conv(3->8, 3x3, pad 1; or depthwise) + ReLU on
  ``x [1, 3, 16, W]``, an OCR line in miniature; ``W`` is an ONNX dim_param (or fixed
  when ``width`` is given).
- :func:`sequence_model`: ``x [1, T, 16]`` through MatMul(16x32) + Add + Tanh, the shape
  of an audio or token sequence.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


def conv_line_model(path: Path, width: int | str = "W", seed: int = 0, *,
                    depthwise: bool = False) -> Path:
    """``depthwise``: a 16-channel depthwise Conv (x [1, 16, 16, W]) instead of 3 -> 8."""
    rng = np.random.default_rng(seed)
    channels = 16 if depthwise else 3
    out, per_group = (16, 1) if depthwise else (8, 3)
    weight = numpy_helper.from_array(
        rng.standard_normal((out, per_group, 3, 3)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(out).astype(np.float32), "b")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1],
                              group=16 if depthwise else 1),
             helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(
        nodes, "conv_line",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 16, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight, bias])
    return _save(graph, path)


def sequence_model(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]),
             helper.make_node("Add", ["m", "b"], ["a"]),
             helper.make_node("Tanh", ["a"], ["y"])]
    graph = helper.make_graph(
        nodes, "sequence",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight, bias])
    return _save(graph, path)
