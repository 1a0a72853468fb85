"""Build a compiled artifact: ``model.so`` (kernels + weights) and ``manifest.json``.

Steps: lower to Relax (:mod:`.importer`), optionally tune its kernels into the
target's tuning database (:mod:`.tuning`), run the target family's phases
(:mod:`.pipeline`; every matching tuning record applied, kiln's rules for the
rest) through ``tvm.compile``, export the library (with the
target's cross linker), check the binary's kind, and write the manifest.
Both files are written atomically, so an interrupted build never leaves a
library that does not match its manifest under the final names, and the
manifest records the library's SHA-256.

An interrupt (SIGINT/SIGTERM) that lands inside TVM's C++ code comes back as a
TVM error: when :func:`kiln.compiler.core.interrupt.received` says a signal
arrived, it is re-raised as ``KeyboardInterrupt``, not reported as a failed
build. A full disk or a file size limit is named as such (``no space left on
device writing model.so``), not as the linker's command line.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from kiln.compiler.core import interrupt
from kiln.compiler.core.atomic import replace_atomic, write_fault
from kiln.compiler.core.errors import KilnError, LoweringError, OutputError
from kiln.compiler.core.graph import count_weight_bytes, graph_inputs
from kiln.compiler.core.version import kiln_version

from .binary_check import check_binary
from .importer import check_static_inputs, lower_to_relax, symbolic_ranges
from .importer.lower import SPARSE_KERNELS_ATTR
from .load_time import MANIFEST_KEY as LOAD_TIME_KEY
from .load_time import move_shared_mixing_to_load_time
from .manifest import LIBRARY_NAME, Manifest, TensorSpec, write_manifest
from .pipeline import relax_pipeline
from .schedules import schedule_rules_used, unscheduled_kernels
from .schedules.race_check import racing_kernels
from .strip import strip_library
from .targets import ResolvedTarget, require_cross_compiler, resolve_target
from .tuning.database import TUNED_RULE, database_dirs, open_database
from .tuning.tune import describe, tune_relax_module

logger = logging.getLogger(__name__)

#: ``progress(step, done, total)``: called as each build step starts and at the end.
Progress = Callable[[str, int, int], None]
InputDecl = tuple[str, Sequence[int], str]

_STEPS = ("lower", "tune", "compile", "export", "check")


@dataclass(frozen=True)
class BuildResult:
    """What :func:`build_artifact` produced and how long it took."""

    library: Path
    manifest: Path
    seconds: float
    runs_on_host: bool
    target: str
    binary: str
    step_seconds: dict[str, float] = field(default_factory=dict)
    #: kernels left at TVM's default or with only the fallback rule (see
    #: ``schedules.unscheduled_kernels``), and kernel -> rule ("tuned" for a record)
    unscheduled: list[str] = field(default_factory=list)
    rules: dict[str, str] = field(default_factory=dict)
    #: the tuning databases read (most trusted first) and, when tuning ran, its summary
    tuning_dbs: list[str] = field(default_factory=list)
    tuning: dict[str, Any] | None = None
    #: per sparse MatMul/Gemm weight: the kernel chosen and why (importer.sparse_weights)
    sparse_kernels: list[dict[str, Any]] = field(default_factory=list)
    #: kernel -> buffers two iterations of one of its parallel loops may both write
    #: (``schedules.race_check``; expected empty, a warning names any)
    races: dict[str, list[str]] = field(default_factory=dict)


def _dim(d) -> int | str:
    """A static dim as int, a symbolic one as its name (``W``)."""
    return int(d) if isinstance(d, int) else str(d)


def _model_inputs(model: ir.Model) -> list[TensorSpec]:
    return [TensorSpec(v.name, tuple(_dim(d) for d in v.shape), str(v.dtype.numpy()))
            for v in graph_inputs(model)]


def _check_declared_inputs(found: list[TensorSpec], declared: Sequence[InputDecl],
                           target: str) -> None:
    """The caller's (name, shape, dtype) list must describe the model's inputs."""
    want = [TensorSpec(name, tuple(int(d) for d in shape), str(dtype))
            for name, shape, dtype in declared]
    if want != found:
        have = ", ".join(f"{t.name} {t.describe()}" for t in found)
        said = ", ".join(f"{t.name} {t.describe()}" for t in want)
        raise LoweringError(f"declared inputs ({said}) do not match the model's ({have})",
                            target=target)


def _relax_dim(d) -> int | str:
    """A Relax shape dim: an int, or a symbolic one's text (``W``, ``W // 4 + 1``)."""
    try:
        return int(d)
    except (TypeError, ValueError):
        return re.sub(r"T\.int64\((-?\d+)\)", r"\1", str(d))


