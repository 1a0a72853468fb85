"""MetaSchedule tuning with a persistent per-target database, and applying it on every build.

Where records live (one MetaSchedule JSON database, ``database_workload.json`` +
``database_tuning_record.json``, per directory)::

    <root>/<target key>/          root: ``tuning_db`` argument, else $KILN_TUNING_DIR,
                                  else platformdirs.user_cache_dir("kiln")/tuning
    backends/tvm/tuning_db/<target key>/   shipped with kiln (reference targets)

The target key names the code generator's CPU (``llvm-znver4``, ``llvm-x86-64-v3``,
``llvm-aarch64``, ``cuda-sm_90``). A record is a schedule trace for one kernel,
matched by the kernel's structural hash (MetaSchedule ignores the target on lookup), so
any record is *valid* for any LLVM CPU; it is only *tuned* for the one it was measured
on. Lookup order on a build: the user's database for the exact key, then the shipped
one for the exact key, else shipped databases whose key has the same ISA and vector
width (an AVX-512 ``znver4`` record serves ``skylake-avx512`` or ``x86-64-v4``; it is
not used for ``x86-64-v3``, whose vectors are half as wide).

Tuning (``tune_relax_module``) extracts the kernels kiln's legalize phase produces (so
the hashes match the build's) and tunes the ones without a record. The search space
(``space``) of a kernel whose kiln rule has choice points (``IN_PLACE_RULES``:
contraction, window) is:

- ``kiln`` (the default): kiln's own rule, run by a ``ScheduleFn`` on the task's
  Schedule with its choice points tunable (``schedules/analysis.py``: ``choose`` and
  ``choose_factor``).
  contraction: column tile NR (every vector multiple dividing N), loop order (which
  operand's tiles are swept innermost), row tile MR (divisors of M that fit the
  accumulator registers), K split 1/2/4/8; window: vectors per tile (1-8), small window
  loops unrolled or not. A structural choice (NR is the packed weight's layout; a loop
  order) cannot be changed by replaying a trace, so each is its own design space
  (enumerated, defaults first, at most MAX_RULE_SPACES); a split factor is a
  ``sample_categorical`` whose decision MetaSchedule's evolutionary search samples.
  kiln's default decisions are one point of the space (its first design space).
- ``union``: that and MetaSchedule's default CPU sketches (``SpaceGeneratorUnion``), so
  generic multi-level tiling competes with kiln's rule. On a small budget the sketches
  take most trials (they mutate; kiln's decisions are only resampled), and few trials
  do not find good generic conv schedules: on the same budget ``kiln`` found better
  records (see DEFAULT_SPACE). ``union`` is for large budgets.
- ``metaschedule``: MetaSchedule's default CPU space only.

Kernels of other rules always get MetaSchedule's default space (their rules have no
choice points). A record from kiln's space is a trace of kiln's rule with the best
decisions (its root block annotated ``kiln.rule``); builds apply it like any record
(``MetaScheduleApplyDatabase``), and its weight packing still moves to compile time
(``SplitLayoutRewritePreproc`` + ``fold_weight_prepack`` run after). Then kiln's
default rule is measured on each kernel with the same builder and runner and a record
is kept only when it beats it by 5 %: kiln's rules are the baseline every record must
beat.
"""

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
from tvm import relax, s_tir, tirx
from tvm.target.codegen import target_has_features

from .schedules.pipeline import RULE_ATTR, SCHEDULED_ATTR
from .targets import ResolvedTarget

log = logging.getLogger(__name__)

TUNED_RULE = "tuned"
SHIPPED_ROOT = Path(__file__).resolve().parent / "tuning_db"
WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
# A MetaSchedule record is kept only when it runs in under this fraction of kiln's rule.
KEEP_IF_FASTER_THAN = 0.95

#: ``progress(step, done, total)``, as for builds: step "tune", done/total trials.
Progress = Callable[[str, int, int], None]


# ---------------------------------------------------------------------------------- keys


def target_key(target: ResolvedTarget | dict) -> str:
    """Directory name for a target's records: code generator + CPU (``llvm-znver4``)."""
    spec = target.target if isinstance(target, ResolvedTarget) else target
    kind = str(spec.get("kind", "llvm"))
    if kind == "cuda":
        return f"cuda-{spec.get('arch', 'generic')}"
    if spec.get("mcpu"):
        return f"{kind}-{spec['mcpu']}"
    triple = str(spec.get("mtriple", ""))
    return f"{kind}-{triple.split('-')[0] if triple else 'generic'}"


