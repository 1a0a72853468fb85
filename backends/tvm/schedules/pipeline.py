"""The Relax pipeline for CPU builds, with kiln's schedule phase between fusion and lowering.

TVM 0.27's ``tvm.compile(mod, target)`` runs ``relax.get_pipeline("default")``: it
legalizes ops into PrimFuncs but neither fuses nor schedules them (every kernel is a
naive loop nest).  kiln's CPU build instead runs::

    library dispatch      DispatchSampling, DispatchSortScan
    legalize + fuse       LegalizeOps (fast_math: vectorizable erf/gelu/exp/softmax), AnnotateTIROpPattern, FoldConstant, FuseOps, FuseTIR
    schedule (kiln)       cpu_schedule_passes(target):
                            ScheduleCPUKernels   a rule per PrimFunc (dense, conv, ...)
                            SplitLayoutRewritePreproc, FoldWeightPrepack
                                                 weight packing moved to compile time
    dataflow lowering     RewriteDataflowReshape, ToNonDataflow, RemovePurityChecking, CallTIRRewrite
    finalize              StaticPlanBlockMemory, LowerAllocTensor, KillAfterLastUse,
                          LowerRuntimeBuiltin, ComputePrimValue, VMShapeLower, AttachGlobalSymbol

Use it as ``tvm.compile(mod, target, relax_pipeline=cpu_build_pipeline(target))``
(inside ``with target:`` is not needed; the pipeline enters it).  Builds that keep
their own pipeline insert ``cpu_schedule_passes(target)`` right after ``FuseTIR``.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable

import tvm
from tvm import relax, s_tir, tirx
from tvm.target.codegen import llvm_get_vector_width, target_has_features

from kiln.backends.tvm.schedules.analysis import RuleContext
from kiln.backends.tvm.schedules.prepack import fold_weight_prepack

log = logging.getLogger(__name__)

SCHEDULED_ATTR = "tirx.is_scheduled"
RULE_ATTR = "kiln.schedule_rule"

Rule = Callable[[tirx.PrimFunc, RuleContext], "s_tir.Schedule | None"]


#: The CPU rules, most specific first: (name, "module:function"). Each function takes
#: ``(PrimFunc, RuleContext)`` and returns a Schedule, or None when the kernel is not its
#: kind. A new rule module registers itself with one line here (imported lazily).
#: Rules named in IN_PLACE_RULES also take ``(Schedule, RuleContext)`` and schedule that
#: Schedule in place: MetaSchedule tunes their choice points (``tuning.py``).
RULES: tuple[tuple[str, str], ...] = (
    ("decode_conv", "kiln.backends.tvm.schedules.quant_conv:schedule_decode_conv"),
    ("decode_contraction", "kiln.backends.tvm.schedules.quant_gemv:schedule_decode_contraction"),
    ("contraction", "kiln.backends.tvm.schedules.dense:schedule_contraction"),
    ("elementwise", "kiln.backends.tvm.schedules.elementwise:schedule_elementwise"),
    ("window", "kiln.backends.tvm.schedules.window:schedule_window_reduction"),
    ("reduction", "kiln.backends.tvm.schedules.elementwise:schedule_reduction"),
    ("fallback", "kiln.backends.tvm.schedules.elementwise:schedule_fallback"),
)


IN_PLACE_RULES = frozenset({"contraction", "window"})


def _rules() -> tuple[tuple[str, Rule], ...]:
    """The registered rules, imported."""
    loaded = []
    for name, where in RULES:
        module, _, attr = where.partition(":")
        loaded.append((name, getattr(importlib.import_module(module), attr)))
    return tuple(loaded)


def _const_params(mod: tvm.IRModule) -> dict[str, frozenset[int]]:
    """Per PrimFunc name: the param positions bound to a relax.Constant at every call_tir."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    seen: dict[str, list[set[int]]] = {}
    for _, func in mod.functions.items():
        if not isinstance(func, relax.Function):
            continue
        body = func.body
        blocks = body.blocks if isinstance(body, relax.SeqExpr) else []
        for block in blocks:
            for binding in block.bindings:
                value = binding.value
                if not (isinstance(value, relax.Call) and value.op.same_as(call_tir)):
                    continue
                gvar = value.args[0]
                args = value.args[1]
                fields = args.fields if isinstance(args, relax.Tuple) else [args]
                consts = {n for n, arg in enumerate(fields) if isinstance(arg, tvm.ir.GenericConst)}
                seen.setdefault(gvar.name_hint, []).append(consts)
    return {name: frozenset(set.intersection(*sets)) for name, sets in seen.items()}


