"""bench.cases_vision_ops: the NMS, TopK and Scatter/Gather cases build, run, and match
ONNX Runtime."""

from __future__ import annotations

import pytest

from bench.cases_vision_ops import (
    CASES,
    gather_elements_case,
    gather_nd_case,
    measure,
    nms_case,
    scatter_elements_case,
    scatter_nd_case,
    topk_case,
)

pytest.importorskip("tvm")


def test_small_cases_match_ort(tmp_path):
    cases = [nms_case(tmp_path, boxes=120, classes=3), topk_case(tmp_path, 2, 300, 10),
             topk_case(tmp_path, 16, 8, 2, name="topk_moe"),
             scatter_nd_case(tmp_path, 200, 5, 10),
             scatter_elements_case(tmp_path, 4, 64, 8),
             scatter_elements_case(tmp_path, 4, 64, 8, reduction="add"),
             gather_elements_case(tmp_path, 4, 64, 8), gather_nd_case(tmp_path, 200, 5, 10)]
    rows = measure(cases, tmp_path, threads=1, runs=3)
    assert [r["case"] for r in rows] == ["nms", "topk", "topk_moe", "scatter_nd",
                                         "scatter_elements", "scatter_elements_add",
                                         "gather_elements", "gather_nd"]
    assert all(r["same"] and r["kiln_ms"] > 0 and r["ort_ms"] > 0 and r["kiln_cpu_ms"] > 0
               for r in rows), rows


def test_every_case_is_named_on_the_command_line():
    assert {"nms", "topk", "topk_wide", "topk_moe", "scatter_nd", "scatter_elements",
            "scatter_elements_add", "gather_elements", "gather_nd"} == set(CASES)


def test_aligned_inputs_keep_their_values(tmp_path):
    from bench.cases_vision_ops import aligned

    case = scatter_nd_case(tmp_path, 200, 5, 10)
    moved = aligned(case)
    for name, value in case.inputs.items():
        assert moved.inputs[name].ctypes.data % 64 == 0
        assert moved.inputs[name].dtype == value.dtype
        assert (moved.inputs[name] == value).all()