def _isa_class(key: str) -> str | None:
    """``<arch>-<widest vector ISA>`` of an LLVM key (which records may stand in for which)."""
    if not key.startswith("llvm-"):
        return None
    cpu = key[len("llvm-"):]
    if cpu == "aarch64" or cpu.startswith(("cortex", "neoverse", "apple")):
        return "aarch64-neon"
    spec: dict = {"kind": "llvm"} if cpu == "generic" else {"kind": "llvm", "mcpu": cpu}
    try:
        target = tvm.target.Target(spec)
        for isa in ("avx512f", "avx2"):
            if target_has_features(isa, target):
                return f"x86_64-{isa}"
    except Exception:  # noqa: BLE001 - an unknown CPU name: no stand-in
        return None
    return "x86_64-sse"


def user_root(tuning_db: Path | None = None) -> Path:
    """The writable root of tuning databases (see the module docstring)."""
    if tuning_db is not None:
        return Path(tuning_db)
    if os.environ.get("KILN_TUNING_DIR"):
        return Path(os.environ["KILN_TUNING_DIR"])
    import platformdirs

    return Path(platformdirs.user_cache_dir("kiln")) / "tuning"


def _has_records(path: Path) -> bool:
    record = path / RECORD_FILE
    return record.is_file() and record.stat().st_size > 0


def database_dirs(target: ResolvedTarget, tuning_db: Path | None = None,
                  *, shipped_root: Path = SHIPPED_ROOT) -> list[Path]:
    """The databases a build for ``target`` reads, most trusted first (may be empty)."""
    key = target_key(target)
    dirs = [d for d in (user_root(tuning_db) / key, shipped_root / key) if _has_records(d)]
    if not (shipped_root / key).is_dir() and shipped_root.is_dir():
        cls = _isa_class(key)
        if cls is not None:
            dirs += sorted(d for d in shipped_root.iterdir()
                           if d.is_dir() and _has_records(d) and _isa_class(d.name) == cls)
    return dirs


def open_database(dirs: list[Path]):
    """One MetaSchedule database over ``dirs`` (first match wins), or None if none."""
    from tvm.s_tir import meta_schedule as ms

    dbs = [ms.database.JSONDatabase(work_dir=str(d), allow_missing=False) for d in dirs]
    if not dbs:
        return None
    return dbs[0] if len(dbs) == 1 else ms.database.OrderedUnionDatabase(*dbs)


# -------------------------------------------------------------------------- applying


def _scheduled_names(mod: tvm.IRModule) -> set[str]:
    return {gv.name_hint for gv, f in mod.functions.items()
            if isinstance(f, tirx.PrimFunc) and f.attrs and f.attrs.get(SCHEDULED_ATTR)}


def apply_tuning_records(database) -> tvm.transform.Pass:
    """Schedule every kernel that has a record in ``database`` (tagged rule ``tuned``).

    Runs MetaSchedule's ``MetaScheduleApplyDatabase`` with ``database`` as the current
    one; must run under the target (the build pipeline enters it). The count of kernels
    it scheduled is logged, since a database that silently matches nothing looks the
    same as one that applied.
    """

    @tvm.transform.module_pass(opt_level=0, name="kiln.ApplyTuningRecords")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if database is None:
            return mod
        before = _scheduled_names(mod)
        with database, tvm.transform.PassContext(opt_level=3):
            mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        tuned = sorted(_scheduled_names(mod) - before)
        for name in tuned:
            gvar = mod.get_global_var(name)
            mod[gvar] = mod[gvar].with_attr(RULE_ATTR, TUNED_RULE)
        log.info("tuning records applied to %d kernels: %s", len(tuned), ", ".join(tuned))
        return mod

    return _pass


# -------------------------------------------------------------- kiln's search space

#: What ``tune_relax_module(space=...)`` searches for a kernel scheduled by a tunable
#: kiln rule (``schedules.pipeline.IN_PLACE_RULES``); other kernels always get
#: MetaSchedule's default space.
SPACES = ("kiln", "union", "metaschedule")
# Measured here (one kernel, ~32 trials per space, best record vs kiln's rule side by
# side): the largest PP-OCR cls conv, 2 threads, rule 18.7-19.8 us: kiln 17.2 / 18.0 (two
# runs), union 21.2, metaschedule 31.0; the 128x1024x256 matmul, 1 thread, rule 588 us:
# kiln 586, metaschedule 595, union 658.
DEFAULT_SPACE = "kiln"
# The root-block annotation that marks a design space (and so a record) as kiln's rule.
RULE_ANNOTATION = "kiln.rule"
# At most this many structural variants (column tile x loop order x ...) of one kernel.
MAX_RULE_SPACES = 24


