"""The pipeline driver: load -> (pass -> verify)* -> save ONNX -> build with TVM.

This is the one module (with the CLI) that ties passes and backends together.
Every pass is checked with ONNX Runtime against the model before it and the
source model: exact passes must match to float32 tolerance, lossy passes must
meet their ``budget`` (or ``on_budget_exceeded: skip_pass`` undoes them).

Outputs go through :class:`kiln.compiler.driver.outdir.OutputFolder`: a run writes
into a staging folder and replaces OUTDIR's kiln files in one step at the end, so an
error, a full disk or an interrupt leaves OUTDIR as it was. :func:`compile_to_folder`
(what ``kiln compile -o`` runs) holds OUTDIR's lock for the whole run and writes a
failed compile's report (``status: failed``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from kiln.compiler.core import graph as kir
from kiln.compiler.core import interrupt
from kiln.compiler.core.digest import file_sha256, model_hash
from kiln.compiler.core.errors import (
    FrontendError,
    KilnError,
    OutputError,
    PassError,
    VerificationError,
)
from kiln.compiler.core.frontend import load_model
from kiln.compiler.core.pass_api import CalibrationContext, Candidate, KilnPass, PassConfig
from kiln.compiler.core.selectors import describe, select_nodes
from kiln.compiler.core.spec import Budget, PassEntry, Spec, default_spec
from kiln.compiler.core.version import kiln_version
from kiln.compiler.driver import layer_errors, registry, sensitivity, symbolic
from kiln.compiler.driver.build_check import build_and_check as _build_and_check
from kiln.compiler.driver.measure import measure_build
from kiln.compiler.driver.outdir import OutputFolder
from kiln.compiler.driver.pass_checks import after_pass
from kiln.compiler.driver.report import CompileReport, PassReport
from kiln.compiler.driver.samples import SampleSets, sample_sets
from kiln.compiler.driver.specs import load_spec
from kiln.compiler.driver.verify import (
    ErrorMetrics,
    Feeds,
    compare,
    reference_outputs,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassStep:
    """A spec entry resolved to a pass class and a validated config."""

    entry: PassEntry
    pass_class: type[KilnPass]
    config: PassConfig
    section: str = "passes"        # "rules" for the spec's rewrite rules

    @property
    def name(self) -> str:
        return self.entry.name


def build_steps(spec: Spec) -> list[PassStep]:
    """Resolve every pass of the spec to its class; an unknown pass is a SpecError.

    The options were typed when the spec was loaded (``kiln.compiler.driver.specs``); a spec
    built some other way must hold each pass's own config class."""
    steps = rule_steps(spec, registry.get_pass_class("rewrite_rule"))
    for i, entry in enumerate(spec.passes):
        try:
            cls = registry.get_pass_class(entry.name)
        except KilnError as error:
            raise spec.error(("passes", i), str(error)) from None
        if not isinstance(entry.options, cls.config_class):
            raise spec.error(("passes", i), f"pass {entry.name!r}: options are a "
                             f"{type(entry.options).__name__}, not a "
                             f"{cls.config_class.__name__} (load specs with "
                             "kiln.compiler.driver.specs)")
        # a pass whose exactness depends on its options names the class to run
        for_options = getattr(cls, "for_options", None)
        steps.append(PassStep(entry, for_options(entry.options) if for_options else cls,
                              entry.options))
    return steps


def rule_steps(spec: Spec, rule_class: type[KilnPass]) -> list[PassStep]:
    """The ``rules:`` section as rewrite_rule steps (``rule:NAME``), in order."""
    steps = []
    for i, rule in enumerate(spec.rules):
        try:
            config = rule_class.config_class(name=rule.name, pattern=rule.pattern,
                                             replacement=rule.replacement, where=rule.where)
        except ValueError as error:  # pydantic's ValidationError is a ValueError
            detail = "; ".join(
                (f"{'.'.join(map(str, e['loc']))}: " if e.get("loc") else "")
                + e["msg"].removeprefix("Value error, ")
                for e in getattr(error, "errors", lambda: [])()) or str(error)
            raise spec.error(("rules", i), f"rule {rule.name!r}: {detail}") from None
        cls = rule_class if rule.exact else type("LossyRewriteRule", (rule_class,),
                                                 {"exact": False})
        entry = PassEntry(name=f"rule:{rule.name}", select=rule.select, optional=rule.optional,
                          budget=rule.budget, options=config, index=i)
        steps.append(PassStep(entry, cls, config, section="rules"))
    return steps


