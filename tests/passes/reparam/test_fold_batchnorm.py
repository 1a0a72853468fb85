"""fold_batchnorm: rewrites Conv/Gemm/MatMul + BatchNormalization (or per-channel
Mul/Add), refuses shared or non-constant weights, is idempotent and exact."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.compiler.core import graph as kir
from kiln.passes.reparam.fold_batchnorm import FoldBatchNorm, FoldBatchNormConfig

# float32 rounding of W*s and (b-mu)*s+beta, relative to the output's magnitude
RTOL = 1e-5
ATOL = 1e-5


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def _bn_inits(prefix, c, rng):
    return [_init(f"{prefix}.scale", rng.uniform(0.5, 1.5, c)),
            _init(f"{prefix}.bias", rng.standard_normal(c)),
            _init(f"{prefix}.mean", rng.standard_normal(c)),
            _init(f"{prefix}.var", rng.uniform(0.5, 1.5, c))]


def _bn(inp, out, prefix):
    return helper.make_node("BatchNormalization", [inp, f"{prefix}.scale", f"{prefix}.bias",
                                                   f"{prefix}.mean", f"{prefix}.var"], [out],
                            name=prefix, epsilon=1e-3)


def _model(nodes, inits, inputs, outputs) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=True)
    return ir.serde.deserialize_model(proto)


def _run(model: ir.Model, feeds):
    session = ort.InferenceSession(kir.model_bytes(model), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def conv_bn_model(bias=True, shared=False):
    rng = np.random.default_rng(0)
    inits = [_init("w", rng.standard_normal((8, 3, 3, 3)))] + _bn_inits("bn", 8, rng)
    conv_inputs = ["x", "w"]
    if bias:
        inits.append(_init("b", rng.standard_normal(8)))
        conv_inputs.append("b")
    nodes = [helper.make_node("Conv", conv_inputs, ["c"], name="conv", pads=[1, 1, 1, 1]),
             _bn("c", "y", "bn")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])]
    if shared:
        nodes.append(helper.make_node("Conv", ["x", "w"], ["z"], name="conv2", pads=[1, 1, 1, 1]))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 8, 8, 8]))
    return _model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                               [1, 3, 8, 8])], outputs)


def gemm_bn_model(trans_b: int):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 4) if trans_b else (4, 6))
    inits = [_init("w", w), _init("b", rng.standard_normal(6))] + _bn_inits("bn", 6, rng)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"], name="gemm", transB=trans_b,
                              alpha=0.5, beta=2.0),
             _bn("g", "y", "bn")]
    return _model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 6])])


def matmul_mul_add_model():
    rng = np.random.default_rng(2)
    inits = [_init("w", rng.standard_normal((4, 6))), _init("s", rng.uniform(0.5, 2, (1, 6))),
             _init("t", rng.standard_normal(6))]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
             helper.make_node("Mul", ["m", "s"], ["ms"], name="mul"),
             helper.make_node("Add", ["ms", "t"], ["y"], name="add")]
    return _model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 6])])


def conv_mul_add_model():
    rng = np.random.default_rng(3)
    inits = [_init("w", rng.standard_normal((8, 3, 1, 1))),
             _init("s", rng.uniform(0.5, 2, (8, 1, 1))), _init("t", rng.standard_normal((1, 8, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Mul", ["s", "c"], ["cs"], name="mul"),
             helper.make_node("Add", ["cs", "t"], ["y"], name="add")]
    return _model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                               [1, 3, 5, 5])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 5, 5])])


def _feeds(model: ir.Model, seed=0):
    rng = np.random.default_rng(seed)
    return {v.name: rng.standard_normal(kir.shape_list(v)).astype(np.float32)
            for v in kir.graph_inputs(model)}


def _assert_same(before, after):
    for a, b in zip(before, after):
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL * max(1.0, np.abs(a).max()))


def _ops(model):
    return [n.op_type for n in model.graph]


@pytest.mark.parametrize("factory, expected_ops", [
    (lambda: conv_bn_model(bias=True), ["Conv"]),
    (lambda: conv_bn_model(bias=False), ["Conv"]),
    (lambda: gemm_bn_model(trans_b=0), ["Gemm"]),
    (lambda: gemm_bn_model(trans_b=1), ["Gemm"]),
    (matmul_mul_add_model, ["MatMul", "Add"]),
    (conv_mul_add_model, ["Conv"]),
])
def test_folds_and_matches(factory, expected_ops):
    model = factory()
    feeds = _feeds(model)
    before = _run(model, feeds)
    fold = FoldBatchNorm()
    result = fold(model)
    assert result.modified
    assert [c.accepted for c in fold.last_candidates] == [True]
    assert _ops(result.model) == expected_ops
    _assert_same(before, _run(result.model, feeds))
    # graph output keeps its name; no dangling BN parameters are left
    assert [v.name for v in result.model.graph.outputs] == ["y"]
    used = {v.name for n in result.model.graph for v in n.inputs if v is not None}
    assert set(result.model.graph.initializers) <= used


def test_idempotent():
    model = conv_bn_model()
    FoldBatchNorm()(model)
    again = FoldBatchNorm()
    assert not again(model).modified
    assert again.last_candidates == []


def test_refuses_shared_weight():
    model = conv_bn_model(shared=True)
    fold = FoldBatchNorm()
    result = fold(model)
    assert not result.modified
    (candidate,) = fold.last_candidates
    assert candidate.reason == "weight 'w' is shared with conv2"
    assert "BatchNormalization" in _ops(model)


def test_refuses_non_constant_weight():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), _bn("c", "y", "bn")]
    model = _model(nodes, _bn_inits("bn", 4, rng),
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4]),
                    helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 2, 1, 1])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])])
    fold = FoldBatchNorm()
    assert not fold(model).modified
    assert fold.last_candidates[0].reason == "weight is not a constant"


def test_refuses_producer_with_two_consumers():
    model = conv_bn_model()
    conv = next(n for n in model.graph if n.op_type == "Conv")
    extra = ir.Node("", "Relu", [conv.outputs[0]], name="side", num_outputs=1)
    model.graph.append(extra)
    extra.outputs[0].name = "side_out"
    model.graph.outputs.append(extra.outputs[0])
    fold = FoldBatchNorm()
    assert not fold(model).modified
    assert fold.last_candidates[0].reason == "output of Conv has 2 consumers"


def test_refuses_non_per_channel_mul():
    rng = np.random.default_rng(0)
    inits = [_init("w", rng.standard_normal((8, 3, 1, 1))), _init("s", rng.standard_normal((5, 5)))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Mul", ["c", "s"], ["y"], name="mul")]
    model = _model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                [1, 3, 5, 5])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 5, 5])])
    fold = FoldBatchNorm()
    assert not fold(model).modified
    assert fold.last_candidates[0].reason == "Mul operand of shape [5, 5] is not per output channel"


def test_mul_add_can_be_turned_off():
    model = conv_mul_add_model()
    fold = FoldBatchNorm(FoldBatchNormConfig(mul_add=False))
    assert not fold(model).modified


def test_respects_selection():
    model = conv_bn_model()
    fold = FoldBatchNorm(selected=lambda node: node.op_type != "Conv")
    assert not fold(model).modified


def test_torch_conv_bn_exported_unoptimized():
    """A PyTorch Conv+BN exported with optimize=False keeps the BN; the pass folds it."""
    import torch

    from kiln.compiler.testing.torch_models import cnn_with_batchnorm

    module, args = cnn_with_batchnorm()
    model = torch.onnx.export(module, args, dynamo=True, optimize=False).model
    from kiln.compiler.core.frontend import fold_constants

    fold_constants(model)
    assert _ops(model).count("BatchNormalization") == 2
    feeds = {kir.graph_inputs(model)[0].name: args[0].numpy()}
    before = _run(model, feeds)
    fold = FoldBatchNorm()
    assert fold(model).modified
    assert "BatchNormalization" not in _ops(model)
    _assert_same(before, _run(model, feeds))
    with torch.no_grad():
        np.testing.assert_allclose(_run(model, feeds)[0], module(*args).numpy(), rtol=1e-4,
                                   atol=1e-4)
