"""Small seeded ONNX models, inputs and calibration for the quantization tests (passes and
the TVM backend's quantized lowering)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.ort import ReferenceRunner, collect_activations
from kiln.compiler.core import graph as kir
from kiln.compiler.core.metrics import sqnr_db  # noqa: F401 (the quant tests read models.sqnr_db)
from kiln.compiler.core.pass_api import CalibrationContext


def init(name, array) -> onnx.TensorProto:
    """A float32 initializer proto."""
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def build(nodes, inits, inputs, outputs, opset=17) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=True)
    return ir.serde.deserialize_model(proto)


def mlp(d_in=256, hidden=512, d_out=128, batch=4, shared=False, seed=0) -> ir.Model:
    """x[batch, d_in] -> MatMul(w1) -> Relu -> Gemm(w2, transB=1) -> y (optionally a third
    MatMul reusing w1)."""
    rng = np.random.default_rng(seed)
    inits = [init("w1", rng.standard_normal((d_in, hidden)) * 0.05),
             init("w2", rng.standard_normal((d_out, hidden)) * 0.05)]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2"], ["y"], name="fc2", transB=1)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, d_out])]
    if shared:
        nodes.append(helper.make_node("MatMul", ["x", "w1"], ["z"], name="fc1_twin"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [batch, hidden]))
    return build(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                              [batch, d_in])], outputs)


def conv(seed=0) -> ir.Model:
    """x[1, 8, 12, 12] -> Conv(16, 3x3) -> Relu -> Conv(16, 1x1) -> y."""
    rng = np.random.default_rng(seed)
    inits = [init("w1", rng.standard_normal((16, 8, 3, 3)) * 0.2),
             init("b1", rng.standard_normal(16) * 0.1),
             init("w2", rng.standard_normal((16, 16, 1, 1)) * 0.2)]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    return build(nodes, inits,
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 12, 12])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 12, 12])])


def feeds(model: ir.Model, seed=0, outliers=()) -> dict[str, np.ndarray]:
    """Seeded inputs; the channels in ``outliers`` (last axis) are scaled by 20."""
    rng = np.random.default_rng(seed)
    out = {}
    for value in kir.graph_inputs(model):
        x = rng.standard_normal(kir.shape_list(value)).astype(np.float32)
        for channel in outliers:
            x[..., channel] *= 20
        out[value.name] = x
    return out


def calibration(model: ir.Model, count=4, outliers=()) -> CalibrationContext:
    samples = [feeds(model, seed=100 + i, outliers=outliers) for i in range(count)]
    return CalibrationContext(samples, lambda m, names: collect_activations(m, names, samples))


def run(model: ir.Model, inputs) -> list[np.ndarray]:
    """ONNX Runtime's outputs with its optimizations (as an application runs the model)."""
    return ReferenceRunner(model, optimize="all").run(inputs)


def run_simulated(model: ir.Model, inputs) -> list[np.ndarray]:
    """ONNX Runtime's outputs with graph optimizations off: every QDQ pair runs as written
    (quantize, dequantize, float op), the same on every CPU. Optimized, ORT fuses QDQ into
    its int8 kernels, whose rounding depends on the CPU (on AVX2 without VNNI its u8s8
    kernel sums byte products in saturating int16 pairs)."""
    return ReferenceRunner(model, optimize="none").run(inputs)


def ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def initializer_dtypes(model: ir.Model) -> dict[str, ir.DataType]:
    return {name: value.dtype for name, value in model.graph.initializers.items()}