def rule_design_spaces(sch, target: tvm.target.Target, const_params: frozenset[int],
                       rule: str, *, limit: int = MAX_RULE_SPACES) -> list:
    """kiln's ``rule`` applied to copies of ``sch`` (a task's fresh Schedule) with its
    choice points tunable: one design space per combination of structural choices
    (``analysis.choose``, defaults first, breadth-first), each holding its split-factor
    choices as ``sample_categorical`` decisions (``analysis.choose_factor``) at their
    defaults. The first space is kiln's default schedule."""
    from .schedules.analysis import ChoicePlan
    from .schedules.pipeline import rule_context, schedule_in_place

    spaces, pending = [], [()]
    while pending and len(spaces) < limit:
        forced = pending.pop(0)
        plan = ChoicePlan(forced)
        space = sch.copy()
        space.seed(sch.fork_seed())
        ctx = rule_context(target, const_params, tunable=True, plan=plan)
        try:
            scheduled = schedule_in_place(space, ctx, rule)
        except Exception as err:  # noqa: BLE001 - an option the rule cannot take: skip it
            log.debug("kiln's %s rule failed with choices %s: %s", rule, forced, err)
            scheduled = False
        if scheduled:
            space.annotate(space.get_sblock("root"), RULE_ANNOTATION, rule)
            spaces.append(space)
        taken = [index for _, index in plan.met]
        for at in range(len(forced), len(plan.met)):
            count, index = plan.met[at]
            pending += [(*taken[:at], other) for other in range(count) if other != index]
    return spaces


def kiln_space(func: tirx.PrimFunc, target: tvm.target.Target, const_params: frozenset[int],
               space: str = DEFAULT_SPACE):
    """The MetaSchedule space generator for one kernel: kiln's tunable rule (``kiln``),
    that and MetaSchedule's default sketches (``union``), or None when the rule the build
    picks for ``func`` has no choice points (or ``space`` is ``metaschedule``)."""
    from tvm.s_tir import meta_schedule as ms

    from .schedules.pipeline import IN_PLACE_RULES, rule_context, schedule_primfunc

    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, not {space!r}")
    if space == "metaschedule":
        return None
    picked = schedule_primfunc(func, rule_context(target, const_params))
    if picked is None or picked[1] not in IN_PLACE_RULES:
        return None
    rule = picked[1]
    if not rule_design_spaces(s_tir.Schedule(func), target, const_params, rule, limit=1):
        log.debug("kiln's %s rule has no tunable form for this kernel", rule)
        return None

    def design_spaces(sch):
        return rule_design_spaces(sch, target, const_params, rule)

    kiln = ms.space_generator.ScheduleFn(design_spaces, sch_rules=[])
    if space == "kiln":
        return kiln
    return ms.space_generator.SpaceGeneratorUnion([kiln, ms.space_generator.PostOrderApply()])


def record_origin(trace) -> str:
    """``kiln`` when a record's trace is kiln's rule (RULE_ANNOTATION), else ``metaschedule``."""
    for inst in trace.insts:
        if inst.kind.name == "Annotate" and str(inst.attrs[0]) == RULE_ANNOTATION:
            return "kiln"
    return "metaschedule"


def _task_const_params(legal: tvm.IRModule, tasks) -> dict[str, frozenset[int]]:
    """Per task: the params bound to a constant at every call of every kernel it stands
    for (MetaSchedule merges structurally equal kernels; one record serves them all)."""
    import tvm_ffi

    from .schedules.pipeline import _const_params

    consts = _const_params(legal)
    funcs = [(gv.name_hint, f.without_attr("global_symbol"))
             for gv, f in legal.functions.items() if isinstance(f, tirx.PrimFunc)]
    hashes = [tvm_ffi.structural_hash(f) for _, f in funcs]
    out = {}
    for task in tasks:
        main = task.dispatched[0]["main"].without_attr("global_symbol")
        digest = tvm_ffi.structural_hash(main)
        sets = [consts.get(name, frozenset()) for (name, f), h in zip(funcs, hashes, strict=True)
                if name == task.task_name or (h == digest and tvm_ffi.structural_equal(f, main))]
        out[task.task_name] = frozenset.intersection(*sets) if sets else frozenset()
    return out


