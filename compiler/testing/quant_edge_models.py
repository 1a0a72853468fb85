"""Models for the hard cases of quantization: weights the graph computes from constants
(``ConstantOfShape``, ``Reshape``/``Transpose``/``Cast`` of initializers, ``Identity``),
and an MLP with one layer made very sensitive by an outlier input channel; plus sample
callables for ``calibration.source: module:function``."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from kiln.compiler.testing.quant_models import build, init


def computed_weights_mlp(d_in: int = 64, hidden: int = 96, d_out: int = 32,
                         batch: int = 2, seed: int = 0) -> ir.Model:
    """x -> MatMul(Reshape(w1_flat)) -> Relu -> Gemm(Transpose(Cast(w2 fp16)), transB=0)
    -> Relu -> MatMul(Identity(ConstantOfShape([d_out, d_out]) * scale)) -> y: no weight is
    an initializer a quantizer can read directly."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((d_in, hidden)) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((d_out, hidden)) * 0.1).astype(np.float16)
    inits = [init("w1_flat", w1.reshape(-1)),
             numpy_helper.from_array(np.array([d_in, hidden], dtype=np.int64), "w1_shape"),
             numpy_helper.from_array(w2, "w2_half"),
             numpy_helper.from_array(np.array([d_out, d_out], dtype=np.int64), "w3_shape"),
             init("w3_scale", np.linspace(-0.2, 0.3, d_out).reshape(1, d_out))]
    nodes = [
        helper.make_node("Reshape", ["w1_flat", "w1_shape"], ["w1"], name="w1_reshape"),
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu1"),
        helper.make_node("Cast", ["w2_half"], ["w2_float"], name="w2_cast", to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["w2_float"], ["w2"], name="w2_transpose", perm=[1, 0]),
        helper.make_node("Gemm", ["r", "w2"], ["g"], name="fc2"),
        helper.make_node("Relu", ["g"], ["r2"], name="relu2"),
        helper.make_node("ConstantOfShape", ["w3_shape"], ["ones"], name="w3_fill",
                         value=numpy_helper.from_array(np.array([1.0], dtype=np.float32))),
        helper.make_node("Mul", ["ones", "w3_scale"], ["w3_scaled"], name="w3_mul"),
        helper.make_node("Identity", ["w3_scaled"], ["w3"], name="w3_identity"),
        helper.make_node("MatMul", ["r2", "w3"], ["y"], name="fc3"),
    ]
    return build(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                              [batch, d_in])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, d_out])])


#: The channel of ``outlier_mlp``'s hidden activation that is OUTLIER_GAIN times the others.
OUTLIER_CHANNEL = 5
OUTLIER_GAIN = 2000.0


def outlier_mlp(d: int = 64, layers: int = 5, batch: int = 4, seed: int = 0) -> ir.Model:
    """``layers`` MatMul+Relu layers of width ``d``; the input of layer ``fc2`` has one
    channel OUTLIER_GAIN times larger than the rest (fc1's column is scaled up, fc2's row
    scaled down by the same factor, so the float model is ordinary). A per-tensor
    activation scale at fc2's input then leaves the other channels a few levels at most:
    quantizing fc2 alone costs far more than any other layer."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    previous = "x"
    for i in range(layers):
        w = rng.standard_normal((d, d)) / np.sqrt(d)
        if i == 0:
            w[:, OUTLIER_CHANNEL] *= OUTLIER_GAIN
        if i == 1:
            w[OUTLIER_CHANNEL, :] /= OUTLIER_GAIN
        inits.append(init(f"w{i}", w))
        out = "y" if i == layers - 1 else f"r{i}"
        nodes.append(helper.make_node("MatMul", [previous, f"w{i}"], [f"h{i}"], name=f"fc{i + 1}"))
        nodes.append(helper.make_node("Relu", [f"h{i}"], [out], name=f"relu{i + 1}"))
        previous = out
    return build(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                              [batch, d])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, d])])


def positive_samples(count: int):
    """A ``module:function`` calibration source for ``outlier_mlp`` (and any [4, 64] input
    named x): seeded non-negative inputs, like post-ReLU features."""
    rng = np.random.default_rng(7)
    for _ in range(count):
        yield {"x": np.abs(rng.standard_normal((4, 64))).astype(np.float32)}


def photo_cnn(seed: int = 0) -> ir.Model:
    """x[1, 3, 32, 32] (an RGB crop) -> Conv 3x3 (8) -> Relu -> Conv 3x3 stride 2 (16) -> Relu
    -> GlobalAveragePool -> Flatten -> Gemm (10) -> y: for calibration on real photos."""
    rng = np.random.default_rng(seed)
    inits = [init("w1", rng.standard_normal((8, 3, 3, 3)) * 0.3),
             init("b1", rng.standard_normal(8) * 0.1),
             init("w2", rng.standard_normal((16, 8, 3, 3)) * 0.15),
             init("w3", rng.standard_normal((10, 16)) * 0.3)]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1],
                              strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w3"], ["y"], name="fc", transB=1)]
    return build(nodes, inits,
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])])


def input_weight_model() -> ir.Model:
    """x[2, 4] @ w (a graph input, so not a constant) -> y: ``quantize`` refuses its one node."""
    return build([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], [],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
                  helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
