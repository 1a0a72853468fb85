"""Expand over symbolic dims (importer.expand): the rows a torch export of a Mixtral-style
MoE layer selects per expert (NonZero: a data-dependent count) are expanded to
``Shape(zeros[0:1])``, a target dim TVM only knows as ``min(1, tokens)``; TVM 0.27 broadcast
to it literally (wrong numbers, a segfault with no row selected), and failed outright with a
constant target (``'Var' object has no attribute 'value'``)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.compiler.driver.symbolic import load_with_symbols

pytest.importorskip("tvm")

WIDTH = 8


def _const(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
        np.array(values, np.int64), name))


def selected_rows_model(path, constant_target: bool) -> str:
    """y = the rows of x whose first value is > 0 scattered back into zeros (index_add's
    export), the rows broadcast through Expand first."""
    target = ([_const("target", [1, WIDTH])] if constant_target else [
        _const("s0", [0, 0]), _const("e1", [1, 2**63 - 1]), _const("ax", [0, 1]),
        helper.make_node("Slice", ["zeros", "s0", "e1", "ax"], ["first"]),
        helper.make_node("Shape", ["first"], ["target"])])
    nodes = [
        _const("c0", [0]), _const("c1", [1]),
        helper.make_node("Slice", ["x", "c0", "c1", "c1"], ["col"]),
        helper.make_node("Squeeze", ["col", "c1"], ["col1"]),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(
            np.array(0, np.float32), "zero")),
        helper.make_node("Greater", ["col1", "zero"], ["mask"]),
        helper.make_node("NonZero", ["mask"], ["nz"]),
        helper.make_node("Squeeze", ["nz", "c0"], ["rows"]),
        helper.make_node("Gather", ["x", "rows"], ["picked"], axis=0),
        helper.make_node("Shape", ["x"], ["xs"]),
        helper.make_node("ConstantOfShape", ["xs"], ["zeros"]),
        *target,
        helper.make_node("Expand", ["picked", "target"], ["updates"]),
        helper.make_node("Unsqueeze", ["rows", "c1"], ["rows1"]),
        helper.make_node("Shape", ["updates"], ["us"]),
        helper.make_node("Expand", ["rows1", "us"], ["index"]),
        helper.make_node("ScatterElements", ["zeros", "index", "updates"], ["y"], axis=0)]
    graph = helper.make_graph(
        nodes, "selected_rows", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                               ["T", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", WIDTH])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return str(path)


@pytest.mark.parametrize("constant_target", [False, True])
def test_expand_of_selected_rows_matches_ort(tmp_path, constant_target):
    from kiln.backends.tvm import build_artifact, load

    path = selected_rows_model(tmp_path / "m.onnx", constant_target)
    model = load_with_symbols(path, {"x": ["T=1..64", WIDTH]})
    build_artifact(model, "host", tmp_path / "out", model_hash="t")
    compiled = load(tmp_path / "out", threads=1)
    session = ort.InferenceSession(path)
    rng = np.random.default_rng(0)
    for tokens in (1, 5, 64):
        x = rng.standard_normal((tokens, WIDTH)).astype(np.float32)
        x[0, 0] = -1.0  # row 0 never selected; with one token, none is
        np.testing.assert_array_equal(compiled(x)[0], session.run(None, {"x": x})[0])


def test_broadcast_dims_follow_onnx():
    import tvm

    from kiln.backends.tvm.importer.expand import expanded_shape

    n, m = tvm.tirx.Var("n", "int64"), tvm.tirx.Var("m", "int64")
    one, eight = tvm.tirx.IntImm("int64", 1), tvm.tirx.IntImm("int64", 8)
    out = expanded_shape([n, eight], [one, one])
    assert out[0].same_as(n) and int(out[1]) == 8
    out = expanded_shape([one, n], [m, eight])  # a 1 takes the other; 8 fixes n
    assert out[0].same_as(m) and int(out[1]) == 8
    out = expanded_shape([n], [eight, m])  # right-aligned
    assert int(out[0]) == 8 and isinstance(out[1], tvm.tirx.Select)
