"""Column panels blocked outside the rows (``dense.panel_block``): the choice, and a
blocked conv + residual epilogue matching numpy on each vector path."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from kiln.backends.tvm.pipeline import relax_pipeline
from kiln.backends.tvm.schedules import dense
from kiln.backends.tvm.schedules.dense import PANEL_BLOCK_BYTES, panel_block

from .relax_models import relax_module
from .test_isa_paths import PATHS, RTOL, path_target


def test_panel_block_choices():
    # AVX2 panels of 16 columns: resnet's 1x1 256->1024 (4 KiB rows): 16 panels of 16 KiB
    assert panel_block(1024, 16, 256) == 16
    # AVX-512 panels of 32: 1x1 512->2048 (8 KiB rows): 4 panels of 64 KiB
    assert panel_block(2048, 32, 512) == 4
    # rows under 4 KiB (256 or 512 columns) are not blocked
    assert panel_block(256, 16, 1024) == 1
    assert panel_block(512, 16, 4608) == 1
    # one panel over the budget: no block of two fits
    assert panel_block(2048, 16, PANEL_BLOCK_BYTES // 32) == 1
    # a block is never all the panels (that is the rows-outside order)
    assert panel_block(1024, 512, 16) == 1


@pytest.mark.parametrize("path", list(PATHS))
def test_blocked_panels_match_numpy(path, monkeypatch):
    """A 1x1 conv to 1024 channels on a 6x6 map (weights larger than the input: the panels
    run outside the rows, in blocks), bias, residual and ReLU fused: matches numpy."""
    target = path_target(path)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 6, 6, 64)).astype("float32")
    w = (rng.standard_normal((1024, 64, 1, 1)) / 8).astype("float32")
    b = rng.standard_normal((1, 1, 1, 1024)).astype("float32")
    r = rng.standard_normal((1, 6, 6, 1024)).astype("float32")
    blocks: list[int] = []
    monkeypatch.setattr(dense, "panel_block", lambda *a: blocks.append(panel_block(*a)) or
                        blocks[-1])

    def fn(bb, xv, rv):
        y = bb.emit(relax.op.nn.conv2d(xv, relax.const(w), data_layout="NHWC",
                                       kernel_layout="OIHW"))
        y = bb.emit(relax.op.add(relax.op.add(y, relax.const(b)), rv))
        return bb.emit(relax.op.nn.relu(y))

    executable = tvm.compile(relax_module(fn, x, r), target=target.tvm_target(),
                             relax_pipeline=relax_pipeline(target, None))
    got = relax.VirtualMachine(executable, tvm.cpu())["main"](
        tvm.runtime.tensor(x), tvm.runtime.tensor(r)).numpy()
    want = np.maximum(np.einsum("nhwc,oc->nhwo", x, w[:, :, 0, 0]) + b + r, 0)
    assert float(np.abs(got - want).max()) / float(np.abs(want).max()) < RTOL
    assert blocks and blocks[0] > 1  # the conv's panels ran in blocks
