"""fold_parametrization: torch weight_norm (g v / ||v||) and other constant-only weight
paths of any op become one initializer; random ops are left; a weight too large for the
frontend's constant folding is folded through the pipeline, verified, vs ORT."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from kiln.compiler.core import graph as kir
from kiln.compiler.core.frontend import load_model
from kiln.passes.reparam.fold_parametrization import (
    FoldParametrization,
    FoldParametrizationConfig,
)

# reference-evaluator vs ORT rounding of the norm and division, relative to |y|
RTOL = 1e-5


def _run(model, feeds):
    session = ort.InferenceSession(kir.model_bytes(model), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _save(nodes, inits, inputs, output, path, opset=18):
    graph = helper.make_graph(nodes, "g", inputs, [output], initializer=[
        numpy_helper.from_array(v, k) for k, v in inits.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)
    return path


def test_torch_weight_norm_folds_to_one_constant(tmp_path):
    from kiln.compiler.testing.reparam_models import weight_norm_net

    module, args = weight_norm_net()
    torch.onnx.export(module, args, tmp_path / "wn.onnx", dynamo=True, optimize=False)
    model = load_model(tmp_path / "wn.onnx", fold=False)  # the parametrization as exported
    assert sum(n.op_type == "ReduceL2" for n in model.graph) == 2
    x = args[0].numpy()
    before = _run(model, {"x": x})
    fold = FoldParametrization()
    assert fold(model).modified
    assert [n.op_type for n in model.graph] == ["Conv", "Relu", "ReduceMean", "Gemm"]
    assert sorted(c.anchor.op_type for c in fold.last_candidates) == ["Conv", "Gemm",
                                                                     "ReduceMean"]
    after = _run(model, {"x": x})
    scale = np.abs(before).max()
    np.testing.assert_allclose(after, before, atol=RTOL * scale)
    np.testing.assert_allclose(after, module(*args).detach().numpy(), atol=RTOL * scale)
    assert not FoldParametrization()(model).modified  # idempotent


def test_any_op_and_the_ops_option(tmp_path):
    """A LayerNormalization scale computed as a - b: folded unless ``ops`` leaves it out."""
    rng = np.random.default_rng(0)
    inits = {"a": rng.standard_normal(6).astype(np.float32),
             "b": rng.standard_normal(6).astype(np.float32),
             "beta": np.zeros(6, np.float32)}
    nodes = [helper.make_node("Sub", ["a", "b"], ["gamma"]),
             helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["y"])]
    path = _save(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 6])],
                 helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 6]),
                 tmp_path / "ln.onnx")
    x = rng.standard_normal((3, 6)).astype(np.float32)
    model = load_model(path, fold=False)
    assert not FoldParametrization(FoldParametrizationConfig(ops=["Conv"]))(model).modified
    before = _run(model, {"x": x})
    assert FoldParametrization()(model).modified
    assert [n.op_type for n in model.graph] == ["LayerNormalization"]
    np.testing.assert_allclose(_run(model, {"x": x}), before, atol=RTOL)


def test_random_weight_path_is_left(tmp_path):
    nodes = [helper.make_node("RandomNormal", [], ["noise"], shape=[4, 4], seed=1.0),
             helper.make_node("Add", ["noise", "w"], ["w2"]),
             helper.make_node("MatMul", ["x", "w2"], ["y"])]
    path = _save(nodes, {"w": np.eye(4, dtype=np.float32)},
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                 helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4]),
                 tmp_path / "rand.onnx")
    model = load_model(path, fold=False)
    fold = FoldParametrization()
    assert not fold(model).modified
    assert fold.last_candidates == []
    assert [n.op_type for n in model.graph] == ["RandomNormal", "Add", "MatMul"]


def test_large_weight_norm_through_the_pipeline(tmp_path):
    """v has 2048 x 2100 elements, over the frontend folder's input limit (1 << 22): the
    parametrization reaches the passes and fold_parametrization folds it, verified."""
    from kiln.compiler.driver.compile import compile_model
    from kiln.compiler.driver.specs import spec_from_text

    rng = np.random.default_rng(0)
    m, n = 2100, 2048
    inits = {"v": rng.standard_normal((n, m)).astype(np.float32),
             "g": rng.uniform(0.5, 2.0, (n, 1)).astype(np.float32),
             "axes": np.array([1], np.int64)}
    nodes = [helper.make_node("ReduceL2", ["v", "axes"], ["norm"], keepdims=1),
             helper.make_node("Div", ["g", "norm"], ["scale"]),
             helper.make_node("Mul", ["v", "scale"], ["w"]),
             helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)]
    path = _save(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, m])],
                 helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n]),
                 tmp_path / "big.onnx")
    result = compile_model(path, spec_from_text("kiln: 1\npasses:\n  - fold_parametrization: {}\n"))
    report = next(p for p in result.report.passes if p.name == "fold_parametrization")
    assert report.matched == 1 and report.note.startswith("3 node(s) folded")
    assert [node.op_type for node in result.model.graph] == ["Gemm"]
    x = rng.standard_normal((2, m)).astype(np.float32)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    w = inits["v"] * (inits["g"] / np.linalg.norm(inits["v"], axis=1, keepdims=True))
    np.testing.assert_allclose(_run(result.model, {"x": x}), expected,
                               atol=RTOL * np.abs(expected).max())
    np.testing.assert_allclose(expected, x @ w.T, atol=RTOL * np.abs(expected).max())
