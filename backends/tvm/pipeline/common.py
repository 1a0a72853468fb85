"""Pass lists every target family's build shares, and the helpers that join phases."""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax

from kiln.backends.tvm.importer.nms_loop import greedy_legalize_map
from kiln.backends.tvm.keep_compressed import fold_constants_keeping_compressed
from kiln.backends.tvm.pipeline.symbolic_shapes import (
    fold_static_shape_takes,
    symbolic_legalize_map,
)
from kiln.backends.tvm.tuning.database import apply_tuning_records

PassList = list[tvm.transform.Pass]


def library_dispatch_passes(target: tvm.target.Target) -> PassList:
    """Sampling and sort/scan ops dispatched to TVM's library kernels."""
    return [relax.backend.DispatchSampling(), relax.backend.DispatchSortScan()]


def fusion_passes(target: tvm.target.Target, legalize_map: dict | None = None) -> PassList:
    """High-level ops to TensorIR (``legalize_map`` overrides TVM's legalizations),
    constants folded with compressed weights kept compressed, operators fused (over a
    symbolic dim too: :mod:`.symbolic_shapes`)."""
    return [
        fold_static_shape_takes(),
        relax.transform.LegalizeOps({**symbolic_legalize_map(), **greedy_legalize_map(),
                                     **(legalize_map or {})}),
        relax.transform.AnnotateTIROpPattern(),
        fold_constants_keeping_compressed(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


def tuning_record_passes(database) -> PassList:
    """The kernels with a record in ``database`` (a MetaSchedule database, or None)
    scheduled by it; first in every family's schedule phase."""
    return [apply_tuning_records(database)] if database is not None else []


def observe(callback: Callable[[tvm.IRModule], None], name: str) -> tvm.transform.Pass:
    """A pass that hands the module to ``callback`` and changes nothing (build reports)."""

    @tvm.transform.module_pass(opt_level=0, name=f"kiln.Observe.{name}")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        callback(mod)
        return mod

    return _pass


def join_phases(target: tvm.target.Target, name: str, legalize: PassList, schedule: PassList,
                finalize: PassList,
                on_scheduled: Callable[[tvm.IRModule], None] | None = None) -> tvm.transform.Pass:
    """One module pass running the phases in order under ``target`` (for ``tvm.compile``'s
    ``relax_pipeline``); ``on_scheduled`` sees the module after the schedule phase."""
    observed = [observe(on_scheduled, "scheduled")] if on_scheduled is not None else []
    passes = [*legalize, *schedule, *observed, *finalize]

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline
