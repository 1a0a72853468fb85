"""The tuning driver: tune a model's kernels into the persistent database for a target,
or re-measure the records it has against kiln's current rules (see the package docstring)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import tvm
from tvm import tirx

from kiln.backends.tvm import remote
from kiln.backends.tvm.pipeline import legalize_passes
from kiln.backends.tvm.schedules.registry import SCHEDULED_ATTR, ScheduleCPUKernels
from kiln.backends.tvm.targets import ResolvedTarget
from kiln.backends.tvm.tuning.database import (
    drop_records,
    has_records,
    target_key,
    user_root,
)
from kiln.backends.tvm.tuning.measure import candidate_builder, measure_pairs
from kiln.backends.tvm.tuning.space import DEFAULT_SPACE, record_origin, tune_contexts
from kiln.compiler.core.errors import KilnError

log = logging.getLogger(__name__)

# A MetaSchedule record is kept only when it runs in under this fraction of kiln's rule.
KEEP_IF_FASTER_THAN = 0.95

#: ``progress(step, done, total)``, as for builds: step "tune", done/total trials.
Progress = Callable[[str, int, int], None]


@dataclass
class TuneSummary:
    """What one tuning run did."""

    database: Path
    tasks: int = 0  # distinct kernels in the model
    already: int = 0  # kernels that had a record before
    tuned: int = 0  # kernels given a trial budget
    kept: dict[str, tuple[float, float]] = field(default_factory=dict)  # name: (ms us, kiln us)
    origin: dict[str, str] = field(default_factory=dict)  # best record's space: kiln/metaschedule
    dropped: dict[str, tuple[float, float]] = field(default_factory=dict)  # kiln was faster
    seconds: float = 0.0


def tuning_target(target: ResolvedTarget) -> tvm.target.Target:
    """The target MetaSchedule tunes for: the build's, with ``num-cores`` (it requires it)."""
    spec = dict(target.target)
    if spec.get("kind") == "llvm":
        spec.setdefault("num-cores", os.cpu_count() or 1)
    return tvm.target.Target(spec)


def _progress_callback(total: int, progress: Progress):
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class _Progress(ms.measure_callback.PyMeasureCallback):
        def __init__(self) -> None:
            self.done = 0

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
                  runner_results) -> None:
            self.done += len(measure_candidates)
            progress("tune", min(self.done, total), total)

    return _Progress()



def recheck_records(mod: tvm.IRModule, target: ResolvedTarget, *,
                    tuning_db: Path | None = None) -> TuneSummary:
    """Measure every record that serves this model's kernels against kiln's current rule
    and delete the ones that are no longer faster (kiln's rules improve; a record tuned
    on a busy machine may have won by noise)."""
    from tvm.s_tir import meta_schedule as ms

    start = time.perf_counter()
    db_dir = user_root(tuning_db) / target_key(target)
    summary = TuneSummary(database=db_dir)
    if not has_records(db_dir):
        return summary
    ms_target = tuning_target(target)
    legal = legalized(mod, target)
    tasks = ms.relax_integration.extract_tasks(legal, ms_target)
    summary.tasks = len(tasks)
    database = ms.database.JSONDatabase(work_dir=str(db_dir), allow_missing=False)
    with ms_target:
        kiln_mod = ScheduleCPUKernels(ms_target)(legal)
    by_name = {gv.name_hint: f for gv, f in kiln_mod.functions.items()
               if isinstance(f, tirx.PrimFunc) and f.attrs and f.attrs.get(SCHEDULED_ATTR)}
    kiln_funcs, tuned_funcs, workloads = {}, {}, {}
    for task in tasks:
        sch = database.query_schedule(task.dispatched[0], ms_target, task.task_name)
        if sch is None:
            continue
        summary.already += 1
        tuned_funcs[task.task_name] = sch.mod["main"]
        workloads[task.task_name] = task.dispatched[0]
        if task.task_name in by_name:
            kiln_funcs[task.task_name] = by_name[task.task_name]
    kiln_secs, tuned_secs = measure_pairs(kiln_funcs, tuned_funcs, ms_target)
    stale = []
    for name in tuned_funcs:
        tuned, kiln = tuned_secs.get(name), kiln_secs.get(name)
        if tuned is None or kiln is None:
            continue
        times = (tuned * 1e6, kiln * 1e6)
        if tuned >= kiln * KEEP_IF_FASTER_THAN:
            summary.dropped[name] = times
            stale.append(workloads[name])
        else:
            summary.kept[name] = times
    if stale:
        drop_records(db_dir, stale)
    summary.seconds = time.perf_counter() - start
    return summary