def _selection(model: ir.Model, step: PassStep, spec: Spec):
    """The node filter of a step; a selector that matches nothing is a SpecError."""
    selector = step.entry.select
    if selector is None:
        return None
    chosen = select_nodes(model, selector)
    if not chosen and not step.entry.optional:
        i = step.entry.index
        raise spec.error((step.section, i, "select"),
                         f"selector of pass {step.name!r} matches no node ({describe(selector)}); "
                         "fix it or set `optional: true`")
    ids = {id(node) for node in chosen}
    return lambda node: id(node) in ids


def _merged_shapes(spec: Spec, input_shapes: Mapping[str, Sequence[int]] | None):
    shapes: dict[str, list[int]] = dict(spec.inputs or {})
    shapes.update({k: list(v) for k, v in (input_shapes or {}).items()})
    return shapes


def _clone(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


@dataclass
class PlanEntry:
    name: str
    selector: str
    selected: int
    candidates: list[Candidate]
    #: with ``plan_model(sensitivity=True)``, a lossy pass's layers, most sensitive first
    ranking: list[sensitivity.LayerSensitivity] | None = None


@dataclass
class CompileResult:
    """What ``compile_model`` produced: the rewritten model, its report and how to save it."""

    model: ir.Model
    report: CompileReport
    spec: Spec
    source: str
    samples: list[Feeds] = field(default_factory=list)
    reference_outputs: list[list] = field(default_factory=list)
    target: str | dict | None = None

    #: the files the last ``save`` wrote (``OUTDIR/name``), sorted
    written: list[Path] = field(default_factory=list)

    @property
    def model_hash(self) -> str:
        """A hash of the model and the spec, known before anything is written (the build's
        provisional id; the reported ``model_hash`` is that of the shipped files, see
        :mod:`kiln.compiler.core.digest`)."""
        spec_text = json.dumps(self.spec.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(kir.model_bytes(self.model) + spec_text.encode()).hexdigest()

    def _protect(self) -> tuple[Path, ...]:
        return (Path(self.source),) if Path(self.source).exists() else ()

    def save(self, outdir: str | os.PathLike, *, target: str | dict | None = None,
             progress: Callable[[str], Any] | None = None, tune_trials: int | None = None,
             tuning_db: str | os.PathLike | None = None) -> Path:
        """Write model.onnx (and, with a target, model.so + manifest.json) and report.json
        into ``outdir``, all or nothing (see :mod:`.outdir`); returns ``outdir``.
        ``self.written`` lists the files written."""
        with OutputFolder(outdir, protect=self._protect()) as folder:
            self.write_into(folder, target=target, progress=progress,
                            tune_trials=tune_trials, tuning_db=tuning_db)
            folder.commit()
        self.written = list(folder.written)
        return Path(outdir)

    def write_into(self, folder: OutputFolder, *, target: str | dict | None = None,
                   progress: Callable[[str], Any] | None = None,
                   tune_trials: int | None = None,
                   tuning_db: str | os.PathLike | None = None) -> None:
        """Write every output into ``folder.staging`` (the commit is the caller's)."""
        from kiln.backends.onnx import save_model
        from kiln.compiler.core.atomic import write_atomic, write_error

        assert folder.staging is not None, "write_into needs an entered OutputFolder"
        out = folder.staging
        names: list[str] = []

        def write(name: str, data: bytes) -> None:
            try:
                write_atomic(out / name, data)
            except OSError as error:
                raise write_error(folder.shown / name, error) from error
            names.append(name)

        if self.spec.output.onnx:
            try:
                self.report.onnx_bytes = save_model(self.model, out / "model.onnx",
                                                    producer_version=kiln_version(),
                                                    shown=folder.shown / "model.onnx")
            except OSError as error:
                raise write_error(folder.shown / "model.onnx", error) from error
            names.append("model.onnx")
        interrupt.checkpoint("write")
        target = target if target is not None else self.target
        if target is not None and self.spec.output.tvm:
            trials = self.spec.tune.trials if tune_trials is None else tune_trials
            db = tuning_db if tuning_db is not None else self.spec.tune.db
            self.report.compiled = _build_and_check(self, target, out, progress, trials,
                                                    Path(db) if db else None)
            if self.spec.output.measure:  # kiln compile --measure (driver.measure)
                self.report.measure = measure_build(self, target, out, progress, self.spec.output.measure)
        digests = {name: file_sha256(out / name) for name in os.listdir(out)
                   if not name.startswith(".")}
        self.report.model_hash = model_hash(digests)
        if "json" in self.spec.output.report:
            write("report.json", self.report.to_json().encode())
        if "html" in self.spec.output.report:
            write("report.html", self.report.to_html().encode())
        if self.report.compiled is not None:
            from kiln.backends.tvm.manifest import read_manifest, write_manifest

            manifest = read_manifest(out).with_files(out, names,
                                                     model_hash=self.report.model_hash)
            try:
                write_manifest(out, manifest)
            except OSError as error:
                raise write_error(folder.shown / "manifest.json", error) from error


def _budget_failure(metrics: ErrorMetrics, budget: Budget | None) -> str | None:
    if budget is None:
        return None
    if budget.sqnr_db is not None and metrics.sqnr_db < budget.sqnr_db:
        return f"SQNR {metrics.sqnr_db:.1f} dB is below the budget of {budget.sqnr_db} dB"
    if budget.max_abs_err is not None and metrics.max_abs_err > budget.max_abs_err:
        return (f"max abs error {metrics.max_abs_err:.3g} is over the budget of "
                f"{budget.max_abs_err}")
    return None


def _pass_failure(vs_prev: ErrorMetrics, vs_source: ErrorMetrics, budget: Budget | None,
                  end_to_end: Budget | None) -> str | None:
    """Why a lossy pass's result breaks its own budget or the spec's end-to-end one."""
    failure = _budget_failure(vs_prev, budget)
    if failure is None:
        whole = _budget_failure(vs_source, end_to_end)
        failure = f"end to end, {whole}" if whole else None
    return failure


def _load(source, spec: Spec, input_shapes) -> ir.Model:
    """Load the model; a spec `inputs:` key naming no input points at its spec line."""
    try:
        return symbolic.load_with_symbols(source, _merged_shapes(spec, input_shapes),
                                          loader=load_model)
    except FrontendError as error:
        key = getattr(error, "input_key", None)
        if key is not None and spec.inputs and key in spec.inputs and \
                key not in (input_shapes or {}):
            raise spec.error(("inputs", key), str(error)) from None
        raise


def _calibration_context(model: ir.Model, spec: Spec, steps: Sequence[PassStep],
                         sets: SampleSets | None = None,
                         progress: Callable[[str], Any] | None = None,
                         ) -> CalibrationContext | None:
    """Calibration samples (count from ``calibration.samples``; held out from verification's,
    see :mod:`.samples`) for passes that need them."""
    if not any(step.pass_class.needs_calibration for step in steps):
        return None
    from kiln.backends.ort import collect_activations

    sets = sets or sample_sets(model, spec, calibrate=True)
    samples = sets.calibration
    def counted(done: int, total: int) -> None:
        if progress is not None:
            progress(f"calibration ({done}/{total})")

    return CalibrationContext(samples,
                              lambda m, names: collect_activations(m, names, samples,
                                                                   progress=counted),
                              source=sets.source)


def _run_pass(instance: KilnPass, model: ir.Model, name: str, ran: Sequence[str]):
    try:
        return instance(model)
    except KilnError:
        raise
    except Exception as error:
        logger.debug("pass %s failed", name, exc_info=True)
        raise PassError(f"{type(error).__name__}: {error}", pass_name=name,
                        ran_before=ran) from error


class _Runner:
    """Runs a model on the verification samples with ONNX Runtime."""

    def __init__(self, samples: list[Feeds], *, label: str,
                 progress: Callable[[str], Any] | None = None) -> None:
        self.samples = samples
        self.label = label
        self.progress = progress

    def __call__(self, model: ir.Model, stage: str = "") -> list[list]:
        from kiln.backends.ort import ReferenceRunner

        if not self.samples:
            return []
        runner = ReferenceRunner(model, label=f"{self.label}{stage}")
        outputs = []
        for done, feeds in enumerate(self.samples, 1):
            outputs.append(runner.run(feeds))
            if self.progress is not None:  # a determinate bar on a terminal
                self.progress(f"verify{stage} ({done}/{len(self.samples)})")
        return outputs


def spec_label(spec: Spec) -> str:
    """How reports name a spec: its own ``name`` (else its file) and what it extends,
    e.g. ``my.yaml (extends int8)``. A name inherited through ``extends`` is not its own."""
    file, _ = spec.locate(("name",))
    own = spec.name if spec.name and (file is None or file == spec.source) else None
    label = own or spec.source or "<spec>"
    return f"{label} (extends {spec.extends})" if spec.extends else label


def _new_report(source, spec: Spec) -> CompileReport:
    return CompileReport(model=str(source), spec=spec_label(spec), kiln_version=kiln_version())


def compile_model(source: str | os.PathLike, spec: Spec | str | None = None, *,
                  input_shapes: Mapping[str, Sequence[int]] | None = None,
                  target: str | dict | None = None,
                  progress: Callable[[str], Any] | None = None) -> CompileResult:
    """Load ``source``, run the spec's passes with verification after each, and return
    the result (call ``.save(outdir)`` to write it)."""
    if isinstance(spec, str):
        spec = load_spec(spec)
    spec = spec or default_spec()
    return _compile(source, spec, _new_report(source, spec), input_shapes=input_shapes,
                    target=target, progress=progress)


def compile_to_folder(source: str | os.PathLike, spec: Spec | str | None, outdir: str | os.PathLike,
                      *, input_shapes: Mapping[str, Sequence[int]] | None = None,
                      target: str | dict | None = None,
                      progress: Callable[[str], Any] | None = None,
                      tune_trials: int | None = None,
                      tuning_db: str | os.PathLike | None = None,
                      after_write: Callable[[Path], Any] | None = None) -> CompileResult:
    """``compile_model`` + ``save`` holding OUTDIR's lock from start to end (a second run
    into the same folder refuses at once); ``after_write(staging)`` may add files before
    the commit (the CLI's ``inputs.json``). A compile that fails with a KilnError (not a
    write fault, not an interrupt) writes a ``status: failed`` report
    (:meth:`OutputFolder.write_failed_report`); the error's ``failed_report`` names it."""
    if isinstance(spec, str):
        spec = load_spec(spec)
    spec = spec or default_spec()
    protect = (Path(source),) if Path(source).exists() else ()
    with OutputFolder(outdir, protect=protect) as folder:
        report = _new_report(source, spec)
        try:
            result = _compile(source, spec, report, input_shapes=input_shapes, target=target,
                              progress=progress)
            result.write_into(folder, target=target, progress=progress,
                              tune_trials=tune_trials, tuning_db=tuning_db)
            if after_write is not None:
                after_write(folder.staging)
            interrupt.checkpoint("commit")
            folder.commit()
        except MemoryError as error:  # a fault: no failed report, OUTDIR as it was
            raise KilnError(str(error) or "out of memory (--debug shows where)") from error
        except KilnError as error:
            if isinstance(error, OutputError) or interrupt.received() is not None:
                raise
            report.fail(error)
            try:
                error.failed_report = folder.write_failed_report(  # type: ignore[attr-defined]
                    report.to_json().encode())
            except OutputError as unwritable:  # the compile's own error is the one to show
                logger.warning("the failed compile's report was not written: %s", unwritable)
            raise
    result.written = list(folder.written)
    return result


def _compile(source: str | os.PathLike, spec: Spec, report: CompileReport, *,
             input_shapes: Mapping[str, Sequence[int]] | None,
             target: str | dict | None,
             progress: Callable[[str], Any] | None) -> CompileResult:
    """``compile_model``, filling ``report`` as it goes (a failure leaves what ran)."""
    steps = build_steps(spec)
    say = progress or (lambda _text: None)
    started = time.perf_counter()
    say("loading model")
    interrupt.checkpoint("load")
    model = _load(source, spec, input_shapes)
    report.params_source = kir.count_params(model)
    report.bytes_source = kir.count_weight_bytes(model)
    sets = sample_sets(model, spec, calibrate=any(s.pass_class.needs_calibration for s in steps))
    samples = sets.verification if spec.verify.enabled else []
    calibration = _calibration_context(model, spec, steps, sets, progress=progress)
    report.calibration = sets
    run = _Runner(samples, label=str(source), progress=progress)
    output_names = [v.name for v in model.graph.outputs]
    say("reference run")
    interrupt.checkpoint("verify")
    source_outputs = reference_outputs(run, model)
    report.verify_samples = len(samples)
    report.load_seconds = time.perf_counter() - started
    previous = source_outputs
    ran: list[str] = []
    kept_vs_source: tuple[float | None, float | None] = (math.inf, 0.0)  # the model we keep
    for step in steps:
        say(f"pass {step.name}")
        interrupt.checkpoint("pass")
        t0 = time.perf_counter()
        entry = step.entry
        selected = _selection(model, step, spec)
        skip_allowed = spec.verify.on_budget_exceeded == "skip_pass"
        snapshot = _clone(model) if skip_allowed and not step.pass_class.exact else None
        trial = sensitivity.PassTrial(model, step.pass_class, step.config, selected, calibration) \
            if spec.verify.on_budget_exceeded == "fallback" and not step.pass_class.exact else None
        p = PassReport(name=step.name, exact=step.pass_class.exact,
                       params_before=kir.count_params(model),
                       bytes_before=kir.count_weight_bytes(model))
        instance = step.pass_class(step.config, selected=selected,
                                   calibration=calibration if step.pass_class.needs_calibration
                                   else None)
        probe = layer_errors.probe(model, samples) if samples and not step.pass_class.exact else None
        result = _run_pass(instance, model, step.name, ran)
        model = result.model
        p.matched = sum(1 for c in instance.last_candidates if c.accepted)
        p.refused = sum(1 for c in instance.last_candidates if not c.accepted)
        p.modified = bool(result.modified)
        p.params_after = kir.count_params(model)
        p.bytes_after = kir.count_weight_bytes(model)
        p.note = instance.note
        after_pass(step.name, instance, p, spec, calibration, sets, ran)
        if samples and p.modified:
            outputs = run(model, f" after pass {step.name!r}")
            vs_prev = compare(previous, outputs, output_names, rtol=spec.verify.rtol,
                              atol=spec.verify.atol)
            vs_source = compare(source_outputs, outputs, output_names, rtol=spec.verify.rtol,
                                atol=spec.verify.atol)
            p.sqnr_db, p.max_abs_err = vs_prev.sqnr_db, vs_prev.max_abs_err
            p.sqnr_db_vs_source = vs_source.sqnr_db
            p.max_abs_err_vs_source = vs_source.max_abs_err
            p.worst_output = vs_prev.worst_output
            if step.pass_class.exact and not vs_prev.within_tolerance:
                raise VerificationError(
                    f"exact pass {step.name!r} changed the outputs beyond float32 tolerance: "
                    f"{vs_prev.describe()}", pass_name=step.name, output=vs_prev.worst_output,
                    sqnr_db=vs_prev.sqnr_db, max_abs_err=vs_prev.max_abs_err)
            failure = _pass_failure(vs_prev, vs_source, entry.budget, spec.verify.budget)
            if failure is not None and trial is not None:  # keep sensitive layers in float
                def judge(outs, before=previous, budget=entry.budget):
                    a, b = (compare(ref, outs, output_names, rtol=spec.verify.rtol,
                                    atol=spec.verify.atol) for ref in (before, source_outputs))
                    return _pass_failure(a, b, budget, spec.verify.budget), a, b
                kept = sensitivity.fall_back(trial, run, previous, output_names, judge,
                                             progress=say)
                if kept is not None:
                    model, outputs, vs_prev, vs_source = (kept.model, kept.outputs, kept.vs_prev,
                                                          kept.vs_source)
                    p.matched, p.kept_float = kept.rewritten, kept.kept_float_dicts()
                    p.note = "; ".join(filter(None, [p.note, kept.note()]))
                    logger.warning("pass %s: %s", step.name, kept.note())
                    p.params_after = kir.count_params(model)
                    p.bytes_after = kir.count_weight_bytes(model)
                    p.sqnr_db, p.max_abs_err = vs_prev.sqnr_db, vs_prev.max_abs_err
                    p.sqnr_db_vs_source = vs_source.sqnr_db
                    p.max_abs_err_vs_source = vs_source.max_abs_err
                    p.worst_output = vs_prev.worst_output
                    failure = None
            if failure is not None:
                if snapshot is not None:
                    model = snapshot
                    p.skipped = True
                    p.note = f"undone: {failure}" + (f" ({p.note})" if p.note else "")
                    p.params_after, p.bytes_after = p.params_before, p.bytes_before
                    p.sqnr_db_vs_source, p.max_abs_err_vs_source = kept_vs_source
                    logger.warning("pass %s undone: %s", step.name, failure)
                    outputs = previous
                else:
                    raise VerificationError(
                        f"pass {step.name!r}: {failure} (output {vs_prev.worst_output!r})",
                        pass_name=step.name, output=vs_prev.worst_output,
                        sqnr_db=vs_prev.sqnr_db, max_abs_err=vs_prev.max_abs_err)
            p.outputs_sqnr_db = dict(vs_prev.per_output)
            p.layers = probe.after(model) if probe is not None and not p.skipped else []
            previous = outputs
            kept_vs_source = (p.sqnr_db_vs_source, p.max_abs_err_vs_source)
        elif p.modified:
            p.sqnr_db = p.sqnr_db_vs_source = None
            p.max_abs_err = p.max_abs_err_vs_source = None
            p.note = "; ".join(filter(None, [p.note, "not verified (verify.enabled: false)"]))
            kept_vs_source = (None, None)
        else:
            p.sqnr_db_vs_source, p.max_abs_err_vs_source = kept_vs_source
        p.seconds = time.perf_counter() - t0
        report.passes.append(p)
        ran.append(step.name)
    return CompileResult(model=model, report=report, spec=spec, source=os.fspath(source),
                         samples=samples, reference_outputs=previous, target=target
                         if target is not None else spec.target)


def plan_model(source: str | os.PathLike, spec: Spec | str, *,
               input_shapes: Mapping[str, Sequence[int]] | None = None,
               sensitivity_of_layers: bool = False,
               progress: Callable[[str], Any] | None = None) -> list[PlanEntry]:
    """What each pass would touch, and why candidates were refused, changing nothing on disk.

    Passes are applied in order to an in-memory copy so that each sees the model
    the earlier passes leave (no verification). With ``sensitivity_of_layers``, each lossy
    pass's layers are ranked by the output SQNR of rewriting each alone
    (:mod:`.sensitivity`, on the verification samples).
    """
    if isinstance(spec, str):
        spec = load_spec(spec)
    steps = build_steps(spec)
    model = _load(source, spec, input_shapes)
    sets = sample_sets(model, spec, calibrate=any(s.pass_class.needs_calibration for s in steps))
    calibration = _calibration_context(model, spec, steps, sets)
    plan = []
    for step in steps:
        selected = _selection(model, step, spec)
        count = sum(1 for node in kir.nodes(model) if selected is None or selected(node))
        ranking = None
        if sensitivity_of_layers and not step.pass_class.exact and sets.verification:
            run = sensitivity.ort_runner(sets.verification)
            trial = sensitivity.PassTrial(model, step.pass_class, step.config, selected,
                                          calibration)
            ranking = sensitivity.layer_sensitivity(
                trial, run, run(model), [v.name for v in model.graph.outputs],
                rtol=spec.verify.rtol, atol=spec.verify.atol, progress=progress)
        instance = step.pass_class(step.config, selected=selected, calibration=calibration
                                   if step.pass_class.needs_calibration else None)
        _run_pass(instance, model, step.name, [e.name for e in plan])
        plan.append(PlanEntry(step.name, describe(step.entry.select), count,
                              list(instance.last_candidates), ranking))
    return plan
