"""kiln's CPU schedule rules: each kernel kind gets its rule, and numerics are unchanged.

Small shapes (a second or two per build on 2 cores); timings are never asserted.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from kiln.backends.tvm.pipeline import relax_pipeline
from kiln.backends.tvm.schedules import (
    cpu_schedule_passes,
    schedule_rules_used,
    unscheduled_kernels,
)
from kiln.backends.tvm.targets import resolve_target

from .relax_models import relax_module

# fp32 results may differ from the reference only by summation order.
RTOL = 1e-5
TARGET = {"kind": "llvm", "num-cores": 2}


def _build(builder_fn, *inputs: np.ndarray):
    """Build a Relax function made by ``builder_fn(bb, *vars)`` with the production CPU
    pipeline; return (the module after its schedule phase, outputs)."""
    target = resolve_target(TARGET)
    scheduled: list[tvm.IRModule] = []
    executable = tvm.compile(relax_module(builder_fn, *inputs), target=target.tvm_target(),
                             relax_pipeline=relax_pipeline(target, None, scheduled.append))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    result = vm["main"](*[tvm.runtime.tensor(a) for a in inputs])
    return scheduled[-1], result.numpy()


def _assert_close(got: np.ndarray, want: np.ndarray) -> None:
    scale = max(float(np.abs(want).max()), 1e-6)
    assert float(np.abs(got - want).max()) / scale < RTOL


def _rng():
    return np.random.default_rng(0)


def _kernel_rules(mod) -> dict[str, str]:
    return schedule_rules_used(mod)


@pytest.mark.parametrize("m,k,n", [(32, 64, 48), (1, 256, 128), (7, 40, 24)])
def test_dense_with_epilogue_is_scheduled_packed_and_exact(m, k, n):
    rng = _rng()
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype("float32")
    bias = rng.standard_normal(n).astype("float32")
    x = rng.standard_normal((m, k)).astype("float32")

    def model(bb, xv):
        y = bb.emit(relax.op.matmul(xv, relax.const(w)))
        y = bb.emit(relax.op.add(y, relax.const(bias)))
        return bb.emit(relax.op.nn.gelu(y))

    lowered, got = _build(model, x)
    assert unscheduled_kernels(lowered) == []
    rules = _kernel_rules(lowered)
    assert list(rules.values()) == ["contraction"]
    # the weight was packed at compile time: only the compute kernel is left
    (name,) = rules
    assert name.endswith("_prepacked")
    assert not [g for g in lowered.functions if "weight_prepack" in g.name_hint]
    ref = torch.nn.functional.gelu(torch.from_numpy(x) @ torch.from_numpy(w) + torch.from_numpy(bias))
    _assert_close(got, ref.numpy())


def test_batch_matmul_of_two_activations():
    rng = _rng()
    a = rng.standard_normal((4, 16, 32)).astype("float32")
    b = rng.standard_normal((4, 32, 16)).astype("float32")
    lowered, got = _build(lambda bb, x, y: bb.emit(relax.op.matmul(x, y)), a, b)
    assert unscheduled_kernels(lowered) == []
    assert "contraction" in _kernel_rules(lowered).values()
    _assert_close(got, a @ b)


@pytest.mark.parametrize("ci,co,hw,k,stride,groups", [
    (8, 32, 12, 3, 1, 1),     # general 3x3
    (16, 48, 10, 1, 1, 1),    # 1x1 (a GEMM)
    (8, 16, 16, 3, 2, 1),     # strided
    (32, 32, 16, 3, 1, 32),   # depthwise
])
def test_conv2d_bias_relu_is_scheduled_and_exact(ci, co, hw, k, stride, groups):
    rng = _rng()
    w = (rng.standard_normal((co, ci // groups, k, k)) / np.sqrt(ci * k * k / groups)).astype("float32")
    bias = rng.standard_normal((1, co, 1, 1)).astype("float32")
    x = rng.standard_normal((1, ci, hw, hw)).astype("float32")

    def model(bb, xv):
        y = bb.emit(relax.op.nn.conv2d(xv, relax.const(w), strides=stride, padding=k // 2,
                                       groups=groups))
        y = bb.emit(relax.op.add(y, relax.const(bias)))
        return bb.emit(relax.op.nn.relu(y))

    lowered, got = _build(model, x)
    assert unscheduled_kernels(lowered) == []
    expected_rule = "window" if groups == ci else "contraction"
    assert expected_rule in _kernel_rules(lowered).values()
    ref = torch.relu(torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w),
                                                stride=stride, padding=k // 2, groups=groups)
                     + torch.from_numpy(bias))
    _assert_close(got, ref.numpy())


def test_softmax_and_layer_norm_are_scheduled_and_exact():
    rng = _rng()
    x = rng.standard_normal((16, 64)).astype("float32")
    gamma = rng.standard_normal(64).astype("float32")
    beta = rng.standard_normal(64).astype("float32")

    def model(bb, xv):
        y = bb.emit(relax.op.nn.layer_norm(xv, relax.const(gamma), relax.const(beta), axes=[-1]))
        return bb.emit(relax.op.nn.softmax(y, axis=-1))

    lowered, got = _build(model, x)
    assert unscheduled_kernels(lowered) == []
    ref = torch.softmax(torch.nn.functional.layer_norm(torch.from_numpy(x), (64,),
                                                       torch.from_numpy(gamma),
                                                       torch.from_numpy(beta)), dim=-1)
    _assert_close(got, ref.numpy())


def test_elementwise_is_scheduled_and_exact():
    rng = _rng()
    x = rng.standard_normal((4, 33, 64)).astype("float32")

    def model(bb, xv):
        y = bb.emit(relax.op.permute_dims(xv, [0, 2, 1]))
        return bb.emit(relax.op.sigmoid(y))

    lowered, got = _build(model, x)
    assert unscheduled_kernels(lowered) == []
    _assert_close(got, 1 / (1 + np.exp(-x.transpose(0, 2, 1))))


def test_unscheduled_kernels_names_kernels_without_a_schedule():
    """TVM's own legalization leaves kernels unscheduled; the report names them."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((8, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, x))
        bb.emit_func_output(out)
    legalized = relax.transform.LegalizeOps()(bb.get())
    assert unscheduled_kernels(legalized) == ["matmul"]
    target = tvm.target.Target(TARGET)
    with target, tvm.transform.PassContext(opt_level=3):
        scheduled = tvm.transform.Sequential(cpu_schedule_passes(target))(legalized)
    assert unscheduled_kernels(scheduled) == []


