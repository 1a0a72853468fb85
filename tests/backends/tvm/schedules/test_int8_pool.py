"""The 8-bit max-pool rule (``int8_window.Int8Pool``): YOLOX's SPP pools on uint8 NCHW."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from kiln.backends.tvm.pipeline import relax_pipeline
from kiln.backends.tvm.schedules import schedule_rules_used, unscheduled_kernels
from kiln.backends.tvm.schedules.int8_window import MAX_ROW_BYTES, row_lanes
from kiln.backends.tvm.targets import resolve_target

from .test_isa_paths import path_target

TARGET = {"kind": "llvm", "num-cores": 2}


def _pool_module(shape, dtype, kernel, stride, pad):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.max_pool2d(
                x, pool_size=(kernel, kernel), strides=(stride, stride), padding=(pad,) * 4))
        bb.emit_func_output(out)
    return bb.get()


def _reference(x: np.ndarray, kernel: int, stride: int, pad: int) -> np.ndarray:
    low = np.iinfo(x.dtype).min
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=low)
    oh = (padded.shape[2] - kernel) // stride + 1
    ow = (padded.shape[3] - kernel) // stride + 1
    out = np.full(x.shape[:2] + (oh, ow), low, x.dtype)
    for ry in range(kernel):
        for rx in range(kernel):
            out = np.maximum(out, padded[:, :, ry:ry + stride * oh:stride,
                                         rx:rx + stride * ow:stride])
    return out


def _build(shape, dtype, kernel, stride, pad, x, target=None):
    target = target or resolve_target(TARGET)
    scheduled: list[tvm.IRModule] = []
    executable = tvm.compile(_pool_module(shape, dtype, kernel, stride, pad),
                             target=target.tvm_target(),
                             relax_pipeline=relax_pipeline(target, None, scheduled.append))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return scheduled[-1], vm["main"](tvm.runtime.tensor(x)).numpy()


@pytest.mark.parametrize("shape,dtype,kernel,stride,pad", [
    ((1, 24, 13, 13), "uint8", 13, 1, 6),   # YOLOX SPP
    ((1, 16, 13, 13), "uint8", 5, 1, 2),
    ((2, 8, 20, 20), "int8", 3, 2, 1),      # strided: the row read with stride 2
    ((1, 4, 9, 96), "uint8", 3, 1, 1),      # a row over 64 bytes: split into 32-byte vectors
])
def test_8bit_max_pool_gets_the_rule_and_is_exact(shape, dtype, kernel, stride, pad):
    info = np.iinfo(dtype)
    x = np.random.default_rng(0).integers(info.min, info.max + 1, shape).astype(dtype)
    mod, got = _build(shape, dtype, kernel, stride, pad, x)
    assert "int8_pool" in schedule_rules_used(mod).values()
    assert not unscheduled_kernels(mod)
    np.testing.assert_array_equal(got, _reference(x, kernel, stride, pad))


@pytest.mark.parametrize("path", ["host", "x86-64-v3", "x86-64-v4"])
def test_8bit_max_pool_on_each_vector_path(path):
    shape, kernel, stride, pad = (1, 24, 13, 13), 13, 1, 6
    x = np.random.default_rng(1).integers(0, 256, shape).astype("uint8")
    mod, got = _build(shape, "uint8", kernel, stride, pad, x, path_target(path))
    assert "int8_pool" in schedule_rules_used(mod).values()
    np.testing.assert_array_equal(got, _reference(x, kernel, stride, pad))


def test_a_float_max_pool_is_not_taken():
    x = np.random.default_rng(1).standard_normal((1, 8, 13, 13)).astype("float32")
    mod, _ = _build(x.shape, "float32", 5, 1, 2, x)
    assert "int8_pool" not in schedule_rules_used(mod).values()


def test_row_lanes_takes_the_whole_row_or_a_dividing_vector():
    assert row_lanes(13) == 13
    assert row_lanes(MAX_ROW_BYTES) == MAX_ROW_BYTES
    assert row_lanes(96) == 32
    assert row_lanes(130) is None
