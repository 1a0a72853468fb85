"""dedupe_weights: byte-identical initializers stored once, exactly."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from kiln.compiler.core import graph as kir
from kiln.passes.share.dedupe_weights import DedupeWeights, DedupeWeightsConfig


def _model(weights: dict[str, np.ndarray], extra_inputs=()) -> ir.Model:
    nodes, outputs = [], []
    for i, name in enumerate(weights):
        nodes.append(helper.make_node("MatMul", ["x", name], [f"y{i}"], name=f"mm{i}"))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [2, 4]))
    inits = [numpy_helper.from_array(w, n) for n, w in weights.items()]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])]
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3, 4]) for n in extra_inputs]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def _run(model, x):
    session = ort.InferenceSession(kir.model_bytes(model), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def test_merges_identical_weights_exactly():
    w = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    other = w.copy()
    other[0, 0] += 1
    model = _model({"a": w, "b": w.copy(), "c": other, "d": w.copy()})
    x = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)
    before = _run(model, x)
    dedupe = DedupeWeights()
    result = dedupe(model)
    assert result.modified
    (candidate,) = dedupe.last_candidates
    assert candidate.label == "a = b = d"
    assert sorted(model.graph.initializers) == ["a", "c"]
    assert [n.inputs[1].name for n in model.graph] == ["a", "a", "c", "a"]
    for got, want in zip(_run(model, x), before):
        np.testing.assert_array_equal(got, want)
    assert kir.count_weight_bytes(model) == 2 * w.nbytes


def test_idempotent():
    w = np.ones((3, 4), np.float32)
    model = _model({"a": w, "b": w.copy()})
    DedupeWeights()(model)
    again = DedupeWeights()
    assert not again(model).modified
    assert again.last_candidates == []


def test_leaves_graph_inputs_alone():
    w = np.ones((3, 4), np.float32)
    model = _model({"a": w, "b": w.copy()}, extra_inputs=("a", "b"))
    dedupe = DedupeWeights()
    assert not dedupe(model).modified
    assert dedupe.last_candidates[0].reason.startswith("the copies are graph inputs")


def test_dtype_and_shape_must_match():
    model = _model({"a": np.zeros((3, 4), np.float32)})
    # same bytes, different shape: not a duplicate
    value = ir.Value(name="z", const_value=ir.tensor(np.zeros((4, 3), np.float32), name="z"))
    model.graph.register_initializer(value)
    node = ir.Node("", "Transpose", [value], name="t", num_outputs=1)
    model.graph.append(node)
    dedupe = DedupeWeights()
    assert not dedupe(model).modified


def test_min_elements_and_selection():
    w = np.ones((3, 4), np.float32)
    model = _model({"a": w, "b": w.copy()})
    assert not DedupeWeights(DedupeWeightsConfig(min_elements=13))(model).modified
    only_first = DedupeWeights(selected=lambda n: n.name == "mm0")
    assert not only_first(model).modified
    assert DedupeWeights()(model).modified
