"""The grouped int4 GEMV (importer.grouped_gemv): which MatMuls become one, the block
names kiln's quant_gemv rule looks up, and results equal to ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from kiln.backends.tvm.importer import lower_to_relax
from kiln.backends.tvm.importer.context import ImportContext
from kiln.backends.tvm.importer.grouped_gemv import GROUPED_MAX_ROWS, grouped_gemv_decode
from kiln.backends.tvm.kernel_names import GROUPED_OUTPUT, GROUPED_PARTIAL, GROUPED_XSUM
from kiln.compiler.core.metrics import relative_error
from kiln.compiler.testing.onnx_models import blocked_int4_matmul, to_ir
from kiln.compiler.testing.reference import DECODE_REL_TOL, ort_outputs

GEMV_KERNEL = "kiln_gemv_int4"


def _kernels(mod) -> dict[str, str]:
    from tvm import tirx

    return {gv.name_hint: f.script() for gv, f in mod.functions.items()
            if isinstance(f, tirx.PrimFunc)}


@pytest.mark.parametrize("dtype, zero_point, offset", [
    ("int4", True, True), ("int4", False, True),    # int4's code ^ 8 has offset 8
    ("uint4", True, True), ("uint4", False, False),
])
def test_a_few_rows_on_a_blocked_int4_weight_are_one_grouped_kernel(dtype, zero_point, offset):
    import ml_dtypes

    model = blocked_int4_matmul(k=128, n=64, m=1, zero_point=zero_point,
                                dtype=getattr(ml_dtypes, dtype))
    kernels = _kernels(lower_to_relax(to_ir(model), target_name="host"))
    assert GEMV_KERNEL in kernels, list(kernels)
    script = kernels[GEMV_KERNEL]
    assert f'"{GROUPED_PARTIAL}"' in script and f'"{GROUPED_OUTPUT}"' in script
    assert (f'"{GROUPED_XSUM}"' in script) == offset  # sums of x, for the offset per group
    assert "kiln_decode4" not in kernels  # the weight's own decode is dead code, removed

    x = np.random.default_rng(4).standard_normal((1, 128)).astype(np.float32)
    from tvm import relax

    executable = tvm.compile(lower_to_relax(to_ir(model)), target="llvm")
    out = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    (ref,) = ort_outputs(model, {"x": x}, optimize=False)
    assert relative_error(out, ref) < DECODE_REL_TOL


@pytest.mark.parametrize("m, target", [(GROUPED_MAX_ROWS + 4, "host"), (1, "cuda-sm90")])
def test_more_rows_or_a_gpu_target_keep_the_plain_decode(m, target):
    """More rows than GROUPED_MAX_ROWS: a decode + matmul; a CUDA target: dlight's GEMV
    takes the plain decode (the grouped kernel is scheduled only by kiln's CPU rule)."""
    kernels = _kernels(lower_to_relax(to_ir(blocked_int4_matmul(k=128, n=64, m=m)),
                                      target_name=target))
    assert GEMV_KERNEL not in kernels and "kiln_decode4" in kernels, list(kernels)


def test_one_group_is_a_plain_decode():
    """k = block size: one group, nothing to regroup."""
    kernels = _kernels(lower_to_relax(to_ir(blocked_int4_matmul(k=32, n=64, m=1))))
    assert GEMV_KERNEL not in kernels


def test_the_context_decides():
    """Without a recorded decode for the weight, or with the grouped GEMV off, a MatMul
    is TVM's own."""
    from tvm import relax

    x = relax.Var("x", relax.TensorType([1, 128], "float32"))
    w = relax.Var("w", relax.TensorType([128, 64], "float32"))
    assert grouped_gemv_decode(ImportContext(), x, w) is None
    assert grouped_gemv_decode(ImportContext(grouped_gemv=False), x, w) is None
