"""The Relax pipeline phases for CPU builds, with kiln's schedule phase."""

from __future__ import annotations

import tvm
from tvm import relax, tirx

SCHEDULED_ATTR = "tir.is_scheduled"


def cpu_schedule_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    return []


def cpu_build_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    phases = [
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        *cpu_schedule_passes(target),
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory(),
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]
    return tvm.transform.Sequential(phases, name="kiln_cpu_build")


def unscheduled_kernels(mod: tvm.IRModule) -> list[str]:
    names = []
    for gvar, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc) and not (func.attrs and func.attrs.get(SCHEDULED_ATTR)):
            names.append(gvar.name_hint)
    return sorted(names)
