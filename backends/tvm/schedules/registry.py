"""kiln's CPU schedule rules in order, and the schedule-phase passes that apply them.

``RULES`` is the one ordered list, most specific first: each kernel gets the first rule
whose ``apply`` returns a Schedule (a rule that raises leaves the kernel to the next,
logged at DEBUG). A new rule is a :class:`~.rule.KilnRule` subclass and one line here.
``ScheduleCPUKernels`` is kiln's ``dlight.ApplyDefaultSchedule``: it also tells each
rule which params are constants (``rule.CONST_PARAMS_ATTR``, from the Relax calls) and
tags what it scheduled with the rule's name (``RULE_ATTR``, for build reports).

The CPU build (``kiln.backends.tvm.pipeline.cpu``) runs ``cpu_schedule_passes(target)``
after its tuning records, between fusion and the dataflow lowering.
"""

from __future__ import annotations

import logging
import time

import tvm
from tvm import relax, s_tir, tirx

from kiln.backends.tvm.load_time import is_load_time_param, move_prepack_to_load_time
from kiln.backends.tvm.schedules.dense import Contraction
from kiln.backends.tvm.schedules.elementwise import Elementwise, Fallback, Reduction
from kiln.backends.tvm.schedules.grouped_gemm import GroupedGemm, MoeSort
from kiln.backends.tvm.schedules.int8_dense import Int8Dense
from kiln.backends.tvm.schedules.int8_window import Int8Pool, Int8Window
from kiln.backends.tvm.schedules.ir_builder import IRBuilderKernels
from kiln.backends.tvm.schedules.prepack import PREPACK_SUFFIX, fold_weight_prepack
from kiln.backends.tvm.schedules.quant_conv import DecodeConv
from kiln.backends.tvm.schedules.quant_gemv import DecodeContraction
from kiln.backends.tvm.schedules.reduce import InnerReduction
from kiln.backends.tvm.schedules.row_tables import RowTables
from kiln.backends.tvm.schedules.rule import KilnRule, with_const_params
from kiln.backends.tvm.schedules.sparse_dense import SparseDense
from kiln.backends.tvm.schedules.split_preproc import split_layout_rewrite_preproc
from kiln.backends.tvm.schedules.symbolic import SymbolicContraction
from kiln.backends.tvm.schedules.whole_reduction import WholeReduction
from kiln.backends.tvm.schedules.window import Window

log = logging.getLogger(__name__)

SCHEDULED_ATTR = "tirx.is_scheduled"
RULE_ATTR = "kiln.schedule_rule"

#: The CPU rules, most specific first.
RULES: tuple[KilnRule, ...] = (
    Int8Dense(),
    Int8Window(),
    Int8Pool(),
    SparseDense(),
    GroupedGemm(),
    MoeSort(),
    DecodeConv(),
    DecodeContraction(),
    SymbolicContraction(),  # symbolic rows only (a symbolic-shape build)
    Contraction(),
    Elementwise(),
    Window(),
    Reduction(),
    InnerReduction(),
    WholeReduction(),
    RowTables(),
    IRBuilderKernels(),
    Fallback(),
)
FALLBACK_RULE = Fallback.name


def rule_named(name: str) -> KilnRule:
    """The registered rule called ``name``."""
    for rule in RULES:
        if rule.name == name:
            return rule
    raise ValueError(f"no schedule rule {name!r}; rules: {[r.name for r in RULES]}")


def constant_params(mod: tvm.IRModule) -> dict[str, frozenset[int]]:
    """Per PrimFunc name: the param positions bound to a relax.Constant (or a weight
    computed at load time, ``load_time``) at every call_tir."""
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
                consts = {n for n, arg in enumerate(fields)
                          if isinstance(arg, tvm.ir.GenericConst) or is_load_time_param(arg)}
                seen.setdefault(gvar.name_hint, []).append(consts)
    return {name: frozenset(set.intersection(*sets)) for name, sets in seen.items()}


def schedule_primfunc(func: tirx.PrimFunc, target: tvm.target.Target,
                      rules: tuple[KilnRule, ...] = RULES
                      ) -> tuple[s_tir.Schedule, KilnRule] | None:
    """The first of ``rules`` that schedules ``func`` (annotated with its constant params,
    ``rule.with_const_params``) and its Schedule; None when none does."""
    for rule in rules:
        try:
            sch = rule.apply(func, target, False)
        except Exception as err:
            log.debug("rule %s failed: %s", rule.name, err, exc_info=log.isEnabledFor(logging.DEBUG))
            continue
        if sch is not None:
            return sch, rule
    return None


@tvm.transform.module_pass(opt_level=0, name="kiln.ScheduleCPUKernels")
class ScheduleCPUKernels:
    """Give every unscheduled PrimFunc of the module a kiln CPU schedule."""

    def __init__(self, target: tvm.target.Target) -> None:
        self.target = target

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        consts = constant_params(mod)
        updates = {}
        start = time.perf_counter()
        counts: dict[str, int] = {}
        for gvar, func in mod.functions.items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            if func.attrs is not None and func.attrs.get(SCHEDULED_ATTR):
                continue
            found = schedule_primfunc(
                with_const_params(func, consts.get(gvar.name_hint, frozenset())), self.target)
            if found is None:
                log.info("no kiln rule for %s", gvar.name_hint)
                continue
            sch, rule = found
            updates[gvar] = sch.mod["main"].with_attr(SCHEDULED_ATTR, True).with_attr(
                RULE_ATTR, rule.name)
            counts[rule.name] = counts.get(rule.name, 0) + 1
        for gvar, func in updates.items():
            mod[gvar] = func
        log.info("kiln schedules: %s in %.2f s", counts, time.perf_counter() - start)
        return mod


def cpu_schedule_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    """kiln's rules on every kernel left unscheduled, then constant weight packing moved
    to compile time (run after FuseTIR, before the dataflow lowering passes)."""
    return [
        ScheduleCPUKernels(target),
        split_layout_rewrite_preproc,  # TVM's pass, minus the kernels it aborts on
        fold_weight_prepack(),
        move_prepack_to_load_time(PREPACK_SUFFIX),  # packing of weights made at load time
    ]


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
