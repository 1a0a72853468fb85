"""Small ONNX models built with ``onnx.helper`` (the TVM backend tests use them)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

#: The block size of :func:`blocked_int4_matmul` (as kiln's int4 weight pass writes it).
BLOCK = 32


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def tiny_cnn() -> onnx.ModelProto:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm, input x [1,3,32,32]."""
    rng = _rng(0)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    b = rng.standard_normal(8).astype(np.float32) * 0.1
    fc = rng.standard_normal((10, 8)).astype(np.float32) * 0.3
    fcb = rng.standard_normal(10).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [numpy_helper.from_array(a, n) for a, n in ((w, "w"), (b, "b"), (fc, "fc"), (fcb, "fcb"))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def blocked_int4_matmul(k: int = 128, n: int = 64, m: int = 4, *, zero_point: bool = True,
                        dtype=ml_dtypes.int4) -> onnx.ModelProto:
    """x [m,k] @ DequantizeLinear(int4 w [k,n], scale [ceil(k/32),n], zp, axis=0, block_size=32).

    Opset 21, as kiln's int4 weight pass writes it (k need not be a multiple of 32).
    """
    rng = _rng(1)
    lo, hi = (-8, 8) if dtype == ml_dtypes.int4 else (0, 16)
    w = rng.integers(lo, hi, size=(k, n)).astype(dtype)
    blocks = -(-k // BLOCK)
    scale = (rng.random((blocks, n)).astype(np.float32) + 0.5) * 0.02
    inits = [numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(scale, "w_scale")]
    dq_inputs = ["w_q", "w_scale"]
    if zero_point:
        zp = rng.integers(lo // 4, hi // 4, size=(blocks, n)).astype(dtype)
        inits.append(numpy_helper.from_array(zp, "w_zp"))
        dq_inputs.append("w_zp")
    bias = rng.standard_normal(n).astype(np.float32)
    inits.append(numpy_helper.from_array(bias, "bias"))
    nodes = [
        helper.make_node("DequantizeLinear", dq_inputs, ["w"], axis=0, block_size=BLOCK,
                         name="w_dequant"),
        helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul"),
        helper.make_node("Add", ["h", "bias"], ["y"], name="add_bias"),
    ]
    graph = helper.make_graph(
        nodes, "blocked_int4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def with_unsupported_ops() -> onnx.ModelProto:
    """A graph using two op types TVM cannot import plus one from another domain."""
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu"),
        helper.make_node("Loop", ["", "", "a"], ["b"], name="loop_1",
                         body=helper.make_graph([], "body", [], [])),
        helper.make_node("Gelu", ["b"], ["c"], name="ms_gelu", domain="com.microsoft"),
        helper.make_node("MelWeightMatrix", ["c", "c", "c", "c", "c"], ["d"], name="mel_1"),
        helper.make_node("MelWeightMatrix", ["d", "d", "d", "d", "d"], ["y"], name="mel_2"),
    ]
    graph = helper.make_graph(
        nodes, "bad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                   helper.make_opsetid("com.microsoft", 1)])


def to_ir(model: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(model)
