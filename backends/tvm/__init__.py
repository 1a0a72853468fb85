"""kiln's TVM backend: lower an ``onnx_ir.Model`` to Relax, build it for a named
target into ``model.so`` + ``manifest.json``, and run the result.

    result = build_artifact(model, "host", outdir, model_hash=h)
    outputs = load(outdir)(x)

Only this package imports ``tvm`` (kiln's layer rule). Names are imported on
first use: running an artifact needs only TVM's runtime (``load`` works with
``TVM_USE_RUNTIME_LIB=1``, as on an edge board), and ``import kiln`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .threads import size_pool_from_cores

size_pool_from_cores()  # before anything of kiln's starts TVM's thread pool

_EXPORTS = {
    "TARGETS": "targets",
    "ResolvedTarget": "targets",
    "resolve_target": "targets",
    "lower_to_relax": "importer",
    "BuildResult": "build",
    "build_artifact": "build",
    "CompiledModel": "runtime",
    "load": "runtime",
    "run_artifact": "runtime",
    "check_binary": "binary_check",
    "Manifest": "manifest",
    "TensorSpec": "manifest",
}

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

if TYPE_CHECKING:
    from .binary_check import check_binary
    from .build import BuildResult, build_artifact
    from .importer import lower_to_relax
    from .manifest import Manifest, TensorSpec
    from .runtime import CompiledModel, load, run_artifact
    from .targets import TARGETS, ResolvedTarget, resolve_target


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
