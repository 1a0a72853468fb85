"""The row-tables rule: per-row tables with a side output (a runtime-scale Resize's tap
indices and normalized tap weights) get kiln's schedule, match numpy / the ONNX suite, and
race nowhere."""

from __future__ import annotations

import numpy as np
import pytest
from tvm import relax, te

from kiln.backends.tvm.schedules import schedule_rules_used, unscheduled_kernels
from kiln.backends.tvm.schedules.race_check import racing_kernels
from kiln.backends.tvm.schedules.row_tables import RowTables
from kiln.backends.tvm.targets import resolve_target

from .relax_models import build_scheduled

RTOL = 1e-6


def tap_tables(rows: int, taps: int):
    """Like ``kiln_resize_taps``: an index table and weights normalized per row."""

    def compute(scale):
        index = te.compute((rows, taps), lambda j, t: (j + t).astype("int64"), name="index")
        raw = te.compute((rows, taps), lambda j, t: (j * t + 1).astype("float32") * scale[0],
                         name="raw")
        k = te.reduce_axis((0, taps), name="k")
        total = te.compute((rows,), lambda j: te.sum(raw[j, k], axis=k), name="total")
        return [index, te.compute((rows, taps), lambda j, t: raw[j, t] / total[j], name="w")]

    def fn(bb, v):
        return bb.emit(relax.TupleGetItem(bb.emit_te(compute, v), 1))

    j, t = np.meshgrid(np.arange(rows), np.arange(taps), indexing="ij")
    raw = (j * t + 1).astype("float32") * 2.0
    return fn, raw / raw.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("rows,taps", [(8, 10), (1024, 16)])   # serial; parallel rows
def test_tap_tables_are_scheduled_and_exact(rows, taps):
    fn, want = tap_tables(rows, taps)
    lowered, got = build_scheduled(fn, np.array([2.0], "float32"))
    assert unscheduled_kernels(lowered) == []
    assert "row_tables" in schedule_rules_used(lowered).values()
    assert racing_kernels(lowered) == {}
    assert float(np.abs(got - want).max()) < RTOL


def _refused_shared():
    """The side output reads the summed table too: not the side-output shape."""
    x = te.placeholder((8, 4), name="x")
    k = te.reduce_axis((0, 4), name="k")
    total = te.compute((8,), lambda j: te.sum(x[j, k], axis=k), name="total")
    side = te.compute((8, 4), lambda j, t: x[j, t] - total[j], name="side")
    return [x, side, te.compute((8, 4), lambda j, t: x[j, t] / total[j], name="w")]


def _refused_single_output():
    """One output only (a softmax-like row kernel): the row rules' business."""
    x = te.placeholder((8, 4), name="x")
    k = te.reduce_axis((0, 4), name="k")
    total = te.compute((8,), lambda j: te.sum(x[j, k], axis=k), name="total")
    return [x, te.compute((8, 4), lambda j, t: x[j, t] / total[j], name="w")]


def _refused_other_rows():
    """The side output has other rows (a transpose): not one row space."""
    x = te.placeholder((8, 4), name="x")
    k = te.reduce_axis((0, 4), name="k")
    total = te.compute((8,), lambda j: te.sum(x[j, k], axis=k), name="total")
    side = te.compute((4, 8), lambda t, j: x[j, t] * 2, name="side")
    return [x, side, te.compute((8,), lambda j: total[j] + 1, name="w")]


@pytest.mark.parametrize("make", [_refused_shared, _refused_single_output, _refused_other_rows])
def test_other_kernels_are_refused(make):
    func = te.create_prim_func(make())
    assert RowTables().apply(func, resolve_target("host").tvm_target(), False) is None


def test_runtime_scale_antialias_resize_has_no_unscheduled_kernel():
    """ONNX's cubic antialias Resize with scales given at run time: its tap tables
    (kiln_resize_taps, one kernel per resized axis) were left at TVM's default."""
    from kiln.compiler.testing.conformance import run_cases, select

    (outcome,) = run_cases(select(names=["test_resize_downsample_scales_cubic_antialias"]),
                           jobs=1)
    assert outcome.outcome == "pass", outcome.reason
    assert outcome.unscheduled == []

