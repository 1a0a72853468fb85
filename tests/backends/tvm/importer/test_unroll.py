"""Static Scan and Loop unrolled before import (importer.unroll): states, directions and
scan-output axes built for the host and compared with ONNX Runtime; a Loop whose
condition is computed is left alone (and refused as an unsupported op)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.tvm import build_artifact, load, lower_to_relax
from kiln.compiler.core.errors import LoweringError
from kiln.compiler.testing.onnx_models import to_ir
from kiln.compiler.testing.reference import ort_outputs

#: Max |kiln - ORT| (a few float32 adds and multiplies per element).
ABS_TOL = 1e-5


def _v(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def scan_model(opset: int, **attrs) -> onnx.ModelProto:
    """Scan over x [4, 3] (axis 0) and w [3, 4] (axis 1) with states sum [3] and prod [3];
    scan outputs: the running sum and ``sum * w_t``."""
    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "xt"], ["s_out"]),
         helper.make_node("Mul", ["p_in", "wt"], ["p_out"]),
         helper.make_node("Identity", ["s_out"], ["y1"]),
         helper.make_node("Mul", ["s_out", "wt"], ["y2"])], "body",
        [_v("s_in", [3]), _v("p_in", [3]), _v("xt", [3]), _v("wt", [3])],
        [_v("s_out", [3]), _v("p_out", [3]), _v("y1", [3]), _v("y2", [3])])
    node = helper.make_node("Scan", ["s0", "p0", "x", "w"], ["s", "p", "ys", "zs"], body=body,
                            num_scan_inputs=2, name="scan", **attrs)
    graph = helper.make_graph([node], "scan",
                              [_v("s0", [3]), _v("p0", [3]), _v("x", [4, 3]), _v("w", [3, 4])],
                              [_v("s", [3]), _v("p", [3]), _v("ys", None), _v("zs", None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return model


def loop_model(trip: int, computed_condition: bool = False) -> onnx.ModelProto:
    """for i in range(trip): acc = acc * 0.5 + i; scan out acc."""
    cond_node = (helper.make_node("Less", ["acc_out", "limit"], ["cond_out"]) if computed_condition
                 else helper.make_node("Identity", ["cond_in"], ["cond_out"]))
    body = helper.make_graph(
        [helper.make_node("Cast", ["i"], ["fi"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["acc_in", "half"], ["scaled"]),
         helper.make_node("Add", ["scaled", "fi"], ["acc_out"]),
         cond_node,
         helper.make_node("Identity", ["acc_out"], ["scan"])], "body",
        [_v("i", [], TensorProto.INT64), _v("cond_in", [], TensorProto.BOOL), _v("acc_in", [2])],
        [_v("cond_out", [], TensorProto.BOOL), _v("acc_out", [2]), _v("scan", [2])],
        [numpy_helper.from_array(np.array(0.5, np.float32), "half"),
         numpy_helper.from_array(np.array(100.0, np.float32), "limit")])
    inits = [numpy_helper.from_array(np.array(trip, np.int64), "M"),
             numpy_helper.from_array(np.array(True), "c")]
    graph = helper.make_graph(
        [helper.make_node("Loop", ["M", "c", "acc0"], ["acc", "history"], body=body,
                          name="loop")],
        "loop", [_v("acc0", [2])], [_v("acc", [2]), _v("history", None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model


def _compare(model, feeds, tmp_path):
    build_artifact(to_ir(model), "host", tmp_path, model_hash="sha256:test")
    got = load(tmp_path)(**feeds)
    got = got if isinstance(got, (list, tuple)) else [got]
    want = ort_outputs(model, feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=ABS_TOL)


@pytest.mark.parametrize("opset, attrs", [
    (9, {"scan_input_axes": [0, 1]}),
    (17, {"scan_input_axes": [0, 1], "scan_input_directions": [1, 0],
          "scan_output_axes": [1, 0], "scan_output_directions": [0, 1]}),
], ids=["opset9", "reverse-and-axes"])
def test_static_scan_is_unrolled_and_matches_ort(opset, attrs, tmp_path):
    model = scan_model(opset, **attrs)
    assert "Scan" not in lower_to_relax(to_ir(model)).script()
    rng = np.random.default_rng(0)
    feeds = {"s0": rng.standard_normal(3).astype(np.float32),
             "p0": rng.standard_normal(3).astype(np.float32),
             "x": rng.standard_normal((4, 3)).astype(np.float32),
             "w": rng.standard_normal((3, 4)).astype(np.float32)}
    _compare(model, feeds, tmp_path)


def test_loop_with_a_constant_trip_count_matches_ort(tmp_path):
    _compare(loop_model(5), {"acc0": np.array([1.0, -2.0], np.float32)}, tmp_path)


def test_loop_with_a_computed_condition_is_refused():
    with pytest.raises(LoweringError, match=r"unsupported op type.*Loop \(node 'loop'\)"):
        lower_to_relax(to_ir(loop_model(5, computed_condition=True)))
