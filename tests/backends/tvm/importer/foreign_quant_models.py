"""Small float models quantized by ONNX Runtime's own tools (not by kiln's passes), for
test_foreign_quant.py: static QDQ, static QOperator (QLinearConv, QLinearMatMul, QLinearAdd,
... and com.microsoft QGemm), quantize_dynamic (MatMulInteger / ConvInteger with
DynamicQuantizeLinear) and com.microsoft MatMulNBits (ORT's 4-bit weight-only quantizer).

A test helper rather than a compiler/testing module: only backends/ort and tests may import
onnxruntime. The float models are seeded and their calibration inputs too, so a run is
repeatable; each quantizer writes the quantized model to a path and returns it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: Calibration batches given to quantize_static.
CALIBRATION_BATCHES = 8


def _init(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def _model(nodes, inits, inputs, outputs, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=True)
    return proto


def small_cnn(seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """x[1, 3, 16, 16] -> Conv 3x3 (8) -> LeakyRelu -> Conv 3x3 (8) -> Add (residual) ->
    Mul (by a Sigmoid gate) -> Concat with a 1x1 Conv -> GlobalAveragePool -> Flatten ->
    Gemm (10) -> y[1, 10]: every op ORT's QOperator format has a QLinear form for."""
    rng = np.random.default_rng(seed)
    inits = [_init("w1", rng.standard_normal((8, 3, 3, 3)) * 0.3),
             _init("b1", rng.standard_normal(8) * 0.1),
             _init("w2", rng.standard_normal((8, 8, 3, 3)) * 0.15),
             _init("b2", rng.standard_normal(8) * 0.1),
             _init("w3", rng.standard_normal((8, 8, 1, 1)) * 0.3),
             _init("wf", rng.standard_normal((10, 16)) * 0.3),
             _init("bf", rng.standard_normal(10) * 0.1)]
    n = helper.make_node
    nodes = [n("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             n("LeakyRelu", ["c1"], ["a1"], name="leaky", alpha=0.1),
             n("Conv", ["a1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             n("Add", ["c2", "a1"], ["r"], name="residual"),
             n("Sigmoid", ["r"], ["g"], name="gate"),
             n("Mul", ["r", "g"], ["m"], name="gated"),
             n("Conv", ["m", "w3"], ["c3"], name="conv3"),
             n("Concat", ["m", "c3"], ["cat"], name="cat", axis=1),
             n("GlobalAveragePool", ["cat"], ["p"], name="pool"),
             n("Flatten", ["p"], ["f"], name="flatten"),
             n("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1)]
    return _model(nodes, inits,
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], opset)


def single_conv(seed: int = 0) -> onnx.ModelProto:
    """x[1, 4, 8, 8] -> Conv 3x3 (8, bias) -> y[1, 8, 8, 8]: one ConvInteger after
    quantize_dynamic, small enough to build in a second or two."""
    rng = np.random.default_rng(seed)
    inits = [_init("w", rng.standard_normal((8, 4, 3, 3)) * 0.3),
             _init("b", rng.standard_normal(8) * 0.1)]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    return _model(nodes, inits,
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])])


def matmul_block(seed: int = 0, tokens: int = 4, d: int = 64, hidden: int = 128) -> onnx.ModelProto:
    """A transformer-ish MLP block: x[tokens, d] -> MatMul(w1) + b1 -> Sigmoid gate (Mul) ->
    MatMul(w2) + b2 -> Add (residual) -> y[tokens, d]."""
    rng = np.random.default_rng(seed)
    inits = [_init("w1", rng.standard_normal((d, hidden)) / np.sqrt(d)),
             _init("b1", rng.standard_normal(hidden) * 0.1),
             _init("w2", rng.standard_normal((hidden, d)) / np.sqrt(hidden)),
             _init("b2", rng.standard_normal(d) * 0.1)]
    n = helper.make_node
    nodes = [n("MatMul", ["x", "w1"], ["h0"], name="fc1"),
             n("Add", ["h0", "b1"], ["h"], name="fc1_bias"),
             n("Sigmoid", ["h"], ["s"], name="act"),
             n("Mul", ["h", "s"], ["a"], name="silu"),
             n("MatMul", ["a", "w2"], ["o0"], name="fc2"),
             n("Add", ["o0", "b2"], ["o"], name="fc2_bias"),
             n("Add", ["o", "x"], ["y"], name="residual")]
    return _model(nodes, inits,
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [tokens, d])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [tokens, d])])


def input_feeds(proto: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    """Seeded float32 inputs for every graph input of ``proto`` (static shapes)."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in proto.graph.initializer}
    feeds = {}
    for value in proto.graph.input:
        if value.name in inits:
            continue
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


class _Reader:
    """quantize_static's CalibrationDataReader over the given feeds."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._batches = iter(batches)

    def get_next(self):
        return next(self._batches, None)


def quantize_static(proto: onnx.ModelProto, path: Path, quant_format: str,
                    per_channel: bool = False,
                    calibration: list[dict[str, np.ndarray]] | None = None) -> Path:
    """``proto`` quantized by ``onnxruntime.quantization.quantize_static`` (uint8
    activations, int8 weights; ``quant_format`` ``"QDQ"`` or ``"QOperator"``) at ``path``,
    calibrated on ``calibration`` (default: seeded normal inputs, static shapes only)."""
    if calibration is None:
        calibration = [input_feeds(proto, seed=100 + i) for i in range(CALIBRATION_BATCHES)]
    from onnxruntime.quantization import QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    float_path = Path(path).with_suffix(".float.onnx")
    onnx.save(proto, float_path)
    ort_quantize_static(str(float_path), str(path), _Reader(calibration),
                        quant_format=getattr(QuantFormat, quant_format),
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=per_channel)
    return Path(path)


def quantize_dynamic(proto: onnx.ModelProto, path: Path, ops: list[str] | None = None,
                     preprocess: bool = False) -> Path:
    """``proto`` quantized by ``onnxruntime.quantization.quantize_dynamic`` (MatMulInteger /
    ConvInteger with DynamicQuantizeLinear; uint8 weights when convs are quantized, as ORT
    requires; ``ops``: the op types to quantize, default all). ``preprocess``: first ORT's
    ``quant_pre_process`` (its optimizer turns Constant weights into initializers, which
    the quantizer needs; onnx shape inference only)."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    float_path = Path(path).with_suffix(".float.onnx")
    onnx.save(proto, float_path)
    if preprocess:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre_path = Path(path).with_suffix(".pre.onnx")
        quant_pre_process(str(float_path), str(pre_path), skip_symbolic_shape=True)
        float_path = pre_path
    has_conv = any(node.op_type == "Conv" for node in proto.graph.node) and \
        (ops is None or "Conv" in ops)
    ort_quantize_dynamic(str(float_path), str(path), op_types_to_quantize=ops,
                         weight_type=QuantType.QUInt8 if has_conv else QuantType.QInt8)
    return Path(path)


def quantize_matmul_nbits(proto: onnx.ModelProto, path: Path, block_size: int = 32,
                          symmetric: bool = True) -> Path:
    """``proto``'s MatMuls as com.microsoft MatMulNBits (4 bits, ``block_size``; zero
    points when not ``symmetric``) by ORT's ``MatMulNBitsQuantizer``."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric)
    quantizer = MatMulNBitsQuantizer(onnx.ModelProto.FromString(proto.SerializeToString()),
                                     algo_config=config)
    quantizer.process()
    onnx.save(quantizer.model.model, path)
    return Path(path)
