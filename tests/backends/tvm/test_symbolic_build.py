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


@pytest.mark.parametrize("depthwise, rule", [(False, "contraction"), (True, "window")])
def test_symbolic_conv_keeps_its_rule(tmp_path, depthwise, rule):
    from kiln.backends.tvm import build_artifact, load

    path = conv_line_model(tmp_path / "m.onnx", depthwise=depthwise)
    channels = 16 if depthwise else 3
    model = load_with_symbols(str(path), {"x": [1, channels, 16, "W=5..200"]})
    built = build_artifact(model, "host", tmp_path / "out", model_hash="t")
    assert rule in built.rules.values() and built.unscheduled == [], built.rules
    static = build_artifact(load_with_symbols(str(path), {"x": [1, channels, 16, 48]}), "host",
                            tmp_path / "static", model_hash="t")
    assert rule in static.rules.values()
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