def _tune_contexts(tasks, legal: tvm.IRModule, target: tvm.target.Target, work_dir: str,
                   space: str, seed: int | None):
    """One TuneContext per task, with kiln's space where its rule is tunable."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.logging import get_loggers_from_work_dir
    from tvm.s_tir.meta_schedule.utils import fork_seed

    consts = _task_const_params(legal, tasks)
    contexts, weights = [], []
    loggers = get_loggers_from_work_dir(work_dir, [t.task_name for t in tasks])
    for task, logger, rand_state in zip(tasks, loggers, fork_seed(seed, n=len(tasks)),
                                        strict=True):
        generator = kiln_space(task.dispatched[0]["main"], target, consts[task.task_name],
                               space)
        contexts.append(ms.TuneContext(
            mod=task.dispatched[0], target=target,
            space_generator=generator or "post-order-apply", search_strategy="evolutionary",
            task_name=task.task_name, logger=logger, rand_state=rand_state,
            num_threads="physical").clone())
        weights.append(task.weight)
    return contexts, weights


# ---------------------------------------------------------------------------- tuning


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
    from tvm.s_tir import meta_schedule as ms
    from tvm.ir.utils import derived_object

    @derived_object
    class _Progress(ms.measure_callback.PyMeasureCallback):
        def __init__(self) -> None:
            self.done = 0

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
                  runner_results) -> None:
            self.done += len(measure_candidates)
            progress("tune", min(self.done, total), total)

    return _Progress()


def build_candidate(mod: tvm.IRModule, target: tvm.target.Target, _params=None):
    """MetaSchedule's candidate build without its ``import tvm.s_tir.tensor_intrin``.

    The default build imports TVM's tensor-intrinsic registry in every fresh builder
    worker (MetaSchedule restarts its builder pool for each batch): 27 s per batch
    here, longer than the builds. kiln's fp32 search space uses no tensor intrinsics.
    """
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm.tirx.build(mod, target=target)


def _builder():
    from tvm.s_tir import meta_schedule as ms

    return ms.builder.LocalBuilder(f_build=build_candidate, max_workers=os.cpu_count() or 1)


def _best_secs(run_secs) -> float | None:
    """The fastest repeat: on a shared machine the slower ones measure the neighbours."""
    values = [float(v) for v in run_secs] if run_secs else []
    good = [v for v in values if v < 1e9]
    return min(good) if good else None


def _measure(funcs: dict[str, tirx.PrimFunc], target: tvm.target.Target) -> dict[str, float]:
    """Seconds per call of each (scheduled) PrimFunc, with MetaSchedule's builder and runner."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    names = list(funcs)
    if not names:
        return {}
    builder = _builder()
    runner = ms.runner.LocalRunner(evaluator_config=ms.runner.EvaluatorConfig(
        number=3, repeat=3, min_repeat_ms=50, enable_cpu_cache_flush=False))
    mods = [tvm.IRModule({"main": funcs[n].with_attr("global_symbol", "main")}) for n in names]
    built = builder.build([ms.builder.BuilderInput(m, target) for m in mods])
    inputs, order = [], []
    for name, mod, result in zip(names, mods, built, strict=True):
        if result.error_msg:
            log.debug("measuring %s failed to build: %s", name, result.error_msg)
            continue
        # the args after the packing block is removed (a packed weight is a packed param)
        measured = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)["main"]
        inputs.append(ms.runner.RunnerInput(result.artifact_path, "cpu",
                                            ms.arg_info.ArgInfo.from_prim_func(measured)))
        order.append(name)
    out = {}
    for name, future in zip(order, runner.run(inputs), strict=True):
        result = future.result()
        secs = _best_secs(result.run_secs) if not result.error_msg else None
        if result.error_msg:
            log.debug("measuring %s failed: %s", name, result.error_msg[-1500:])
        if secs is not None:
            out[name] = secs
    return out