def legalized(mod: tvm.IRModule, target: ResolvedTarget) -> tvm.IRModule:
    """``mod`` after the build's legalize phase for ``target`` (the kernels a build
    schedules, so that task hashes match the build's)."""
    with target.tvm_target():
        return tvm.transform.Sequential(legalize_passes(target))(mod)


def _register_cpu_tensor_intrinsics() -> None:
    """Register TVM's CPU tensor intrinsics without its CUDA ones.

    ``TuneContext`` imports ``tvm.s_tir.tensor_intrin``, whose package import parses
    every target's intrinsics: 27 s here, 20 of them CUDA's. For LLVM tuning the package
    is entered without running its ``__init__`` and only the x86/ARM modules are
    imported; ``tvm.s_tir.tensor_intrin.<name>`` imports keep working.
    """
    import importlib
    import importlib.util
    import sys
    import types

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return
    package = types.ModuleType(name)
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules[name] = package
    for sub in ("x86", "arm_cpu"):
        importlib.import_module(f"{name}.{sub}")


def require_xgboost() -> None:
    """MetaSchedule's cost model is XGBoost, an optional extra (it pulls ~470 MB of NCCL)."""
    import importlib.util

    if importlib.util.find_spec("xgboost") is None:
        raise KilnError("tuning needs XGBoost (MetaSchedule's cost model): "
                        "pip install 'kiln[tune]', or compile with --tune 0")


def _reset_meta_schedule_handlers() -> None:
    """Drop the handlers an earlier tuning run left on MetaSchedule's logger.

    MetaSchedule configures file handlers in each run's (temporary) work dir and, on
    the next run in the same process, copies the names of the logger's handlers into
    its new config; a stale or unnamed one makes it fail (``None.format``).
    """
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    for handler in list(ms_logger.handlers):
        ms_logger.removeHandler(handler)
        handler.close()


