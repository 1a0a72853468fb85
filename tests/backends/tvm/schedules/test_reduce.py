"""The inner-reduction rule: one reduction over a kernel's innermost axes (ReduceSum /
Mean / Max / L2 over the last axes, or over every axis) gets kiln's schedule, exactly."""

from __future__ import annotations

import numpy as np
import pytest
from tvm import relax

from kiln.backends.tvm.schedules import schedule_rules_used, unscheduled_kernels

from .relax_models import build_scheduled

RTOL = 1e-5


def _l2(bb, v, axes, keepdims):
    return relax.op.sqrt(relax.op.sum(relax.op.multiply(v, v), axes, keepdims))


OPS = {
    "sum": (lambda bb, v, axes, keep: relax.op.sum(v, axes, keep), np.sum),
    "max": (lambda bb, v, axes, keep: relax.op.max(v, axes, keep), np.max),
    "l2": (_l2, lambda x, axis, keepdims: np.sqrt(np.sum(x * x, axis=axis, keepdims=keepdims))),
}


@pytest.mark.parametrize("shape,axes,op,keepdims", [
    ((2, 64, 14, 14), [2, 3], "sum", True),      # a global pool's sum over H, W (NCHW)
    ((64, 512), [1], "sum", False),             # a row sum, the lanes divide the row
    ((33, 49), [1], "max", False),              # no vector width divides 49: serial per row
    ((8, 16, 32), None, "sum", False),          # every axis: one row, vector partial sums
    ((4, 24, 40), [2], "l2", True),             # a producer (x*x) and a consumer (sqrt)
])
def test_inner_reduction_is_scheduled_and_exact(shape, axes, op, keepdims):
    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    make, ref = OPS[op]
    lowered, got = build_scheduled(lambda bb, v: bb.emit(make(bb, v, axes, keepdims)), x)
    assert unscheduled_kernels(lowered) == []
    assert "inner_reduction" in schedule_rules_used(lowered).values()
    want = ref(x, axis=tuple(axes) if axes else None, keepdims=keepdims)
    assert got.shape == np.shape(want)
    scale = max(float(np.abs(want).max()), 1e-6)
    assert float(np.abs(got - want).max()) / scale < RTOL


def _max_from_minus_infinity(x):
    """A max over the last axis with a reducer rfactor does not know (-inf identity, as
    kiln's importer writes ONNX ReduceMax)."""
    from tvm import te, tirx

    k = te.reduce_axis((0, x.shape[-1]), name="k")
    reducer = te.comm_reducer(lambda a, b: tirx.max(a, b),
                              lambda t: tirx.const(float("-inf"), t), name="max_inf")
    return te.compute(x.shape[:-1], lambda *i: reducer(x[(*i, k)], axis=k), name="max_inf")


def test_a_reducer_rfactor_refuses_runs_serially_per_row():
    x = np.random.default_rng(0).standard_normal((64, 256)).astype("float32")
    x[3] = -np.inf
    lowered, got = build_scheduled(lambda bb, v: bb.emit_te(_max_from_minus_infinity, v), x)
    assert unscheduled_kernels(lowered) == []
    assert "inner_reduction" in schedule_rules_used(lowered).values()
    np.testing.assert_array_equal(got, x.max(axis=1))


@pytest.mark.parametrize("width", [2, 64])
def test_rows_of_a_symbolic_count_are_scheduled(width):
    """A row sum over a symbolic row count (a MoE router's top-k renormalization, tokens
    symbolic): scheduled, exact for several counts."""
    import tvm
    from tvm import tirx

    from kiln.backends.tvm.pipeline import relax_pipeline
    from kiln.backends.tvm.targets import resolve_target

    n = tirx.Var("n", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([n, width], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.sum(relax.op.exp(x), [1], True)))
        bb.emit_func_output(out)
    target = resolve_target("host")
    scheduled: list = []
    executable = tvm.compile(bb.get(), target=target.tvm_target(),
                             relax_pipeline=relax_pipeline(target, None, scheduled.append))
    assert unscheduled_kernels(scheduled[-1]) == []
    assert "inner_reduction" in schedule_rules_used(scheduled[-1]).values()
    vm = relax.VirtualMachine(executable, tvm.cpu())
    for rows in (1, 7, 300):
        v = np.random.default_rng(rows).standard_normal((rows, width)).astype("float32")
        got = vm["main"](tvm.runtime.tensor(v)).numpy()
        np.testing.assert_allclose(got, np.exp(v).sum(axis=1, keepdims=True), rtol=RTOL)
