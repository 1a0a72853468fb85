"""ONNX models as an exporter of an old opset writes them, for the opset upgrader's tests
(tests/compiler/core/test_opset.py) and those of the passes that raise a model's opset."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from kiln.compiler.core import graph as kir


def old_opset_model(opset: int, seed: int = 0):
    """x[1, 8, 8, 16] -> Conv -> Clip[0, 6] -> ReduceMean(axes=[2]) -> Squeeze(axes=[2]) ->
    Reshape[1, 256] -> Gemm(256x128) -> Relu -> MatMul(128x10) -> z -> Unsqueeze(axes=[1]) ->
    Softmax -> y: at ``opset`` as an exporter of that opset writes it (a onnx.ModelProto).

    Each of Clip (attributes up to 10), ReduceMean (``axes`` attribute up to 17), Squeeze and
    Unsqueeze (attribute up to 12) and Softmax (axis=1 coerces [1, 1, 10] to 2-D up to 12:
    softmax over the 10 classes) changes signature or meaning between ``opset`` and 13 or 21."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def init(name, array, dtype=np.float32):
        return numpy_helper.from_array(np.asarray(array, dtype=dtype), name)

    inits = [init("conv_w", rng.standard_normal((16, 8, 3, 3)) * 0.2),
             init("conv_b", rng.standard_normal(16) * 0.1),
             init("shape", [1, 256], np.int64),
             init("fc_w", rng.standard_normal((256, 128)) * 0.1),
             init("fc_b", rng.standard_normal(128) * 0.1),
             init("head_w", rng.standard_normal((128, 10)) * 0.2)]
    nodes = [helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], name="conv",
                              pads=[1, 1, 1, 1])]
    if opset <= 10:
        nodes.append(helper.make_node("Clip", ["c"], ["r6"], name="clip", min=0.0, max=6.0))
    else:
        inits += [init("lo", 0.0), init("hi", 6.0)]
        nodes.append(helper.make_node("Clip", ["c", "lo", "hi"], ["r6"], name="clip"))
    nodes.append(helper.make_node("ReduceMean", ["r6"], ["m"], name="mean", axes=[2]))
    if opset <= 12:
        nodes += [helper.make_node("Squeeze", ["m"], ["sq"], name="squeeze", axes=[2])]
    else:
        inits.append(init("axis2", [2], np.int64))
        nodes += [helper.make_node("Squeeze", ["m", "axis2"], ["sq"], name="squeeze")]
    nodes += [helper.make_node("Reshape", ["sq", "shape"], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["h"], name="fc"),
              helper.make_node("Relu", ["h"], ["hr"], name="relu"),
              helper.make_node("MatMul", ["hr", "head_w"], ["z"], name="head")]
    if opset <= 12:
        nodes += [helper.make_node("Unsqueeze", ["z"], ["z3"], name="unsqueeze", axes=[1]),
                  helper.make_node("Softmax", ["z3"], ["y"], name="softmax", axis=1)]
    else:
        inits.append(init("axis1", [1], np.int64))
        nodes += [helper.make_node("Unsqueeze", ["z", "axis1"], ["z3"], name="unsqueeze"),
                  helper.make_node("Softmax", ["z3"], ["y"], name="softmax", axis=-1)]
    graph = helper.make_graph(
        nodes, "old_opset", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 16])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 10]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 10])], initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 6
    onnx.checker.check_model(proto, full_check=True)
    return proto


OLD_OPSETS = [10, 11, 12, 13]


def float_outputs(proto, inputs):
    """The outputs of ``proto`` under ONNX Runtime (the float reference)."""
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def assert_valid_at(model: ir.Model, opset: int) -> None:
    """The model says ``opset`` and every node is of that opset (full onnx check)."""
    assert model.opset_imports[""] == opset
    onnx.checker.check_model(kir.to_proto(model), full_check=True)