def tune_relax_module(mod: tvm.IRModule, target: ResolvedTarget, *, trials: int,
                      tuning_db: Path | None = None, progress: Progress | None = None,
                      seed: int | None = 0, keep_slower: bool = False,
                      space: str = DEFAULT_SPACE) -> TuneSummary:
    """Tune the kernels of a lowered Relax module into the persistent database for ``target``.

    Kernels that already have a record are skipped; ``trials`` is the budget over the
    rest (MetaSchedule's gradient task scheduler spreads it). ``space`` (SPACES) is what
    a kernel of a tunable kiln rule is searched over. Records that do not beat kiln's
    own rule are not saved.
    """
    from tvm.s_tir import meta_schedule as ms

    start = time.perf_counter()
    db_dir = user_root(tuning_db) / target_key(target)
    db_dir.mkdir(parents=True, exist_ok=True)
    summary = TuneSummary(database=db_dir)
    ms_target = tuning_target(target)
    legal = legalized(mod, target)
    tasks = ms.relax_integration.extract_tasks(legal, ms_target)
    summary.tasks = len(tasks)
    database = ms.database.JSONDatabase(work_dir=str(db_dir), allow_missing=True)
    pending = []
    for task in tasks:
        if database.has_workload(task.dispatched[0]) and database.query_tuning_record(
                task.dispatched[0], ms_target, task.task_name) is not None:
            summary.already += 1
        else:
            pending.append(task)
    summary.tuned = len(pending)
    report = progress or (lambda step, done, total: None)
    if not pending or trials <= 0:
        summary.seconds = time.perf_counter() - start
        return summary

    # kiln's rule on the same kernels: the baseline a record must beat
    with ms_target:
        kiln_mod = ScheduleCPUKernels(ms_target)(legal)
    by_name = {gv.name_hint: f for gv, f in kiln_mod.functions.items()
               if isinstance(f, tirx.PrimFunc) and f.attrs and f.attrs.get(SCHEDULED_ATTR)}
    kiln_funcs = {t.task_name: by_name[t.task_name] for t in pending if t.task_name in by_name}

    require_xgboost()
    report("tune", 0, trials)
    if target.family == "cpu":
        _register_cpu_tensor_intrinsics()
    _reset_meta_schedule_handlers()
    with tempfile.TemporaryDirectory(prefix="kiln-tune-") as work_dir:
        contexts, weights = tune_contexts(pending, legal, ms_target, work_dir, space, seed)
        scratch = ms.database.MemoryDatabase()
        callbacks = [*ms.measure_callback.MeasureCallback.create("default"),
                     _progress_callback(trials, report)]
        with _quiet_ms_logs():
            ms.tune.tune_tasks(
                tasks=contexts, task_weights=weights, work_dir=work_dir,
                max_trials_global=trials, num_trials_per_iter=min(64, max(4, trials // 4)),
                database=scratch, measure_callbacks=callbacks, builder=candidate_builder(),
                runner=remote.runner())  # on a board within remote.measuring_on(--rpc)
        best = {}
        for task in pending:
            record = scratch.query_tuning_record(task.dispatched[0], ms_target, task.task_name)
            if record is not None:
                best[task.task_name] = (task, record)
        ms_funcs = {}
        for name, (task, _record) in best.items():
            sch = scratch.query_schedule(task.dispatched[0], ms_target, name)
            if sch is not None:
                ms_funcs[name] = sch.mod["main"]
        log.debug("best records: %s", list(best))
        kiln_secs, ms_secs = measure_pairs(kiln_funcs, ms_funcs, ms_target)
    for name, (task, record) in best.items():
        tuned, kiln = ms_secs.get(name), kiln_secs.get(name)
        if tuned is None:
            continue
        times = (tuned * 1e6, kiln * 1e6 if kiln is not None else float("nan"))
        summary.origin[name] = record_origin(record.trace)
        if kiln is not None and tuned >= kiln * KEEP_IF_FASTER_THAN and not keep_slower:
            summary.dropped[name] = times
            continue
        workload = database.commit_workload(task.dispatched[0])
        database.commit_tuning_record(ms.database.TuningRecord(
            record.trace, workload, record.run_secs, ms_target, record.args_info))
        summary.kept[name] = times
    summary.seconds = time.perf_counter() - start
    log.info("tuned %d kernels in %.0f s: kept %d records (%s), kiln's rule faster on %d",
             summary.tuned, summary.seconds, len(summary.kept), ", ".join(summary.kept),
             len(summary.dropped))
    return summary


@contextlib.contextmanager
def _quiet_ms_logs() -> Iterator[None]:
    """MetaSchedule logs each task at INFO to the root logger; keep that at DEBUG for kiln."""
    ms_log = logging.getLogger("tvm.s_tir.meta_schedule")
    level = ms_log.level
    if not log.isEnabledFor(logging.DEBUG):
        ms_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        ms_log.setLevel(level)


def describe(summary: TuneSummary) -> str:
    """One line for logs and the CLI."""
    return json.dumps({"database": str(summary.database), "tasks": summary.tasks,
                       "already": summary.already, "tuned": summary.tuned,
                       "kept": len(summary.kept), "dropped": len(summary.dropped),
                       "kept_from_kiln_rules": sum(summary.origin.get(n) == "kiln"
                                                   for n in summary.kept),
                       "seconds": round(summary.seconds, 1)})
