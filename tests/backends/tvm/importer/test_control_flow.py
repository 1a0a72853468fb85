"""If lowered by kiln (importer.control_flow): constant conditions inlined before import
(also once shapes are bound, and nested), runtime conditions left to TVM's Relax If, small
ConstantOfShape pads folded; each built for the host and compared with ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.tvm import build_artifact, load
from kiln.backends.tvm.importer.control_flow import inline_constant_ifs
from kiln.backends.tvm.importer.prepare import prepare_onnx, walk_nodes
from kiln.compiler.core.frontend import load_model
from kiln.compiler.testing.onnx_models import to_ir
from kiln.compiler.testing.real_models import silero_vad_model
from kiln.compiler.testing.reference import ort_outputs

#: Max |kiln - ORT| for these small float32 graphs (a handful of ops per output).
ABS_TOL = 1e-5
SHAPE = [2, 3]


def _value(name, shape=None):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _branches(then_out="t", else_out="e"):
    """then: ``x * 2`` (a constant of its own); else: ``relu(x)``, both reading outer x."""
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    then_g = helper.make_graph([helper.make_node("Mul", ["x", "two"], [then_out], name="mul")],
                               "then", [], [_value(then_out, SHAPE)], [two])
    else_g = helper.make_graph([helper.make_node("Relu", ["x"], [else_out], name="relu")],
                               "else", [], [_value(else_out, SHAPE)])
    return then_g, else_g


def if_model(cond_nodes, inits=(), opset=17, x_shape=SHAPE) -> onnx.ModelProto:
    """``z = If(c, x * 2, relu(x)) + x`` with ``c`` computed by ``cond_nodes``."""
    then_g, else_g = _branches()
    nodes = list(cond_nodes) + [
        helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g,
                         name="branch"),
        helper.make_node("Add", ["y", "x"], ["z"], name="add")]
    graph = helper.make_graph(nodes, "if", [_value("x", x_shape)], [_value("z", SHAPE)],
                              list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def _build(model, tmp_path):
    build_artifact(to_ir(model), "host", tmp_path, model_hash="sha256:test")
    return load(tmp_path)


def _run(compiled, **feeds):
    out = compiled(**feeds)
    return out[0] if isinstance(out, (list, tuple)) else out


def _ifs(proto: onnx.ModelProto) -> int:
    return sum(n.op_type == "If" for n in walk_nodes(proto.graph))


@pytest.mark.parametrize("flag", [True, False])
def test_constant_condition_takes_one_branch(flag, tmp_path):
    model = if_model([], [numpy_helper.from_array(np.array(flag), "c")])
    assert _ifs(prepare_onnx(to_ir(model))) == 0
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    got = _run(_build(model, tmp_path), x=x)
    np.testing.assert_allclose(got, ort_outputs(model, {"x": x})[0], atol=ABS_TOL)


def test_condition_on_a_bound_shape_and_a_nested_if(tmp_path):
    """``If(dim(x, 1) == 3)`` whose taken branch holds another If on the same shape:
    both fold once the input shape is bound (silero-vad's decoder does this)."""
    then_g, else_g = _branches("inner_t", "inner_e")
    inner = helper.make_node("If", ["c"], ["inner"], then_branch=then_g, else_branch=else_g,
                             name="inner_if")
    outer_then = helper.make_graph([inner, helper.make_node("Neg", ["inner"], ["t"])],
                                   "outer_then", [], [_value("t", SHAPE)])
    outer_else = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "outer_else",
                                   [], [_value("e", SHAPE)])
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "one"], ["d"]),
             helper.make_node("Equal", ["d", "three"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=outer_then,
                              else_branch=outer_else, name="outer_if"),
             helper.make_node("Add", ["y", "x"], ["z"])]
    inits = [numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.array(3, np.int64), "three")]
    graph = helper.make_graph(nodes, "nested", [_value("x", ["N", "C"])], [_value("z", SHAPE)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "nested.onnx"
    onnx.save(model, path)
    bound = load_model(path, input_shapes={"x": SHAPE})
    assert _ifs(prepare_onnx(bound)) == 0
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    build_artifact(bound, "host", tmp_path / "out", model_hash="sha256:test")
    got = _run(load(tmp_path / "out"), x=x)
    np.testing.assert_allclose(got, ort_outputs(model, {"x": x})[0], atol=ABS_TOL)


def test_runtime_condition_is_a_relax_if_with_both_branches(tmp_path):
    model = if_model([helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
                      helper.make_node("Greater", ["s", "zero"], ["c"])],
                     [numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    assert _ifs(prepare_onnx(to_ir(model))) == 1
    compiled = _build(model, tmp_path)
    rng = np.random.default_rng(2)
    for sign in (1.0, -1.0):  # each branch once
        x = (np.abs(rng.standard_normal(SHAPE)) * sign).astype(np.float32)
        np.testing.assert_allclose(_run(compiled, x=x), ort_outputs(model, {"x": x})[0],
                                   atol=ABS_TOL)


def test_branch_names_cannot_collide_with_the_outer_graph():
    """Two constant Ifs with the same branch-internal names: inlined under their own
    prefixes, outputs renamed to each If's."""
    then_g, else_g = _branches()
    nodes = [helper.make_node("If", ["c"], [out], then_branch=then_g, else_branch=else_g,
                              name=name) for name, out in (("a", "ya"), ("b", "yb"))]
    graph = helper.make_graph(nodes + [helper.make_node("Add", ["ya", "yb"], ["z"])], "two",
                              [_value("x", SHAPE)], [_value("z", SHAPE)],
                              [numpy_helper.from_array(np.array(True), "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert inline_constant_ifs(model.graph) == 2
    onnx.checker.check_model(model)
    assert [n.name for n in model.graph.node][:2] == ["a/mul", "b/mul"]
    assert {i.name for i in model.graph.initializer} >= {"a/two", "b/two"}


def test_small_constant_of_shape_pads_are_folded(tmp_path):
    """PyTorch's F.pad export: pads built from ConstantOfShape + Concat (onnxscript keeps
    every ConstantOfShape by default; TVM rejects a Pad whose pads are not constant)."""
    nodes = [helper.make_node("ConstantOfShape", ["n"], ["zeros"],
                              value=numpy_helper.from_array(np.array([0], np.int64))),
             helper.make_node("Concat", ["zeros", "lead"], ["pads"], axis=0),
             helper.make_node("Pad", ["x", "pads"], ["z"], mode="reflect")]
    inits = [numpy_helper.from_array(np.array([2], np.int64), "n"),
             numpy_helper.from_array(np.array([0, 1], np.int64), "lead")]
    graph = helper.make_graph(nodes, "pad", [_value("x", [1, 6])], [_value("z", [1, 7])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(3).standard_normal((1, 6)).astype(np.float32)
    got = _run(_build(model, tmp_path), x=x)
    np.testing.assert_allclose(got, ort_outputs(model, {"x": x})[0], atol=ABS_TOL)


@pytest.mark.slow
def test_silero_vad_with_the_sample_rate_as_an_input(tmp_path):
    """silero-vad (PyPI wheel): a runtime If on ``sr`` around an 8 kHz and a 16 kHz
    network (each with Ifs on shapes inside, folded); both rates match ONNX Runtime."""
    path = silero_vad_model()
    bound = load_model(path, input_shapes={"input": [1, 256], "state": [2, 1, 128]})
    build_artifact(bound, "host", tmp_path, model_hash="sha256:test")
    compiled = load(tmp_path)
    rng = np.random.default_rng(0)
    for rate in (16000, 8000):
        feeds = {"input": rng.standard_normal((1, 256)).astype(np.float32) * 0.1,
                 "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(rate, np.int64)}
        got = compiled(**feeds)
        for g, w in zip(got, ort_outputs(onnx.load(path), feeds), strict=True):
            np.testing.assert_allclose(g, w, atol=ABS_TOL)
