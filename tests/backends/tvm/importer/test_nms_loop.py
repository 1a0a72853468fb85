"""NonMaxSuppression as kiln's own kernel (importer.nms_loop): score filter, a heap per
class, each popped box against the boxes kept so far. The same boxes as ONNX Runtime on
random and adversarial boxes (equal scores, identical and zero-area boxes, flipped
corners, boxes <= 0 in score, two batches, center boxes, IoU exactly at the threshold, box
counts off the vector width, limits past the candidates); the kernel is scheduled, has no
race and no sort call; TOPI's loop is left alone."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.tvm import build_artifact, load
from kiln.compiler.testing.onnx_models import to_ir
from kiln.compiler.testing.reference import ort_outputs

pytest.importorskip("tvm")


def nms_model(boxes: int, classes: int, max_out: int, iou: float, score: float | None,
              batch: int = 1, center: int = 0) -> onnx.ModelProto:
    operands = [("max_out", np.array([max_out], np.int64)), ("iou", np.array([iou], np.float32))]
    if score is not None:
        operands.append(("score", np.array([score], np.float32)))
    graph = helper.make_graph(
        [helper.make_node("NonMaxSuppression", ["boxes", "scores"] + [n for n, _ in operands],
                          ["selected"], name="nms", center_point_box=center)], "nms",
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [batch, boxes, 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, classes, boxes])],
        [helper.make_tensor_value_info("selected", TensorProto.INT64, None)],
        [numpy_helper.from_array(v, n) for n, v in operands])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])


def _boxes(count: int, rng, batch: int = 1) -> np.ndarray:
    corner = rng.uniform(0, 60, (batch, count, 2)).astype(np.float32)
    size = rng.uniform(5, 30, (batch, count, 2)).astype(np.float32)  # dense: many overlaps
    return np.concatenate([corner, corner + size], axis=-1)


def _adversarial(count: int, rng, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes on a coarse grid (identical boxes, IoUs exactly 0.5: a box and its half),
    every third with its corners flipped, some of zero area; scores from four values
    (ties everywhere), some <= 0."""
    boxes = _boxes(count, rng, batch).round()
    boxes[:, 1::7, 3] = boxes[:, 1::7, 1] + (boxes[:, 1::7, 3] - boxes[:, 1::7, 1]) / 2
    boxes[:, 2::7] = boxes[:, 1:-1:7][:, :boxes[:, 2::7].shape[1]]      # identical boxes
    boxes[:, 5::11, 2] = boxes[:, 5::11, 0]                             # zero area
    boxes[:, ::3] = boxes[:, ::3][..., [2, 3, 0, 1]]                    # flipped corners
    scores = rng.integers(-1, 3, (batch, 6, count)).astype(np.float32) / 2
    return boxes, scores


def _check(tmp_path, model, boxes, scores):
    built = build_artifact(to_ir(model), "host", tmp_path, model_hash="sha256:test")
    got = load(tmp_path)(boxes=boxes, scores=scores)
    got = np.asarray(got[0] if isinstance(got, (list, tuple)) else got).reshape(-1, 3)
    want = ort_outputs(model, {"boxes": boxes, "scores": scores})[0]
    np.testing.assert_array_equal(got, want)
    return built, want


@pytest.mark.parametrize("max_out, iou, score, signed", [
    (20, 0.5, 0.3, False),    # a score filter and a limit that is reached
    (500, 0.3, None, True),   # no filter: negative scores and overlapping boxes
    (0, 0.5, None, False),    # a limit of 0: nothing
], ids=["limit", "negative-scores", "limit-0"])
def test_greedy_loop_matches_ort(tmp_path, max_out, iou, score, signed):
    rng = np.random.default_rng(3)
    boxes = _boxes(300, rng)
    scores = rng.uniform(-1 if signed else 0, 1, (1, 7, 300)).astype(np.float32)
    _, want = _check(tmp_path, nms_model(300, 7, max_out, iou, score), boxes, scores)
    if max_out:
        assert len(want) > 7  # the case selects boxes in several classes


