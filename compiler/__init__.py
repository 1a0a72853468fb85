"""kiln.compiler: the IR helpers, frontends, spec language and selectors (the core),
and on top of them the pipeline driver, verification, report and CLI."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from kiln.compiler.pipeline import CompileResult, compile_model, plan_model
    from kiln.compiler.spec import Spec, load_spec

__all__ = ["compile_model", "plan_model", "load_spec", "CompileResult", "Spec"]


def __getattr__(name: str) -> Any:
    # Lazy: importing kiln.compiler.errors must not pull in the pipeline (and its backends).
    if name in ("compile_model", "plan_model", "CompileResult"):
        from kiln.compiler import pipeline

        return getattr(pipeline, name)
    if name in ("load_spec", "Spec"):
        from kiln.compiler import spec

        return getattr(spec, name)
    raise AttributeError(name)
