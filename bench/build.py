"""Build one case with kiln and return a callable over numpy inputs.

kiln's own API (``kiln.compiler.core.frontend.load_model`` and
``kiln.backends.tvm``'s ``lower_to_relax``/``build_artifact``/``load``) is used
when it is present; until then a bench-private build goes through TVM with the
same steps (bind shapes, fold constants, import, kiln's CPU pipeline).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.case import PreparedCase

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BuiltCase:
    run: Callable[[dict[str, np.ndarray]], list[np.ndarray]]
    bytes: int
    compile_s: float
    via: str  # "kiln" or "bench-private"
    unscheduled: list[str] | None  # None: the build path does not report it
    tuned: int | None = None  # kernels scheduled by a tuning record (None: not reported)
    rules: dict[str, str] | None = None  # kernel -> schedule rule


def _kiln_api_present() -> bool:
    try:
        return (importlib.util.find_spec("kiln.compiler.core.frontend") is not None
                and importlib.util.find_spec("kiln.backends.tvm.build") is not None
                and importlib.util.find_spec("kiln.backends.tvm.runtime") is not None)
    except ModuleNotFoundError:
        return False


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build_case(case: PreparedCase, outdir: Path, target: str = "host", *,
               private: bool = False, tuning: str = "shipped",
               threads: int | None = None) -> BuiltCase:
    """``tuning``: "shipped" (only the database shipped with kiln), "user" (the user's
    cache too), "off" (kiln's rules only). ``threads``: as ``kiln.backends.tvm.load``'s."""
    outdir.mkdir(parents=True, exist_ok=True)
    if not private and _kiln_api_present():
        try:
            return _build_with_kiln(case, outdir, target, tuning, threads)
        except (ImportError, AttributeError, TypeError) as err:  # API still moving
            log.warning("kiln build API not usable yet (%s); using the bench-private build", err)
    return _build_private(case, outdir)


def _build_with_kiln(case: PreparedCase, outdir: Path, target: str, tuning: str,
                     threads: int | None) -> BuiltCase:
    from kiln.backends.tvm.build import build_artifact
    from kiln.backends.tvm.runtime import load
    from kiln.compiler.driver.symbolic import load_with_symbols

    start = time.perf_counter()
    model = load_with_symbols(str(case.onnx_path), case.input_shapes)  # W=16..1024 too
    digest = hashlib.sha256(case.onnx_path.read_bytes()).hexdigest()[:16]
    # "shipped": an empty user root, so only kiln's own database applies
    user_db = {"shipped": outdir / "no-user-tuning-db", "user": None, "off": None}[tuning]
    result = build_artifact(model, target, outdir, model_hash=digest, tuning_db=user_db,
                            apply_tuning=tuning != "off")
    compile_s = time.perf_counter() - start
    # a fixed thread count: the bench compares engines at the count it names (ORT's too),
    # not the runtime's choice beside whatever else runs (bench/neighbour.py measures that)
    module = load(outdir, threads=threads, adapt=threads is None)

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        out = module(*[feeds[name] for name in case.inputs])
        return list(out) if isinstance(out, (list, tuple)) else [out]

    rules = dict(getattr(result, "rules", {}) or {})
    return BuiltCase(run=run, bytes=_dir_bytes(outdir), compile_s=compile_s, via="kiln",
                     unscheduled=list(getattr(result, "unscheduled", []) or []),
                     tuned=sum(1 for r in rules.values() if r == "tuned"), rules=rules)


def compile_with_kiln(case: PreparedCase, tuning: str = "shipped", target: str = "host"):
    """kiln's own build steps, kept in memory (load, lower, kiln's Relax pipeline with
    the tuning records ``tuning`` selects, as in :func:`build_case`).

    Returns (executable, scheduled Relax module, compile seconds) for profiling.
    """
    import tvm

    from kiln.backends.tvm.importer import lower_to_relax
    from kiln.backends.tvm.pipeline import relax_pipeline
    from kiln.backends.tvm.targets import resolve_target
    from kiln.backends.tvm.tuning.database import database_dirs, open_database
    from kiln.compiler.driver.symbolic import load_with_symbols

    start = time.perf_counter()
    resolved = resolve_target(target)
    model = load_with_symbols(str(case.onnx_path), case.input_shapes)  # W=16..1024 too
    mod = lower_to_relax(model, target_name=resolved.name)
    user_db = {"shipped": Path("/nonexistent/kiln-no-user-db"), "user": None}.get(tuning)
    database = open_database(database_dirs(resolved, user_db)) if tuning != "off" else None
    scheduled: list[tvm.IRModule] = []
    executable = tvm.compile(mod, target=resolved.tvm_target(),
                             relax_pipeline=relax_pipeline(resolved, database, scheduled.append))
    return executable, scheduled[-1], time.perf_counter() - start


def compile_private(case: PreparedCase):
    """Bind shapes, fold constants, import with TVM's ONNX frontend, build with kiln's
    CPU pipeline for the host (no tuning records).

    Returns (executable, scheduled Relax module, compile seconds).
    """
    import onnx_ir as ir
    import onnxscript.optimizer
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    from kiln.backends.tvm.pipeline import relax_pipeline
    from kiln.backends.tvm.targets import resolve_target

    start = time.perf_counter()
    model = ir.load(case.onnx_path)
    for value in model.graph.inputs:
        if value.name in case.input_shapes:
            value.shape = ir.Shape(case.input_shapes[value.name])
    model = onnxscript.optimizer.optimize(model)
    proto = ir.serde.serialize_model(model)
    mod = from_onnx(proto, shape_dict=case.input_shapes)
    target = resolve_target("host")
    scheduled: list[tvm.IRModule] = []
    executable = tvm.compile(mod, target=target.tvm_target(),
                             relax_pipeline=relax_pipeline(target, None, scheduled.append))
    lowered = scheduled[-1]
    return executable, lowered, time.perf_counter() - start


def _build_private(case: PreparedCase, outdir: Path) -> BuiltCase:
    import tvm
    from tvm import relax

    from kiln.backends.tvm.schedules import unscheduled_kernels

    executable, lowered, compile_s = compile_private(case)
    executable.export_library(str(outdir / "model.so"))
    vm = relax.VirtualMachine(executable, tvm.cpu())

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        args = [tvm.runtime.tensor(feeds[name]) for name in case.inputs]
        out = vm["main"](*args)
        if isinstance(out, tvm.runtime.Tensor):
            return [out.numpy()]
        return [o.numpy() for o in out]

    return BuiltCase(run=run, bytes=_dir_bytes(outdir), compile_s=compile_s,
                     via="bench-private", unscheduled=unscheduled_kernels(lowered))
