"""The IR-builder rule: TOPI's hand-written CPU kernels (ScatterND, ScatterElements,
NonMaxSuppression, TopK) keep TOPI's loops, get their plain copy loops parallel, match
numpy / the ONNX suite, and race nowhere."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax, te, topi

from kiln.backends.tvm.schedules import schedule_rules_used, unscheduled_kernels
from kiln.backends.tvm.schedules.ir_builder import IRBuilderKernels
from kiln.backends.tvm.schedules.race_check import racing_kernels
from kiln.backends.tvm.targets import resolve_target

from .relax_models import build_scheduled


def scatter_nd_add(shape):
    """ScatterND with reduction add of three rows (one repeated) into ``shape``."""
    rng = np.random.default_rng(1)
    idx = np.array([[3], [1], [3]], "int64")
    upd = rng.standard_normal((3, *shape[1:])).astype("float32")

    def fn(bb, v):
        return bb.emit(relax.op.scatter_nd(v, relax.const(idx), relax.const(upd), "add"))

    def ref(x):
        want = x.copy()
        for i, row in enumerate(idx[:, 0]):
            want[row] += upd[i]
        return want

    return fn, ref


def _kernel_script(mod: tvm.IRModule, name: str) -> str:
    (func,) = [f for g, f in mod.functions.items() if g.name_hint == name]
    return func.script()


def test_a_large_scatter_nd_copies_in_parallel_and_scatters_in_order():
    x = np.random.default_rng(0).standard_normal((64, 32, 16)).astype("float32")
    fn, ref = scatter_nd_add(x.shape)
    lowered, got = build_scheduled(fn, x)
    assert schedule_rules_used(lowered)["scatter_nd"] == "ir_builder"
    assert unscheduled_kernels(lowered) == []
    assert racing_kernels(lowered) == {}
    np.testing.assert_array_equal(got, ref(x))
    script = _kernel_script(lowered, "scatter_nd")
    assert "for v in T.parallel(T.int64(32768)):" in script  # the copy of the data
    assert "for v in range(T.int64(3)):" in script  # the updates: serial (row 3 twice)


def test_a_small_scatter_keeps_its_copy_serial():
    x = np.random.default_rng(0).standard_normal((4, 4, 4)).astype("float32")
    fn, ref = scatter_nd_add(x.shape)
    lowered, got = build_scheduled(fn, x)
    assert schedule_rules_used(lowered)["scatter_nd"] == "ir_builder"
    np.testing.assert_array_equal(got, ref(x))
    assert "T.parallel(T.int64(64))" not in _kernel_script(lowered, "scatter_nd")


def test_scatter_elements_matches_numpy():
    x = np.random.default_rng(0).standard_normal((128, 96)).astype("float32")
    idx = np.random.default_rng(2).integers(0, 96, (128, 8)).astype("int64")
    upd = np.random.default_rng(3).standard_normal((128, 8)).astype("float32")

    def fn(bb, v):
        return bb.emit(relax.op.scatter_elements(v, relax.const(idx), relax.const(upd), 1))

    lowered, got = build_scheduled(fn, x)
    assert schedule_rules_used(lowered)["scatter_elements"] == "ir_builder"
    # TOPI's own parallel row loop writes out_buf[row, indices[row, j]]: the race check
    # cannot bound an index read from memory and reports it (it did before this rule,
    # which leaves that loop as TOPI wrote it); the rule adds no parallel loop here
    assert racing_kernels(lowered) == {"scatter_elements": ["out_buf"]}
    want = x.copy()
    for i in range(128):
        for j in range(8):
            want[i, idx[i, j]] = upd[i, j]
    np.testing.assert_array_equal(got, want)


def test_a_kernel_without_ir_builder_code_is_refused():
    x = te.placeholder((8, 32), name="x")
    func = te.create_prim_func([x, topi.sigmoid(x)])
    assert IRBuilderKernels().apply(func, resolve_target("host").tvm_target(), False) is None


@pytest.mark.parametrize("names", [
    ["test_nonmaxsuppression_two_batches", "test_nonmaxsuppression_limit_output_size",
     "test_top_k", "test_top_k_smallest"],
    ["test_scatternd_multiply", "test_scatter_elements_with_duplicate_indices",
     "test_scatter_with_axis"],
], ids=["nms_topk", "scatter"])
def test_conformance_cases_pass_with_no_unscheduled_kernel(names):
    from kiln.compiler.testing.conformance import run_cases, select

    for outcome in run_cases(select(names=names), jobs=2):
        assert outcome.outcome == "pass", (outcome.name, outcome.reason)
        assert outcome.unscheduled == [], outcome.name
