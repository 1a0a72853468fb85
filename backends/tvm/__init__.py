"""kiln's TVM backend: lower an ``onnx_ir.Model`` to Relax, build it for a named
target into ``model.so`` + ``manifest.json``, and run the result.

    result = build_artifact(model, "host", outdir, model_hash=h)
    outputs = load(outdir)(x)

Only this package imports ``tvm`` (kiln's layer rule).
"""

from .binary_check import check_binary
from .build import BuildResult, build_artifact
from .lower import lower_to_relax
from .manifest import Manifest, TensorSpec
from .runtime import CompiledModel, load, run_artifact
from .targets import TARGETS, ResolvedTarget, resolve_target

__all__ = [
    "TARGETS",
    "BuildResult",
    "CompiledModel",
    "Manifest",
    "ResolvedTarget",
    "TensorSpec",
    "build_artifact",
    "check_binary",
    "load",
    "lower_to_relax",
    "resolve_target",
    "run_artifact",
]
