"""The Relax build pipeline, as phases of plain pass lists per target family.

    legalize  CPU: convolutions rewritten channels-last (NHWC, :mod:`.layout`);
              high-level ops -> TensorIR (CPU: erf/GELU/exp legalized to
              vectorizable polynomials, :mod:`.schedules.fast_math`), constant folding (compressed weights
              kept compressed), operator fusion; for CUDA also the weight decode
              fused into the matmul/conv that reads it (:mod:`.fuse_decode`)
    schedule  tuning records first (a MetaSchedule database, :mod:`.tuning`), then
              TensorIR rules for the rest: dlight's GPU rules for CUDA; kiln's CPU
              rules (``kiln.backends.tvm.schedules.cpu_schedule_passes``) for CPUs
    finalize  dataflow lowering, memory planning, VM lowering

Each family maps to one function per phase in :data:`FAMILIES`; there is no
``if cuda:`` inside a phase. :func:`relax_pipeline` joins the phases into the
one pass that ``tvm.compile`` runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import tvm
from tvm import relax

from .fuse_decode import CPU_CONSUMERS, fuse_decode_into_contraction
from .keep_compressed import fold_constants_keeping_compressed
from .targets import ResolvedTarget

logger = logging.getLogger(__name__)

PassList = list[tvm.transform.Pass]


@dataclass(frozen=True)
class Phases:
    """The three pass lists of one build, in order."""

    legalize: PassList
    schedule: PassList
    finalize: PassList

    def all(self) -> PassList:
        return self.legalize + self.schedule + self.finalize


def _legalize(target: tvm.target.Target, *, fuse_decode: bool,
              legalize_map: dict | None = None, layout: PassList = ()) -> PassList:
    passes = [
        *layout,
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        relax.transform.LegalizeOps(legalize_map),
        relax.transform.AnnotateTIROpPattern(),
        fold_constants_keeping_compressed(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]
    return passes + [fuse_decode_into_contraction()] if fuse_decode else passes


def _legalize_cpu(target: tvm.target.Target) -> PassList:
    # Weight decode fuses into matmul/dense/conv: kiln's decode_contraction and
    # decode_conv rules (schedules/quant_gemv.py, quant_conv.py) decode inside the kernel.
    # Convolutions run channels-last (NHWC, OHWI weights; :mod:`.layout`).
    from .layout import channels_last_convs, fold_constant_transposes
    from .schedules.fast_math import cpu_legalize_map

    # Inference batch norm decomposed into elementwise ops, which fuse into the conv
    # before them (the batch_norm kernel does not: its tuple output stops fusion).
    return _legalize(target, fuse_decode=False, legalize_map=cpu_legalize_map(),
                     layout=[channels_last_convs(), relax.transform.DecomposeOpsForInference(),
                             fold_constant_transposes()]) + [
        fuse_decode_into_contraction(CPU_CONSUMERS)]


def _legalize_cuda(target: tvm.target.Target) -> PassList:
    # dlight's GEMV/Matmul rules schedule a decode prologue inside the contraction.
    return _legalize(target, fuse_decode=True)


def cpu_schedule_passes_or_default(target: tvm.target.Target) -> PassList:
    """kiln's CPU schedule rules when that module is present, else none (TVM's default).

    ``kiln.backends.tvm.schedules`` is written alongside this module; until it
    provides ``cpu_schedule_passes(target)`` the kernels stay unscheduled.
    """
    try:
        from .schedules import cpu_schedule_passes
    except ImportError:
        logger.debug("kiln CPU schedule rules not available; kernels use TVM's default")
        return []
    return list(cpu_schedule_passes(target))


def _gpu_schedule(target: tvm.target.Target) -> PassList:
    from tvm.s_tir import dlight

    return [
        dlight.ApplyDefaultSchedule(
            dlight.gpu.Matmul(),
            dlight.gpu.GEMV(),
            dlight.gpu.Reduction(),
            dlight.gpu.GeneralReduction(),
            dlight.gpu.Fallback(),
        )
    ]


def _finalize_cpu(target: tvm.target.Target) -> PassList:
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    return cpu_generic.dataflow_lower_passes(target) + cpu_generic.finalize_passes(target)


def _finalize_cuda(target: tvm.target.Target) -> PassList:
    from tvm.relax.backend.cuda import pipeline as cuda

    return cuda.dataflow_lower_passes(target) + cuda.finalize_passes(target)


@dataclass(frozen=True)
class Family:
    """One target family's phase builders."""

    legalize: Callable[[tvm.target.Target], PassList]
    schedule: Callable[[tvm.target.Target], PassList]
    finalize: Callable[[tvm.target.Target], PassList]


FAMILIES: dict[str, Family] = {
    "cpu": Family(_legalize_cpu, cpu_schedule_passes_or_default, _finalize_cpu),
    "cuda": Family(_legalize_cuda, _gpu_schedule, _finalize_cuda),
}


def schedule_phase(target: ResolvedTarget, database=None) -> PassList:
    """The schedule phase for ``target``: records from ``database`` (a MetaSchedule
    database or None), then the family's rules for the kernels left."""
    from .tuning import apply_tuning_records

    tuned = [apply_tuning_records(database)] if database is not None else []
    return tuned + FAMILIES[target.family].schedule(target.tvm_target())


def observe(callback: Callable[[tvm.IRModule], None], name: str) -> tvm.transform.Pass:
    """A pass that hands the module to ``callback`` and changes nothing (build reports)."""

    @tvm.transform.module_pass(opt_level=0, name=f"kiln.Observe.{name}")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        callback(mod)
        return mod

    return _pass


def build_phases(target: ResolvedTarget, database=None,
                 on_scheduled: Callable[[tvm.IRModule], None] | None = None) -> Phases:
    """All three phases for ``target``; ``on_scheduled`` sees the module after scheduling."""
    tvm_target = target.tvm_target()
    family = FAMILIES[target.family]
    schedule = schedule_phase(target, database)
    if on_scheduled is not None:
        schedule = [*schedule, observe(on_scheduled, "scheduled")]
    return Phases(family.legalize(tvm_target), schedule, family.finalize(tvm_target))


def relax_pipeline(target: ResolvedTarget, database=None,
                   on_scheduled: Callable[[tvm.IRModule], None] | None = None
                   ) -> tvm.transform.Pass:
    """One module pass running every phase under ``target`` (for ``tvm.compile``).

    ``database``: tuning records applied before the schedule rules (see :mod:`.tuning`).
    """
    phases = build_phases(target, database, on_scheduled)
    tvm_target = target.tvm_target()

    @tvm.transform.module_pass(opt_level=0, name=f"kiln_{target.family}_pipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with tvm_target:
            return tvm.transform.Sequential(phases.all())(mod)

    return _pipeline
