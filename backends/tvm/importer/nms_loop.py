"""The greedy loop of NonMaxSuppression, one class per parallel task, each candidate
checked against the boxes already kept.

TOPI's CPU loop (``topi.vision.nms._nms_loop``) walks the classes serially and, for each
box it keeps, suppresses every later box of the class in a parallel loop: one parallel
launch per kept box and an IoU for every (kept, later) pair. With 1000 boxes, 20 classes
and 100 kept per class that took 7.68 ms where ONNX Runtime takes 0.79 ms, and 1.57 ms
with this loop (``python -m bench.cases_vision_ops``, 1 thread, AMD EPYC Zen 4). Here each
class is a task of a parallel loop, and a candidate is compared only with the boxes kept
so far (at most the per-class limit; none once the limit is reached), which selects the
same boxes: a box is suppressed exactly when an earlier kept box overlaps it by at least
the threshold. ONNX suppresses a box of any score; TOPI's loop never suppressed a box
whose score is <= 0.

:func:`kiln_nms_loop` has TOPI's ``nms_loop`` interface; :func:`greedy_loop` makes
TOPI's ``all_class_non_max_suppression`` use it while it builds its kernel.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


def kiln_nms_loop(batch_size, top_k, iou_threshold, max_output_size, valid_count,
                  on_new_valid_box_func, on_new_invalidated_box_func, needs_bbox_check_func,
                  calc_overlap_func, out_scores, num_valid_boxes, score_threshold=None):
    """TOPI's ``nms_loop`` interface (called inside its IRBuilder); see the module doc."""
    import tvm
    from tvm import te
    from tvm.script.ir_builder import tirx as T

    del on_new_invalidated_box_func  # nothing to do per suppressed box (no scores kept)
    out_scores = T.buffer_proxy(out_scores)
    num_valid_boxes = T.buffer_proxy(num_valid_boxes)
    num_boxes = out_scores.shape[1]
    with T.parallel(0, batch_size) as i:
        nkeep = tvm.tirx.if_then_else(tvm.tirx.all(top_k > 0, top_k < valid_count[i]),
                                      top_k, valid_count[i])
        with T.If(tvm.tirx.all(iou_threshold > te.const(0), valid_count[i] > te.const(0))):
            with T.Then():
                # sorted positions of the boxes kept so far, their count, the verdict
                kept = T.buffer_proxy(T.alloc_buffer((num_boxes,), "int32"))
                count = T.buffer_proxy(T.alloc_buffer((1,), "int32"))
                alive = T.buffer_proxy(T.alloc_buffer((1,), "int32"))
                count[0] = T.int32(0)
                with T.serial(0, nkeep) as j:
                    passes = count[0] < max_output_size
                    if score_threshold is not None:
                        passes = tvm.tirx.all(passes, out_scores[i, j] > score_threshold[()])
                    with T.If(passes):
                        with T.Then():
                            alive[0] = T.int32(1)
                            with T.serial(0, count[0]) as m:
                                with T.If(tvm.tirx.all(
                                        alive[0] == 1, needs_bbox_check_func(i, kept[m], j))):
                                    with T.Then():
                                        iou = calc_overlap_func(i, kept[m], j)
                                        with T.If(iou >= iou_threshold):
                                            with T.Then():
                                                alive[0] = T.int32(0)
                            with T.If(alive[0] == 1):
                                with T.Then():
                                    on_new_valid_box_func(0, count[0], i, j)
                                    kept[count[0]] = j
                                    count[0] = count[0] + 1
                num_valid_boxes[i] = count[0]
            with T.Else():
                num_valid_boxes[i] = T.int32(0)


@contextmanager
def greedy_loop() -> Iterator[None]:
    """TOPI's ``all_class_non_max_suppression`` builds with :func:`kiln_nms_loop` inside."""
    from tvm.topi.vision import nms

    topi_loop = nms._nms_loop
    nms._nms_loop = kiln_nms_loop
    try:
        yield
    finally:
        nms._nms_loop = topi_loop


def greedy_legalize_map() -> dict:
    """A ``LegalizeOps`` entry: Relax's NonMaxSuppression op legalized by TVM's own
    legalization (TOPI's ``all_class_non_max_suppression``) with :func:`kiln_nms_loop`."""
    import tvm

    name = "relax.vision.all_class_non_max_suppression"
    default = tvm.ir.Op.get(name).get_attr("FLegalize")

    def legalize(bb, call):
        with greedy_loop():
            return default(bb, call)

    return {name: legalize}
