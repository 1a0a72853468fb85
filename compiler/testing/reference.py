"""ONNX Runtime reference outputs for kiln's builds, and the float32 tolerance.

A TVM build of a float32 model differs from ONNX Runtime only in summation order and
vectorized math: :data:`REL_TOL` is how far (``relative_error``, relative to max |y|).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnx_ir as ir

from kiln.backends.ort import ReferenceRunner

#: max |tvm - reference| / max |reference| allowed for float32 models.
REL_TOL = 1e-4
#: kiln's build vs ONNX Runtime on the same quantized graph (weights decoded in the
#: kernel), relative to max |y|: the decode is exact in float32, only the summation
#: order differs.
DECODE_REL_TOL = 1e-5


def ort_outputs(model: onnx.ModelProto | ir.Model, feeds: Mapping[str, np.ndarray], *,
                optimize: bool = True) -> list[np.ndarray]:
    """ONNX Runtime's outputs; ``optimize=False`` keeps ORT from fusing
    DequantizeLinear+MatMul into its own lower-precision MatMulNBits kernel."""
    return ReferenceRunner(model, optimize="all" if optimize else "none").run(feeds)


def exact_reference(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    """The first output of ``model`` as written, by ONNX Runtime (no MatMulNBits rewrite,
    which is ~1e-3 off).

    ORT 1.32 has no Shape kernel for UINT4 (inside kiln.DequantizeTable's body): for a
    model with kiln's functions the basic level folds it away; that level has no
    MatMulNBits fusion.
    """
    return ReferenceRunner(model, optimize="basic" if model.functions else "none").run(feeds)[0]
