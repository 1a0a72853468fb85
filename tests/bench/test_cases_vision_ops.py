"""bench.cases_vision_ops: the NMS and TopK cases build, run, and match ONNX Runtime."""

from __future__ import annotations

import pytest

from bench.cases_vision_ops import measure, nms_case, topk_case

pytest.importorskip("tvm")


def test_small_cases_match_ort(tmp_path):
    cases = [nms_case(tmp_path, boxes=120, classes=3), topk_case(tmp_path, 2, 300, 10)]
    rows = measure(cases, tmp_path, threads=1, runs=3)
    assert [r["case"] for r in rows] == ["nms", "topk"]
    assert all(r["same"] and r["kiln_ms"] > 0 and r["ort_ms"] > 0 for r in rows), rows
