"""The bundled example model for ``make demo`` (compiler/core/examples/tiny_cnn.onnx).

A small CNN written directly in ONNX with a seeded generator: Conv+BatchNormalization,
two convolutions whose weights are byte-identical copies, and a Gemm followed by a
per-channel Mul+Add, so the ``reparam`` spec has something to fold, something to
dedupe and something it must refuse. Regenerate with
``python -m kiln.compiler.core.example_models`` (the output is byte-identical).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

EXAMPLE_PATH = Path(__file__).parent / "examples" / "tiny_cnn.onnx"


def tiny_cnn() -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def init(name: str, array: np.ndarray) -> TensorProto:
        return numpy_helper.from_array(array.astype(np.float32), name)

    c1, c2, classes = 16, 16, 10
    w_shared = rng.standard_normal((c2, c1, 3, 3)) * 0.1
    inits = [
        init("stem.weight", rng.standard_normal((c1, 3, 3, 3)) * 0.3),
        init("stem.bn.scale", rng.uniform(0.5, 1.5, c1)),
        init("stem.bn.bias", rng.standard_normal(c1) * 0.1),
        init("stem.bn.mean", rng.standard_normal(c1) * 0.1),
        init("stem.bn.var", rng.uniform(0.5, 1.5, c1)),
        init("left.weight", w_shared),
        init("left.bias", rng.standard_normal(c2) * 0.1),
        init("right.weight", w_shared.copy()),
        init("right.bias", rng.standard_normal(c2) * 0.1),
        init("head.weight", rng.standard_normal((classes, c2)) * 0.2),
        init("head.bias", rng.standard_normal(classes) * 0.1),
        init("head.gain", rng.uniform(0.5, 1.5, (1, classes))),
        init("head.offset", rng.standard_normal((1, classes)) * 0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "stem.weight"], ["stem.conv"], name="stem.conv",
                         pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["stem.conv", "stem.bn.scale", "stem.bn.bias",
                                                "stem.bn.mean", "stem.bn.var"], ["stem.bn"],
                         name="stem.bn", epsilon=1e-5),
        helper.make_node("Relu", ["stem.bn"], ["stem.relu"], name="stem.relu"),
        helper.make_node("Conv", ["stem.relu", "left.weight", "left.bias"], ["left.conv"],
                         name="left.conv", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Conv", ["stem.relu", "right.weight", "right.bias"], ["right.conv"],
                         name="right.conv", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Mul", ["left.conv", "right.conv"], ["gate"], name="gate"),
        helper.make_node("Relu", ["gate"], ["gate.relu"], name="gate.relu"),
        helper.make_node("GlobalAveragePool", ["gate.relu"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "head.weight", "head.bias"], ["head.fc"],
                         name="head.fc", transB=1),
        helper.make_node("Mul", ["head.fc", "head.gain"], ["head.scaled"], name="head.scale"),
        helper.make_node("Add", ["head.scaled", "head.offset"], ["logits"], name="head.shift"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="kiln-example")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    EXAMPLE_PATH.parent.mkdir(parents=True, exist_ok=True)
    EXAMPLE_PATH.write_bytes(tiny_cnn().SerializeToString(deterministic=True))


if __name__ == "__main__":
    main()
