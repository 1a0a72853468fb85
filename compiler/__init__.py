"""kiln.compiler: ``core`` (IR helpers, frontends, spec language, selectors, pass API: what
passes and backends may import) and ``driver`` (pipeline, verification, report, CLI)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from kiln.compiler.core.spec import Spec
    from kiln.compiler.driver.compile import CompileResult, compile_model, plan_model
    from kiln.compiler.driver.specs import load_spec

__all__ = ["compile_model", "plan_model", "load_spec", "CompileResult", "Spec"]


def __getattr__(name: str) -> Any:
    # Lazy: importing kiln.compiler.core.errors must not pull in the pipeline (and its backends).
    if name in ("compile_model", "plan_model", "CompileResult"):
        from kiln.compiler.driver import compile as pipeline

        return getattr(pipeline, name)
    if name == "load_spec":
        from kiln.compiler.driver.specs import load_spec

        return load_spec
    if name == "Spec":
        from kiln.compiler.core.spec import Spec

        return Spec
    raise AttributeError(name)
