"""The whole-reduction rule: a layer norm or a variance over every axis (ONNX
LayerNormalization with axis=0) gets kiln's schedule, matches numpy, and races nowhere."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax, te, topi

from kiln.backends.tvm.schedules import schedule_rules_used, unscheduled_kernels
from kiln.backends.tvm.schedules.race_check import racing_kernels
from kiln.backends.tvm.schedules.whole_reduction import WholeReduction
from kiln.backends.tvm.targets import resolve_target

from .relax_models import build_scheduled

RTOL = 1e-5
EPS = 1e-5


def _layer_norm_all_axes(shape):
    rng = np.random.default_rng(1)
    gamma = rng.standard_normal(shape).astype("float32")
    beta = rng.standard_normal(shape).astype("float32")

    def fn(bb, v):
        return bb.emit(relax.op.nn.layer_norm(v, relax.const(gamma), relax.const(beta),
                                              axes=list(range(len(shape))), epsilon=EPS))

    def ref(x):
        return (x - x.mean()) / np.sqrt(x.var() + EPS) * gamma + beta

    return fn, ref


@pytest.mark.parametrize("shape", [
    (2, 3, 4, 5),      # the conformance case's shape: 120 = 15 vectors of 8
    (4, 64, 32),       # 8192 elements: 16-lane partial sums, the normalization in parallel
    (7, 9),            # 63: no vector width divides it, serial sums
])
def test_layer_norm_over_every_axis_is_scheduled_and_exact(shape):
    x = np.random.default_rng(0).standard_normal(shape).astype("float32") * 3 + 1
    fn, ref = _layer_norm_all_axes(shape)
    lowered, got = build_scheduled(fn, x)
    assert unscheduled_kernels(lowered) == []
    assert "whole_reduction" in schedule_rules_used(lowered).values()
    assert racing_kernels(lowered) == {}
    want = ref(x.astype("float64"))
    assert float(np.abs(got - want).max()) / float(np.abs(want).max()) < RTOL


def test_variance_over_every_axis():
    x = np.random.default_rng(0).standard_normal((16, 48)).astype("float32")
    lowered, got = build_scheduled(lambda bb, v: bb.emit(relax.op.variance(v, axis=None)), x)
    assert schedule_rules_used(lowered) == {"variance": "whole_reduction"}
    assert abs(float(got) - float(x.astype("float64").var())) < RTOL * float(x.var())


def _row_layer_norm():
    x = te.placeholder((8, 32), name="x")
    g, b = te.placeholder((32,), name="g"), te.placeholder((32,), name="b")
    return [x, g, b, topi.nn.layer_norm(x, g, b, axis=[1], epsilon=EPS)]


def _sigmoid():
    x = te.placeholder((8, 32), name="x")
    return [x, topi.sigmoid(x)]


def _sum_of_library_call():
    """A library call's output summed: IR-builder code (an opaque block) beside a reduction
    to one value, as in TOPI's NMS kernel."""
    x = te.placeholder((8,), name="x")
    ext = te.extern((8,), [x], lambda ins, outs: tvm.tirx.call_packed("kiln.no_such", ins[0],
                                                                        outs[0]), name="ext")
    return [x, topi.sum(ext)]


@pytest.mark.parametrize("make", [_row_layer_norm, _sigmoid, _sum_of_library_call],
                         ids=["row_layer_norm", "elementwise", "library_call"])
def test_kernels_it_is_not_for_are_refused(make):
    func = te.create_prim_func(make())
    assert WholeReduction().apply(func, resolve_target("host").tvm_target(), False) is None