def test_row_reductions_are_vectorized_partial_sums():
    rng = _rng()
    x = rng.standard_normal((16, 64)).astype("float32")
    gamma = rng.standard_normal(64).astype("float32")
    beta = rng.standard_normal(64).astype("float32")

    def model(bb, xv):
        return bb.emit(relax.op.nn.layer_norm(xv, relax.const(gamma), relax.const(beta),
                                              axes=[-1]))

    lowered, got = _build(model, x)
    (func,) = [f for g, f in lowered.functions.items() if g.name_hint == "layer_norm"]
    script = func.script()
    # rfactor-ed accumulators: a local per-lane partial sum, updated in a vector loop
    assert "_rf_local" in script and "T.vectorized" in script
    assert _kernel_rules(lowered)["layer_norm"] == "reduction"
    ref = torch.nn.functional.layer_norm(torch.from_numpy(x), (64,), torch.from_numpy(gamma),
                                         torch.from_numpy(beta))
    _assert_close(got, ref.numpy())


def test_dense_whose_columns_have_no_tile_vectorizes_the_rows():
    """A classifier head (N = 75 here, 6625 in PP-OCR rec) has no register tile over N:
    the rows of C (the activation's M) become the vector axis instead."""
    rng = _rng()
    w = (rng.standard_normal((40, 75)) / np.sqrt(40)).astype("float32")
    x = rng.standard_normal((1, 8, 40)).astype("float32")
    lowered, got = _build(lambda bb, xv: bb.emit(relax.op.matmul(xv, relax.const(w))), x)
    assert list(_kernel_rules(lowered).values()) == ["contraction"]
    _assert_close(got, x @ w)


def test_gelu_and_erf_use_the_vectorizable_polynomial():
    rng = _rng()
    x = (3 * rng.standard_normal((8, 64))).astype("float32")
    lowered, got = _build(lambda bb, xv: bb.emit(relax.op.nn.gelu(xv)), x)
    script = lowered.script()
    assert "erf(" not in script.replace("fast_erf", "")  # no libm erff call left
    ref = torch.nn.functional.gelu(torch.from_numpy(x).double()).numpy()
    # the polynomial differs from libm's erf by < 1e-6 absolute
    assert float(np.abs(got - ref).max()) < 1e-5


@pytest.mark.parametrize("hw", [8, 7])
def test_sum_of_stacked_inputs_reads_them_inline(hw):
    """ONNX Sum imports as broadcast_to + stack + sum: no stacked copy is materialized."""
    rng = _rng()
    a = rng.standard_normal((1, 8, hw, hw)).astype("float32")
    b = rng.standard_normal((1, 8, hw, hw)).astype("float32")

    def model(bb, x, y):
        shape = x.ty.shape
        stacked = bb.emit(relax.op.stack([relax.op.broadcast_to(x, shape),
                                          relax.op.broadcast_to(y, shape)], axis=0))
        return bb.emit(relax.op.sum(stacked, axis=[0]))

    lowered, got = _build(model, a, b)
    assert unscheduled_kernels(lowered) == []
    (func,) = [f for g, f in lowered.functions.items() if "stack" in g.name_hint]
    assert "T_stack_intermediate" not in func.script()
    _assert_close(got, a + b)


@pytest.mark.parametrize("op, d", [("layer_norm", 2048), ("softmax", 2048), ("softmax", 1000),
                                   ("softmax", 1001)])