def _relax_outputs(mod, outputs: Sequence[ir.Value]) -> list[TensorSpec]:
    """Output specs from the Relax main's return type; an output whose shape Relax leaves
    open (data-dependent: NonZero, Unique, Tile by an input ...) takes the shape the ONNX
    graph declares, and is a LoweringError naming the output and its producer if none."""
    from tvm import relax

    ret = mod["main"].ret_ty
    fields = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    specs = []
    for value, ty in zip(outputs, fields, strict=True):
        dims = getattr(getattr(ty, "shape", None), "values", None)
        try:  # a symbolic dimension (tir.Var or an expression of one): its text
            shape = tuple(_relax_dim(d) for d in dims) if dims is not None else None
        except Exception:
            shape = None
        if shape is not None:
            pass
        elif value.shape is not None and all(isinstance(d, int) for d in value.shape):
            shape = tuple(int(d) for d in value.shape)
        else:
            node = value.producer()
            made_by = f" (made by {node.op_type} node {node.name!r})" if node else ""
            raise LoweringError(f"output {value.name!r}{made_by} has a data-dependent shape; "
                                "kiln builds static shapes only")
        dtype = getattr(ty, "dtype", None) or str(value.dtype.numpy())
        specs.append(TensorSpec(value.name, shape, str(dtype)))
    return specs


def _failure(err: Exception, what: str, resolved: ResolvedTarget, file: str) -> KilnError:
    """The KilnError for a failure in TVM's ``what`` step. Raises KeyboardInterrupt instead
    when the failure is an interrupt that came back through TVM's FFI, and MemoryError
    (with the target and step) when TVM ran out of memory."""
    if interrupt.received() is not None:
        raise KeyboardInterrupt from None
    detail = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    if isinstance(err, MemoryError) or "bad_alloc" in detail:  # a fault, not the model's
        raise MemoryError(f"target {resolved.name!r}: out of memory during {what}") from err
    cause = write_fault(err)
    if cause is not None:
        return OutputError(f"{cause} writing {file}")
    return LoweringError(f"{what} failed: {detail}", target=resolved.name)


#: Room a library needs beyond its weights (kernels, runtime glue; the tiny CNN's is ~90 KB).
LIBRARY_CODE_BYTES = 256 * 1024


def _check_room(outdir: Path, weight_bytes: int) -> None:
    """Refuse to export when the file size limit or the free space cannot hold the library.

    LLVM writes the object file inside this process and, on a write error, ends the whole
    process (``LLVM ERROR: IO failure on output stream``) before Python can name the cause
    or clean up; so the room is checked first (the object goes to the temp folder, the
    library to ``outdir``). The need is estimated: weights + :data:`LIBRARY_CODE_BYTES`.
    """
    import resource

    needed = weight_bytes + LIBRARY_CODE_BYTES
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise OutputError(f"file size limit exceeded writing {LIBRARY_NAME} (ulimit -f allows "
                          f"{soft} bytes, the library needs about {needed})")
    for folder in dict.fromkeys((Path(outdir), Path(tempfile.gettempdir()))):
        stat = os.statvfs(folder)
        free = stat.f_bavail * stat.f_frsize
        if free < needed:
            raise OutputError(f"no space left on device writing {LIBRARY_NAME} ({free} bytes "
                              f"free in {folder}, the library needs about {needed})")