@pytest.mark.parametrize("count, max_out, iou, score, center", [
    (203, 40, 0.5, 0.0, 0),     # ties, IoU exactly 0.5, 203 = 12 vectors of 16 and 11
    (37, 1000, 0.0, None, 0),   # a limit past the box count; any overlap suppresses
    (90, 3, 0.5, -0.5, 1),      # center boxes, a limit of 3 reached early
], ids=["ties-boundary", "limit-past-boxes", "center"])
def test_adversarial_boxes_match_ort(tmp_path, count, max_out, iou, score, center):
    rng = np.random.default_rng(count)
    boxes, scores = _adversarial(count, rng, batch=2)
    if center:  # [xc, yc, w, h]; negative sizes too
        boxes = np.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], axis=-1)
    model = nms_model(count, 6, max_out, iou, score, batch=2, center=center)
    _, want = _check(tmp_path, model, boxes, scores)
    assert set(want[:, 0]) == {0, 1} and len(want) > 12


def test_kernel_is_scheduled_without_race_or_sort(tmp_path):
    import tvm
    from tvm import relax

    from kiln.backends.tvm import lower_to_relax
    from kiln.backends.tvm.importer.nms_loop import greedy_legalize_map

    rng = np.random.default_rng(5)
    model = nms_model(64, 3, 10, 0.5, 0.2)
    built, _ = _check(tmp_path, model, _boxes(64, rng),
                      rng.uniform(0, 1, (1, 3, 64)).astype(np.float32))
    assert built.unscheduled == [] and built.races == {}, (built.unscheduled, built.races)
    assert "kiln_nms" in built.rules
    mod = relax.transform.LegalizeOps(greedy_legalize_map())(lower_to_relax(to_ir(model)))
    kernels = [f.script() for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert kernels and not any("sort" in k for k in kernels)  # TOPI sorted every class


def test_topi_loop_left_alone(tmp_path):
    from tvm.topi.vision import nms

    before = nms._nms_loop
    rng = np.random.default_rng(1)
    _check(tmp_path, nms_model(32, 2, 5, 0.5, 0.1), _boxes(32, rng),
           rng.uniform(0, 1, (1, 2, 32)).astype(np.float32))
    assert nms._nms_loop is before


@pytest.mark.parametrize("runtime_limit", [False, True], ids=["constant", "runtime-limit"])
def test_no_score_threshold_keeps_every_score(tmp_path, runtime_limit):
    """Without the operand every box is a candidate, -inf and -FLT_MAX scores too (kiln
    filtered with ``> -FLT_MAX`` before and dropped them)."""
    boxes = np.array([[[0, 0, 1, 1], [0, 2, 1, 3], [0, 4, 1, 5], [0, 4, 1, 5.5]]], np.float32)
    scores = np.array([[[-np.inf, np.finfo(np.float32).min, 0.5, -np.inf]]], np.float32)
    model = nms_model(4, 1, 10, 0.5, None)
    feeds = {"boxes": boxes, "scores": scores}
    if runtime_limit:
        model.graph.initializer.pop(0)  # max_out becomes a graph input
        model.graph.input.append(helper.make_tensor_value_info("max_out", TensorProto.INT64, [1]))
        model.graph.output[0].CopyFrom(
            helper.make_tensor_value_info("selected", TensorProto.INT64, [3, 3]))
        feeds["max_out"] = np.array([10], np.int64)
    build_artifact(to_ir(model), "host", tmp_path, model_hash="sha256:test")
    got = load(tmp_path)(**feeds)
    got = np.asarray(got[0] if isinstance(got, (list, tuple)) else got).reshape(-1, 3)
    want = ort_outputs(model, feeds)[0]
    np.testing.assert_array_equal(got, want)
    assert len(want) == 3  # box 3 overlaps box 2 by 2/3