def _measure_pairs(kiln_funcs: dict[str, tirx.PrimFunc], tuned_funcs: dict[str, tirx.PrimFunc],
                   target: tvm.target.Target) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds per call of kiln's and the record's schedule of each kernel, measured
    alternately (kiln, record, kiln, record, ...) and each twice, keeping the faster run."""
    funcs = {}
    for name, func in tuned_funcs.items():
        if name in kiln_funcs:
            funcs[f"kiln:{name}"] = kiln_funcs[name]
        funcs[f"ms:{name}"] = func
    first, second = _measure(funcs, target), _measure(funcs, target)
    measured = {k: min(v for v in (first.get(k), second.get(k)) if v is not None)
                for k in funcs if k in first or k in second}
    kiln = {k[5:]: v for k, v in measured.items() if k.startswith("kiln:")}
    tuned = {k[3:]: v for k, v in measured.items() if k.startswith("ms:")}
    return kiln, tuned


def recheck_records(mod: tvm.IRModule, target: ResolvedTarget, *,
                    tuning_db: Path | None = None) -> TuneSummary:
    """Measure every record that serves this model's kernels against kiln's current rule
    and delete the ones that are no longer faster (kiln's rules improve; a record tuned
    on a busy machine may have won by noise)."""
    from tvm.s_tir import meta_schedule as ms

    from .schedules.pipeline import ScheduleCPUKernels

    start = time.perf_counter()
    db_dir = user_root(tuning_db) / target_key(target)
    summary = TuneSummary(database=db_dir)
    if not _has_records(db_dir):
        return summary
    ms_target = tuning_target(target)
    legal = _legalized(mod, target)
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
    kiln_secs, tuned_secs = _measure_pairs(kiln_funcs, tuned_funcs, ms_target)
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
        _drop_records(db_dir, stale)
    summary.seconds = time.perf_counter() - start
    return summary


def _drop_records(db_dir: Path, workloads: list[tvm.IRModule]) -> None:
    """Rewrite the database at ``db_dir`` without the records of ``workloads``."""
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    old = ms.database.JSONDatabase(work_dir=str(db_dir), allow_missing=False)
    with tempfile.TemporaryDirectory(prefix="kiln-db-", dir=db_dir.parent) as tmp:
        new = ms.database.JSONDatabase(work_dir=tmp, allow_missing=True)
        for record in old.get_all_tuning_records():
            mod = record.workload.mod
            if any(tvm_ffi.structural_equal(mod, w) for w in workloads):
                continue
            workload = new.commit_workload(mod)
            new.commit_tuning_record(ms.database.TuningRecord(
                record.trace, workload, record.run_secs, record.target, record.args_info))
        del new
        for name in (WORKLOAD_FILE, RECORD_FILE):
            os.replace(Path(tmp) / name, db_dir / name)


def _legalized(mod: tvm.IRModule, target: ResolvedTarget) -> tvm.IRModule:
    from .pipeline import build_phases

    with target.tvm_target():
        return tvm.transform.Sequential(build_phases(target).legalize)(mod)


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

    from .schedules.pipeline import ScheduleCPUKernels

    start = time.perf_counter()
    db_dir = user_root(tuning_db) / target_key(target)
    db_dir.mkdir(parents=True, exist_ok=True)
    summary = TuneSummary(database=db_dir)
    ms_target = tuning_target(target)
    legal = _legalized(mod, target)
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

    report("tune", 0, trials)
    if target.family == "cpu":
        _register_cpu_tensor_intrinsics()
    _reset_meta_schedule_handlers()
    with tempfile.TemporaryDirectory(prefix="kiln-tune-") as work_dir:
        contexts, weights = _tune_contexts(pending, legal, ms_target, work_dir, space, seed)
        scratch = ms.database.MemoryDatabase()
        callbacks = [*ms.measure_callback.MeasureCallback.create("default"),
                     _progress_callback(trials, report)]
        with _quiet_ms_logs():
            ms.tune.tune_tasks(
                tasks=contexts, task_weights=weights, work_dir=work_dir,
                max_trials_global=trials, num_trials_per_iter=min(64, max(4, trials // 4)),
                database=scratch, measure_callbacks=callbacks, builder=_builder())
        best = {}
        for task in pending:
            record = scratch.query_tuning_record(task.dispatched[0], ms_target, task.task_name)
            if record is not None:
                best[task.task_name] = (task, record)
        ms_funcs = {}
        for name, (task, record) in best.items():
            sch = scratch.query_schedule(task.dispatched[0], ms_target, name)
            if sch is not None:
                ms_funcs[name] = sch.mod["main"]
        log.debug("best records: %s", list(best))
        kiln_secs, ms_secs = _measure_pairs(kiln_funcs, ms_funcs, ms_target)
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