def _export(executable, library: Path, cross_cc: str | None, *, keep_symbols: bool = False) -> None:
    """``export_library`` into a temp file next to ``library``, then rename over it. A
    cross-compiled library is stripped with the cross toolchain's strip (unless
    ``keep_symbols``); see strip_library."""
    fd, tmp = tempfile.mkstemp(prefix=f".{library.name}.", suffix=".so", dir=library.parent)
    os.close(fd)
    try:
        kwargs = {"cc": cross_cc} if cross_cc else {}
        executable.export_library(tmp, **kwargs)
        if cross_cc and not keep_symbols:
            strip_library(Path(tmp), cross_cc)
        replace_atomic(tmp, library, mode=0o755)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_artifact(model: ir.Model, target: str | dict[str, Any] | ResolvedTarget,
                   outdir: Path, *, model_hash: str,
                   inputs: Sequence[InputDecl] | None = None,
                   progress: Progress | None = None, tune_trials: int = 0,
                   tuning_db: Path | None = None, apply_tuning: bool = True,
                   keep_symbols: bool = False) -> BuildResult:
    """Compile ``model`` for ``target`` into ``outdir/model.so`` + ``outdir/manifest.json``.

    ``model`` has static input shapes and folded constants (the frontend's
    output). ``inputs``, when given, must match the model's inputs (name,
    shape, dtype, in order). ``model_hash`` identifies the model+spec in the
    manifest. ``tune_trials`` > 0 first tunes the kernels that have no record
    with MetaSchedule (that many trials in all) into the database under
    ``tuning_db`` (default: the user cache, see :mod:`.tuning`); every build
    applies the records that match, whether or not it tuned (``apply_tuning=False``:
    kiln's rules only, e.g. to compare). A cross-compiled library is stripped unless
    ``keep_symbols``. Raises LoweringError (unsupported ops, import or compile
    failure) or KilnError (missing cross compiler).
    """
    import tvm

    resolved = target if isinstance(target, ResolvedTarget) else resolve_target(target)
    cross_cc = require_cross_compiler(resolved)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    report = progress or (lambda step, done, total: None)
    times: dict[str, float] = {}
    start = time.perf_counter()

    def step(name: str) -> None:
        now = time.perf_counter()
        if times:
            last = next(reversed(times))
            times[last] = now - times[last]
        times[name] = now
        report(name, _STEPS.index(name), len(_STEPS))
        logger.info("build %s: %s", resolved.name, name)

    check_static_inputs(model, resolved.name)
    model_inputs = _model_inputs(model)
    if inputs is not None:
        _check_declared_inputs(model_inputs, inputs, resolved.name)

    step("lower")
    mod = lower_to_relax(model, target_name=resolved.name)
    mod, load_time_weights = move_shared_mixing_to_load_time(mod)
    outputs = _relax_outputs(mod, list(model.graph.outputs))
    sparse = json.loads(str(mod.attrs[SPARSE_KERNELS_ATTR])) \
        if mod.attrs is not None and SPARSE_KERNELS_ATTR in mod.attrs else []

    step("tune")
    tuning_summary = None
    if tune_trials > 0:
        def tune_progress(_step: str, done: int, total: int) -> None:
            report(f"tune {done}/{total} trials", _STEPS.index("tune"), len(_STEPS))

        summary = tune_relax_module(mod, resolved, trials=tune_trials, tuning_db=tuning_db,
                                    progress=tune_progress)
        tuning_summary = json.loads(describe(summary))
    db_dirs = database_dirs(resolved, tuning_db) if apply_tuning else []
    database = open_database(db_dirs)

    step("compile")
    scheduled: dict[str, Any] = {}

    def on_scheduled(scheduled_mod) -> None:
        scheduled["unscheduled"] = unscheduled_kernels(scheduled_mod)
        scheduled["rules"] = schedule_rules_used(scheduled_mod)
        scheduled["races"] = racing_kernels(scheduled_mod)
        interrupt.checkpoint("build")  # called from inside tvm.compile (C++)

    try:
        executable = tvm.compile(mod, target=resolved.tvm_target(),
                                 relax_pipeline=relax_pipeline(resolved, database, on_scheduled))
    except Exception as err:  # TVM raises its own error types from C++
        raise _failure(err, "TVM compile", resolved, LIBRARY_NAME) from err

    unscheduled = scheduled.get("unscheduled", [])
    rules = scheduled.get("rules", {})
    if unscheduled:
        logger.warning("%d kernel(s) without a schedule rule or tuning record (near TVM's "
                       "default speed): %s", len(unscheduled), ", ".join(unscheduled))
    races = scheduled.get("races", {})
    if races:
        logger.warning("possible data race in %d kernel(s) (a parallel loop's iterations "
                       "write one element): %s", len(races),
                       "; ".join(f"{k} ({rules.get(k, '?')}): {', '.join(v)}"
                                 for k, v in races.items()))
    tuned = sum(1 for r in rules.values() if r == TUNED_RULE)
    if database is not None:
        logger.info("tuning records applied to %d of %d kernels (%s)", tuned, len(rules),
                    ", ".join(str(d) for d in db_dirs))

    step("export")
    library = outdir / LIBRARY_NAME
    _check_room(outdir, count_weight_bytes(model))
    try:
        _export(executable, library, cross_cc, keep_symbols=keep_symbols)
    except Exception as err:
        raise _failure(err, "exporting the library", resolved, LIBRARY_NAME) from err

    step("check")
    binary = check_binary(library, resolved)
    manifest = Manifest(
        target_name=resolved.name, target=resolved.target, target_family=resolved.family,
        target_arch=resolved.arch, inputs=tuple(model_inputs), outputs=tuple(outputs),
        model_hash=model_hash, kiln_version=kiln_version(), tvm_version=str(tvm.__version__),
        dims={k: list(v) for k, v in symbolic_ranges(model).items()},
        extra={**({"sparse_kernels": [c["node"] for c in sparse if c["kernel"] == "sparse"]}
                  if sparse else {}),
               **({LOAD_TIME_KEY: load_time_weights} if load_time_weights else {})},
    ).with_files(outdir, [LIBRARY_NAME])
    manifest_path = write_manifest(outdir, manifest)
    last = next(reversed(times))
    times[last] = time.perf_counter() - times[last]
    seconds = time.perf_counter() - start
    report("done", len(_STEPS), len(_STEPS))
    logger.info("built %s for %s in %.1f s (%s)", library, resolved.name, seconds, binary)
    return BuildResult(library=library, manifest=manifest_path, seconds=seconds,
                       runs_on_host=resolved.runs_on_this_host(), target=resolved.name,
                       binary=binary, step_seconds=times, unscheduled=unscheduled,
                       rules=rules, tuning_dbs=[str(d) for d in db_dirs], tuning=tuning_summary,
                       sparse_kernels=sparse, races=races)
