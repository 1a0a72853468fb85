"""The TVM build with a symbolic input dim: kiln's rules schedule the kernels real OCR
and sequence models hit (contraction with symbolic rows, window with a symbolic output
row), the results match ONNX Runtime at widths that leave tile tails, and the static
path keeps its rules."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from kiln.compiler.driver.symbolic import load_with_symbols
from kiln.compiler.testing.symbolic_models import conv_line_model

pytest.importorskip("tvm")


@pytest.mark.parametrize("depthwise, rule, static_rule", [
    (False, "symbolic_contraction", "contraction"), (True, "window", "window")])
def test_symbolic_conv_keeps_its_rule(tmp_path, depthwise, rule, static_rule):
    from kiln.backends.tvm import build_artifact, load

    path = conv_line_model(tmp_path / "m.onnx", depthwise=depthwise)
    channels = 16 if depthwise else 3
    model = load_with_symbols(str(path), {"x": [1, channels, 16, "W=5..200"]})
    built = build_artifact(model, "host", tmp_path / "out", model_hash="t")
    assert rule in built.rules.values() and built.unscheduled == [], built.rules
    static = build_artifact(load_with_symbols(str(path), {"x": [1, channels, 16, 48]}), "host",
                            tmp_path / "static", model_hash="t")
    assert static_rule in static.rules.values()
    assert "symbolic_contraction" not in static.rules.values()  # static kernels: dense's
    compiled = load(tmp_path / "out")
    session = ort.InferenceSession(onnx.load(path).SerializeToString())
    rng = np.random.default_rng(0)
    for width in (5, 17, 33, 200):
        x = rng.standard_normal((1, channels, 16, width)).astype(np.float32)
        np.testing.assert_allclose(compiled(x)[0], session.run(None, {"x": x})[0],
                                   rtol=1e-4, atol=1e-4)


def test_shape_round_trip_removed():
    """Shape -> Cast(int32) -> Slice -> Cast(int64) -> Reshape (paddle2onnx): the casts go,
    so TVM's importer keeps a shape; a Cast read by anything else stays."""
    from onnx import TensorProto, helper

    from kiln.backends.tvm.importer.symbolic_shapes import drop_shape_round_trips

    def const(name, values):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(
            name, TensorProto.INT64, [len(values)], values))

    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Cast", ["s"], ["s32"], to=TensorProto.INT32),
             const("a", [0]), const("b", [2]),
             helper.make_node("Slice", ["s32", "a", "b"], ["part"]),
             helper.make_node("Cast", ["part"], ["p64"], to=TensorProto.INT64),
             helper.make_node("Reshape", ["x", "p64"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [2, "W"])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, None)])
    assert drop_shape_round_trips(graph) == 1
    assert [n.op_type for n in graph.node] == ["Shape", "Constant", "Constant", "Slice",
                                              "Reshape"]
    assert list(graph.node[3].input) == ["s", "a", "b"] and graph.node[4].input[1] == "part"
    graph.node.append(helper.make_node("Cast", ["s"], ["t32"], to=TensorProto.INT32))
    graph.node.append(helper.make_node("Add", ["t32", "t32"], ["u"]))
    assert drop_shape_round_trips(graph) == 0


@pytest.mark.slow
def test_ppocr_rec_one_build_for_every_width(tmp_path):
    """PP-OCRv4 rec (paddle2onnx: Shape -> Cast(int32) -> Slice -> Cast -> Reshape) built
    once for W=32..1024; the driver checks it against ONNX Runtime at W=32, 528, 1024,
    and odd widths match too. No kernel is left to the generic schedule (the attention's
    matmuls over the symbolic sequence included)."""
    from kiln.backends.tvm import load
    from kiln.compiler.driver.compile import compile_to_folder
    from kiln.compiler.testing.real_models import rapidocr_model

    path = rapidocr_model("rec")
    result = compile_to_folder(path, "reparam", tmp_path / "out",
                               input_shapes={"x": [1, 3, 48, "W=32..1024"]}, target="host")
    assert result.report.compiled.verified
    assert result.report.compiled.unscheduled == [], result.report.compiled.unscheduled
    compiled = load(tmp_path / "out")
    assert compiled.manifest.dims == {"W": [32, 1024]}
    session = ort.InferenceSession(str(path))
    for width in (33, 321):
        x = np.random.default_rng(width).random((1, 3, 48, width), dtype=np.float32)
        np.testing.assert_allclose(compiled(x)[0], session.run(None, {"x": x})[0],
                                   rtol=1e-3, atol=1e-4)


def test_symbolic_rows_padded_columns(tmp_path):
    """PP-OCR rec's head (rows symbolic, 6625 columns: no register tile divides them): the
    columns are padded to a tile (B's zeros packed at compile time) and the rows guarded;
    results match at row counts that leave a tail tile."""
    from onnx import TensorProto, helper, numpy_helper

    from kiln.backends.tvm import build_artifact, load

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((120, 6625)) / 11).astype(np.float32)
    b = rng.standard_normal(6625).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["t"]), helper.make_node("Add", ["t", "b"], ["y"])],
        "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "R", 120])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "R", 6625])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    path = tmp_path / "head.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    model = load_with_symbols(str(path), {"x": [1, "R=1..128", 120]})
    built = build_artifact(model, "host", tmp_path / "out", model_hash="t")
    assert list(built.rules.values()) == ["symbolic_contraction"], built.rules
    compiled = load(tmp_path / "out")
    for rows in (1, 5, 37, 40, 128):
        x = rng.standard_normal((1, rows, 120)).astype(np.float32)
        np.testing.assert_allclose(compiled(x)[0], x.astype(np.float64) @ w + b,
                                   rtol=1e-4, atol=1e-4)