def _vector_lanes_f32(target: tvm.target.Target) -> int:
    """fp32 lanes of the target's widest vector ISA (LLVM's own vector width query
    reports the host's, whatever the target's mcpu)."""
    try:
        if target.kind.name == "llvm":
            if target_has_features("avx512f", target):
                return 16
            if target_has_features("avx2", target) or target_has_features("avx", target):
                return 8
            return 4
        bits = int(llvm_get_vector_width(target))
    except Exception:  # noqa: BLE001 - non-LLVM targets
        bits = 128
    return max(bits // 32, 4)


def rule_context(target: tvm.target.Target, const_params: frozenset[int] = frozenset(),
                 **tuning) -> RuleContext:
    """The RuleContext of a kernel (``tuning``: RuleContext's ``tunable``/``plan``)."""
    cores = int(target.attrs.get("num-cores", 0) or 0) if target.attrs else 0
    return RuleContext(target=target, vector_lanes_f32=_vector_lanes_f32(target),
                       num_cores=cores, const_params=const_params, **tuning)


def schedule_primfunc(func: tirx.PrimFunc, ctx: RuleContext) -> tuple[tirx.PrimFunc, str] | None:
    """Apply the first CPU rule that accepts ``func``; None when none does."""
    for name, rule in _rules():
        try:
            sch = rule(func, ctx)
        except Exception as err:  # noqa: BLE001 - a rule that fails leaves the kernel to the next
            log.debug("rule %s failed: %s", name, err, exc_info=log.isEnabledFor(logging.DEBUG))
            continue
        if sch is not None:
            scheduled = sch.mod["main"].with_attr(SCHEDULED_ATTR, True).with_attr(RULE_ATTR, name)
            return scheduled, name
    return None


def schedule_in_place(sch: s_tir.Schedule, ctx: RuleContext, rule: str) -> bool:
    """Schedule ``sch`` (a MetaSchedule design space) in place with the rule named
    ``rule`` (one of IN_PLACE_RULES, the one ``schedule_primfunc`` picks for its PrimFunc)."""
    if rule not in IN_PLACE_RULES:
        raise ValueError(f"rule {rule!r} cannot schedule in place (IN_PLACE_RULES: "
                         f"{sorted(IN_PLACE_RULES)})")
    return dict(_rules())[rule](sch, ctx) is not None


@tvm.transform.module_pass(opt_level=0, name="kiln.ScheduleCPUKernels")
class ScheduleCPUKernels:
    """Give every unscheduled PrimFunc of the module a kiln CPU schedule."""

    def __init__(self, target: tvm.target.Target) -> None:
        self.target = target

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        consts = _const_params(mod)
        updates = {}
        start = time.perf_counter()
        counts: dict[str, int] = {}
        for gvar, func in mod.functions.items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            if func.attrs is not None and func.attrs.get(SCHEDULED_ATTR):
                continue
            ctx = rule_context(self.target, consts.get(gvar.name_hint, frozenset()))
            result = schedule_primfunc(func, ctx)
            if result is None:
                log.info("no kiln rule for %s", gvar.name_hint)
                continue
            updates[gvar], rule = result
            counts[rule] = counts.get(rule, 0) + 1
        for gvar, func in updates.items():
            mod[gvar] = func
        log.info("kiln schedules: %s in %.2f s", counts, time.perf_counter() - start)
        return mod


def cpu_schedule_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    """The schedule phase: run after FuseTIR, before the dataflow lowering passes."""
    return [
        ScheduleCPUKernels(target),
        relax.transform.SplitLayoutRewritePreproc(),
        fold_weight_prepack(),
    ]


def cpu_build_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """The full Relax pipeline for ``tvm.compile(mod, target, relax_pipeline=...)`` on CPU."""
    from kiln.backends.tvm.schedules.fast_math import cpu_legalize_map

    phases = [
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        relax.transform.LegalizeOps(cpu_legalize_map()),
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
    sequence = tvm.transform.Sequential(phases, name="kiln_cpu_build")

    @tvm.transform.module_pass(opt_level=0, name="kiln.CPUBuild")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            return sequence(mod)

    return _pipeline


FALLBACK_RULE = "fallback"


def unscheduled_kernels(mod: tvm.IRModule, *, include_fallback: bool = True) -> list[str]:
    """Names of the PrimFuncs no schedule rule (kiln's or a tuning record) has handled.

    With ``include_fallback`` (the default) kernels that only got the fallback rule
    (outer loops made parallel, nothing else) are named too: they run near TVM's default.
    """
    names = []
    for gvar, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        attrs = func.attrs or {}
        if not attrs.get(SCHEDULED_ATTR):
            names.append(gvar.name_hint)
        elif include_fallback and str(attrs.get(RULE_ATTR, "")) == FALLBACK_RULE:
            names.append(gvar.name_hint)
    return sorted(names)


def schedule_rules_used(mod: tvm.IRModule) -> dict[str, str]:
    """PrimFunc name -> the kiln rule that scheduled it (for reports)."""
    used = {}
    for gvar, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc) and func.attrs and func.attrs.get(RULE_ATTR):
            used[gvar.name_hint] = str(func.attrs[RULE_ATTR])
    return used
