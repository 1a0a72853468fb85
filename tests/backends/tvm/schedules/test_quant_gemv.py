"""kiln's grouped int4 GEMV rule (schedules/quant_gemv.py): a constant weight's nibble
tiles are re-laid out at compile time so that each column task streams one contiguous
panel, and the results still match ONNX Runtime on every x86 vector path."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax, tirx

from kiln.backends.tvm.importer import lower_to_relax
from kiln.backends.tvm.pipeline import relax_pipeline
from kiln.backends.tvm.schedules import schedule_rules_used
from kiln.backends.tvm.schedules.quant_gemv import GEMV_NR, NIBBLE_TILE
from kiln.compiler.core.metrics import relative_error
from kiln.compiler.testing.onnx_models import blocked_int4_matmul, to_ir
from kiln.compiler.testing.reference import DECODE_REL_TOL, ort_outputs

from .test_isa_paths import path_target

GEMV_KERNEL = "kiln_gemv_int4"
K = 128


def _build(model, target):
    scheduled: list[tvm.IRModule] = []
    executable = tvm.compile(lower_to_relax(to_ir(model), target_name="host"),
                             target=target.tvm_target(),
                             relax_pipeline=relax_pipeline(target, None, scheduled.append))
    return relax.VirtualMachine(executable, tvm.cpu()), scheduled[-1]


def _code_params(mod: tvm.IRModule) -> list[tuple[int, ...]]:
    """Shapes of the packed code params (uint8, 3-D and up; a uint4 zero point is 2-D)
    of the grouped GEMV kernels (fused with their bias add; in TVM 0.27 a PrimFunc's
    params are its buffers)."""
    shapes = []
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc) and GEMV_KERNEL in gv.name_hint:
            shapes += [tuple(int(d) for d in p.shape) for p in func.params
                       if str(getattr(p, "dtype", "")) == "uint8" and len(p.shape) >= 3]
    return shapes


@pytest.mark.parametrize("path", ["host", "x86-64-v3", "x86-64-v4"])
@pytest.mark.parametrize("dtype, zero_point", [("int4", False), ("uint4", True)])
def test_column_tasks_stream_one_interleaved_code_panel(path, dtype, zero_point):
    """n = 128: two 64-column tasks, each two nibble tiles, stored as one panel
    ``[n // 64, k, 2, 16]`` (the copy folded at compile time, no packing kernel left);
    int4 codes stored offset (``^ 8``), so the kernel does no ``^ 8`` per weight."""
    import ml_dtypes

    target = path_target(path)
    n = 2 * GEMV_NR
    model = blocked_int4_matmul(k=K, n=n, m=1, zero_point=zero_point,
                                dtype=getattr(ml_dtypes, dtype))
    vm, mod = _build(model, target)
    assert set(schedule_rules_used(mod).values()) == {"decode_contraction"}
    tiles = GEMV_NR // NIBBLE_TILE
    assert _code_params(mod) == [(n // GEMV_NR, K, tiles, NIBBLE_TILE // 2)]
    assert not [gv for gv in mod.functions if gv.name_hint.endswith("_weight_prepack")]
    # int4's code ^ 8 is folded into the packed bytes (^ 0x88), not done per weight
    assert all("^ 8" not in func.script() for gv, func in mod.functions.items()
               if isinstance(func, tirx.PrimFunc) and GEMV_KERNEL in gv.name_hint)
    x = np.random.default_rng(3).standard_normal((1, K)).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    (want,) = ort_outputs(model, {"x": x}, optimize=False)
    assert relative_error(got, want) < DECODE_REL_TOL


def test_one_tile_per_task_keeps_the_imported_layout():
    """n = 32: one nibble tile per task is already one contiguous stream."""
    target = path_target("host")
    model = blocked_int4_matmul(k=K, n=NIBBLE_TILE, m=1, zero_point=False)
    vm, mod = _build(model, target)
    assert _code_params(mod) == [(1, K, NIBBLE_TILE // 2)]
    x = np.random.default_rng(4).standard_normal((1, K)).astype(np.float32)
    (want,) = ort_outputs(model, {"x": x}, optimize=False)
    assert relative_error(vm["main"](tvm.runtime.tensor(x)).numpy(), want) < DECODE_REL_TOL
