"""NonMaxSuppression's greedy loop (importer.nms_loop): each class in a parallel task, a
candidate checked against the boxes kept so far; the same boxes as ONNX Runtime on many
overlapping boxes and classes, on boxes whose scores are <= 0 (ONNX suppresses those too;
TOPI's loop kept them), and TOPI's own loop is back after a build."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.tvm import build_artifact, load
from kiln.compiler.testing.onnx_models import to_ir
from kiln.compiler.testing.reference import ort_outputs

pytest.importorskip("tvm")


def nms_model(boxes: int, classes: int, max_out: int, iou: float,
              score: float | None) -> onnx.ModelProto:
    operands = [("max_out", np.array([max_out], np.int64)), ("iou", np.array([iou], np.float32))]
    if score is not None:
        operands.append(("score", np.array([score], np.float32)))
    graph = helper.make_graph(
        [helper.make_node("NonMaxSuppression", ["boxes", "scores"] + [n for n, _ in operands],
                          ["selected"], name="nms")], "nms",
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, boxes, 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, classes, boxes])],
        [helper.make_tensor_value_info("selected", TensorProto.INT64, None)],
        [numpy_helper.from_array(v, n) for n, v in operands])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])


def _boxes(count: int, rng) -> np.ndarray:
    corner = rng.uniform(0, 60, (1, count, 2)).astype(np.float32)
    size = rng.uniform(5, 30, (1, count, 2)).astype(np.float32)  # dense: many overlaps
    return np.concatenate([corner, corner + size], axis=-1)


@pytest.mark.parametrize("max_out, iou, score, signed", [
    (20, 0.5, 0.3, False),    # a score filter and a limit that is reached
    (500, 0.3, None, True),   # no filter: negative scores and overlapping boxes
    (0, 0.5, None, False),    # a limit of 0: nothing
], ids=["limit", "negative-scores", "limit-0"])
def test_greedy_loop_matches_ort(tmp_path, max_out, iou, score, signed):
    rng = np.random.default_rng(3)
    boxes = _boxes(300, rng)
    scores = rng.uniform(-1 if signed else 0, 1, (1, 7, 300)).astype(np.float32)
    model = nms_model(300, 7, max_out, iou, score)
    build_artifact(to_ir(model), "host", tmp_path, model_hash="sha256:test")
    got = load(tmp_path)(boxes=boxes, scores=scores)
    got = np.asarray(got[0] if isinstance(got, (list, tuple)) else got).reshape(-1, 3)
    want = ort_outputs(model, {"boxes": boxes, "scores": scores})[0]
    np.testing.assert_array_equal(got, want)
    if max_out:
        assert len(want) > 7  # the case selects boxes in several classes


def test_topi_loop_restored():
    from tvm.topi.vision import nms

    from kiln.backends.tvm.importer.nms_loop import greedy_loop, kiln_nms_loop

    before = nms._nms_loop
    with greedy_loop():
        assert nms._nms_loop is kiln_nms_loop
    assert nms._nms_loop is before