def test_a_single_row_reduction_is_computed_once(op, d):
    """A decode step's ``[1, 1, d]`` layer norm: one pass of lane-wise partial sums (the
    dlight CPU rule it used to fall to recomputed the row's sums per output element)."""
    rng = _rng()
    x = rng.standard_normal((1, 1, d)).astype("float32")
    gamma = rng.standard_normal(d).astype("float32")
    beta = rng.standard_normal(d).astype("float32")

    def model(bb, xv):
        if op == "softmax":
            return bb.emit(relax.op.nn.softmax(xv, axis=-1))
        return bb.emit(relax.op.nn.layer_norm(xv, relax.const(gamma), relax.const(beta),
                                              axes=[-1]))

    lowered, got = _build(model, x)
    (func,) = [f for g, f in lowered.functions.items() if g.name_hint == op]
    assert _kernel_rules(lowered)[op] == "reduction"
    script = func.script()
    assert "T.parallel" not in script
    if d % 4 == 0:  # a vector width divides the row
        assert "_rf_local" in script and "T.vectorized" in script
    t = torch.from_numpy(x)
    ref = (torch.softmax(t, dim=-1) if op == "softmax" else
           torch.nn.functional.layer_norm(t, (d,), torch.from_numpy(gamma), torch.from_numpy(beta)))
    _assert_close(got, ref.numpy())


@pytest.mark.parametrize("k,stride", [(3, 1), (5, 1), (3, 2)])
def test_nhwc_depthwise_packs_its_weight_and_blocks_pixels(k, stride):
    """NHWC depthwise (OHWI weight ``[C, k, k, 1]``): the weight is re-laid out
    channels-last at compile time, each tile covers a few output pixels, and the taps
    read the input through the padding predicate (no padded copy, ``pad_temp``)."""
    rng = _rng()
    c, hw = 32, 12
    w = rng.standard_normal((c, k, k, 1)).astype("float32")
    x = rng.standard_normal((1, hw, hw, c)).astype("float32")

    def model(bb, xv):
        y = bb.emit(relax.op.nn.conv2d(xv, relax.const(w), strides=stride, padding=k // 2,
                                       groups=c, data_layout="NHWC", kernel_layout="OHWI"))
        return bb.emit(relax.op.nn.relu(y))

    lowered, got = _build(model, x)
    rules = _kernel_rules(lowered)
    (name,) = [n for n, rule in rules.items() if rule == "window"]
    assert name.endswith("_prepacked")  # the weight packing ran at compile time
    assert "T.unroll" in lowered[name].script()
    assert "pad_temp" not in lowered[name].script()
    ref = torch.relu(torch.nn.functional.conv2d(
        torch.from_numpy(x.transpose(0, 3, 1, 2)),
        torch.from_numpy(w.transpose(0, 3, 1, 2)), stride=stride, padding=k // 2, groups=c))
    _assert_close(got, ref.numpy().transpose(0, 2, 3, 1))


def test_rows_no_vector_divides_are_reduced_once_per_row():
    """Softmax over 6625 classes (PP-OCR rec's head): kiln's row rule, serial per row."""
    x = _rng().standard_normal((40, 6625)).astype("float32")
    lowered, got = _build(lambda bb, xv: bb.emit(relax.op.nn.softmax(xv, axis=-1)), x)
    assert _kernel_rules(lowered)["softmax"] == "reduction"
    assert "T.parallel" in lowered["softmax"].script()
    _assert_close(got, torch.softmax(torch.from_numpy(x), dim=-1).numpy())


@pytest.mark.parametrize("path", ["host", "x86-64-v3", "x86-64-v4"])
def test_stem_conv_keeps_its_dividing_row_tile(path):
    """A 3-channel stem conv (3x3 s2, rows of 14 in NHWC): the innermost reduction (3
    input channels) is unrolled whole, so no guarded row tile is taken even where the
    tile model would pick one (AVX2: 5 x 2 vectors for 14 rows); it matches torch."""
    from kiln.backends.tvm.schedules.dense import guarded_tile, narrower_tile, tile_columns, tile_rows
    from kiln.backends.tvm.schedules.rule import register_accumulators, vector_lanes_f32

    from .test_isa_paths import guarded_row_split, path_target

    target = path_target(path)
    rng = _rng()
    w = (rng.standard_normal((16, 3, 3, 3)) / 5).astype("float32")
    x = rng.standard_normal((1, 3, 28, 28)).astype("float32")

    def model(bb, xv):
        return bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(xv, relax.const(w), strides=2,
                                                           padding=1)))

    scheduled: list[tvm.IRModule] = []
    executable = tvm.compile(relax_module(model, x), target=target.tvm_target(),
                             relax_pipeline=relax_pipeline(target, None, scheduled.append))
    got = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    assert "contraction" in _kernel_rules(scheduled[-1]).values()
    assert not guarded_row_split(scheduled[-1])
    if path == "x86-64-v3":  # the case the rule now declines: the model alone would guard
        lanes = vector_lanes_f32(target.tvm_target())
        acc = register_accumulators(target.tvm_target())
        nr, _ = tile_columns(16, lanes)
        mr = tile_rows(14, acc // (nr // lanes))
        if mr < 3:
            nr, mr = narrower_tile(16, 14, nr, mr, lanes, acc)
        assert guarded_tile(16, 14, nr, mr, lanes, acc) is not None
    ref = torch.relu(torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w),
                                                stride=2, padding=1))
    _assert_close(got, ref.numpy())
