"""Register tiles whose accumulator goes on the stack (``dense.stack_accumulator``): the
scope, the guarded-tile rule that comes with it, and a short-K 1x1 conv + residual + ReLU
matching numpy on each vector path with no per-tile workspace allocation on AVX2."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from kiln.backends.tvm.pipeline import relax_pipeline
from kiln.backends.tvm.schedules.dense import guarded_tile, stack_accumulator

from .relax_models import relax_module
from .test_isa_paths import PATHS, RTOL, path_target

#: AVX2's figures: 8 fp32 lanes, 12 accumulators of 16 ymm registers.
AVX2_LANES, AVX2_ACCUMULATORS = 8, 12


def test_stack_accumulator_is_under_one_kib():
    assert stack_accumulator(12 * 8)          # AVX2's largest tile, 384 bytes
    assert stack_accumulator(7 * 2 * 16)      # AVX-512 7 x 2 zmm, 896 bytes
    assert not stack_accumulator(4 * 4 * 16)  # AVX-512 4 x 4 zmm, exactly 1 KiB
    assert not stack_accumulator(6 * 4 * 16)


def test_stack_tiles_are_guarded_only_over_one_vector():
    # rows of 56 / 28 (resnet's first stages): the dividing 4 x 2 tile stays; a guarded
    # 6 x 2 on the stack spills in its K loop
    assert guarded_tile(256, 56, 16, 4, AVX2_LANES, AVX2_ACCUMULATORS) is None
    assert guarded_tile(512, 28, 16, 4, AVX2_LANES, AVX2_ACCUMULATORS) is None
    # rows of 7 / 14: over the one-vector 7 x 1 tile a guarded 5 x 2 is still taken
    assert guarded_tile(512, 7, 8, 7, AVX2_LANES, AVX2_ACCUMULATORS) == (16, 5)
    assert guarded_tile(256, 14, 8, 7, AVX2_LANES, AVX2_ACCUMULATORS) == (16, 5)


def _conv_residual(x, w, r):
    def fn(bb, xv, rv):
        y = bb.emit(relax.op.nn.conv2d(xv, relax.const(w), data_layout="NHWC",
                                       kernel_layout="OIHW"))
        return bb.emit(relax.op.nn.relu(relax.op.add(y, rv)))
    return relax_module(fn, x, r)


@pytest.mark.parametrize("path", list(PATHS))
def test_short_k_conv_with_residual_matches_numpy(path):
    """1x1 conv 64 -> 256 over rows of 28 plus a residual and ReLU: matches numpy; on
    AVX2 the accumulator is a stack buffer of the 4 x 2 tile (no guarded rows), and the
    kernel calls no TVMBackendAllocWorkspace."""
    target = path_target(path)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 28, 64)).astype("float32")
    w = (rng.standard_normal((256, 64, 1, 1)) / 8).astype("float32")
    r = rng.standard_normal((1, 4, 28, 256)).astype("float32")
    scheduled: list[tvm.IRModule] = []
    executable = tvm.compile(_conv_residual(x, w, r), target=target.tvm_target(),
                             relax_pipeline=relax_pipeline(target, None, scheduled.append))
    got = relax.VirtualMachine(executable, tvm.cpu())["main"](
        tvm.runtime.tensor(x), tvm.runtime.tensor(r)).numpy()
    want = np.maximum(np.einsum("nhwc,oc->nhwo", x, w[:, :, 0, 0]) + r, 0)
    assert float(np.abs(got - want).max()) / float(np.abs(want).max()) < RTOL
    if path != "x86-64-v3":
        return
    kernel = next(f for gv, f in scheduled[-1].functions.items() if "conv2d" in gv.name_hint)
    script = kernel.script()
    assert 'scope="local"' not in script and "T.where" not in script
    assert "TVMBackendAllocWorkspace" not in executable.mod.imports[0].inspect_source("ll")
