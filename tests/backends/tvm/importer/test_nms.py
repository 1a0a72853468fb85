"""NonMaxSuppression (importer.standard_converters.ConstantThresholdNMS): ONNX's defaults
for absent operands, ONNX's strict IoU comparison, runtime operands as tensors
(importer.runtime_nms); the kernel builds (the elementwise rule leaves IR-builder code
alone) and matches ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.tvm import build_artifact, load, lower_to_relax
from kiln.compiler.testing.onnx_models import to_ir
from kiln.compiler.testing.reference import ort_outputs

BOXES = np.array([[[0.0, 0.0, 1.0, 1.0], [0.0, 0.1, 1.0, 1.1], [0.0, -0.1, 1.0, 0.9],
                   [0.0, 10.0, 1.0, 11.0], [0.0, 10.1, 1.0, 11.1], [0.0, 100.0, 1.0, 101.0],
                   # inside box 0, half its area: IoU exactly 0.5
                   [0.0, 0.0, 1.0, 0.5]]], np.float32)
SCORES = np.array([[[0.9, 0.75, 0.6, 0.95, 0.5, 0.3, 0.85],
                    [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]]], np.float32)


def nms_model(operands: dict, runtime: tuple[str, ...] = (), **attrs) -> onnx.ModelProto:
    """NMS on boxes [1, 7, 4] and scores [1, 2, 7]; ``operands`` maps an optional input
    name to its constant value (absent: left out), ``runtime`` names graph inputs."""
    names, inits = ["boxes", "scores"], []
    inputs = [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, list(BOXES.shape)),
              helper.make_tensor_value_info("scores", TensorProto.FLOAT, list(SCORES.shape))]
    for name, kind in (("max_out", np.int64), ("iou", np.float32), ("score", np.float32)):
        if name in runtime:
            inputs.append(helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(np.dtype(kind)), [1]))
            names.append(name)
        elif name in operands:
            inits.append(numpy_helper.from_array(np.array([operands[name]], kind), name))
            names.append(name)
        else:
            names.append("")
    while names[-1] == "":
        names.pop()
    graph = helper.make_graph(
        [helper.make_node("NonMaxSuppression", names, ["selected"], name="nms", **attrs)],
        "nms", inputs, [helper.make_tensor_value_info("selected", TensorProto.INT64, None)],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])


@pytest.mark.parametrize("operands, attrs", [
    ({"max_out": 3, "iou": 0.5, "score": 0.0}, {}),      # box 6 sits exactly at IoU 0.5
    ({"max_out": 2}, {}),                                # iou 0: any overlap suppresses
    ({"max_out": 10, "iou": 0.4}, {}),                   # no score threshold
    ({"max_out": 2, "iou": 0.5, "score": 0.55}, {"center_point_box": 1}),
], ids=["iou-boundary", "defaults", "no-score-threshold", "center-boxes"])
def test_nms_matches_ort(operands, attrs, tmp_path):
    model = nms_model(operands, **attrs)
    build_artifact(to_ir(model), "host", tmp_path, model_hash="sha256:test")
    got = load(tmp_path)(boxes=BOXES, scores=SCORES)
    got = got[0] if isinstance(got, (list, tuple)) else got
    np.testing.assert_array_equal(got, ort_outputs(model, {"boxes": BOXES, "scores": SCORES})[0])


#: (max_output_boxes_per_class, iou_threshold, score_threshold) fed at run time: the
#: IoU-0.5 boundary (box 6), a limit of 1 and of 0 (no boxes), a limit past int32 with a
#: score filter, IoU 0 (any overlap suppresses) with every score passing
RUNTIME_OPERANDS = [(3, 0.5, 0.0), (1, 0.5, 0.0), (0, 0.5, 0.0), (2**40, 0.4, 0.55),
                    (5, 0.0, -1.0)]


def test_runtime_operands_match_ort_for_each_value(tmp_path):
    """One build serves every runtime value: TVM's converter would have run with a limit
    of 0 (no boxes), its legalization with no limit."""
    model = nms_model({}, runtime=("max_out", "iou", "score"))
    model.graph.output[0].CopyFrom(
        helper.make_tensor_value_info("selected", TensorProto.INT64, [3, 3]))
    build_artifact(to_ir(model), "host", tmp_path, model_hash="sha256:test")
    run = load(tmp_path)
    counts = set()
    for limit, iou, score in RUNTIME_OPERANDS:
        feeds = {"boxes": BOXES, "scores": SCORES, "max_out": np.array([limit], np.int64),
                 "iou": np.array([iou], np.float32), "score": np.array([score], np.float32)}
        got = run(**feeds)
        got = got[0] if isinstance(got, (list, tuple)) else got
        want = ort_outputs(model, feeds)[0]
        np.testing.assert_array_equal(np.asarray(got).reshape(-1, 3), want)
        counts.add(len(want))
    assert counts == {0, 2, 4, 6}


def test_runtime_limit_alone_keeps_constant_thresholds(tmp_path):
    model = nms_model({"iou": 0.5, "score": 0.0}, runtime=("max_out",))
    model.graph.output[0].CopyFrom(
        helper.make_tensor_value_info("selected", TensorProto.INT64, [2, 3]))
    mod = lower_to_relax(to_ir(model))
    assert "kiln_nms" in {gv.name_hint for gv in mod.get_global_vars()}
    build_artifact(to_ir(model), "host", tmp_path, model_hash="sha256:test")
    feeds = {"boxes": BOXES, "scores": SCORES, "max_out": np.array([2], np.int64)}
    got = load(tmp_path)(**feeds)
    got = got[0] if isinstance(got, (list, tuple)) else got
    np.testing.assert_array_equal(np.asarray(got).reshape(-1, 3), ort_outputs(model, feeds)[0])
