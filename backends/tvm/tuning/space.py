"""kiln's search space: a rule's choice points as MetaSchedule design spaces.

A kernel whose kiln rule has choice points (``KilnRule.has_choice_points``: contraction,
window) is searched over kiln's rule itself (``kiln``, the default), that and
MetaSchedule's default CPU sketches (``union``), or the sketches only
(``metaschedule``); see the package docstring for what each choice point is and why
``kiln`` is the default. Other kernels always get MetaSchedule's default space.
"""

from __future__ import annotations

import logging

import tvm
from tvm import s_tir, tirx

from kiln.backends.tvm.schedules.registry import constant_params, schedule_primfunc
from kiln.backends.tvm.schedules.rule import (
    ChoicePlan,
    KilnRule,
    RuleContext,
    with_const_params,
)

log = logging.getLogger(__name__)

#: What ``tune_relax_module(space=...)`` searches for a kernel of a rule with choice points.
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


def rule_design_spaces(sch: s_tir.Schedule, target: tvm.target.Target,
                       const_params: frozenset[int], rule: KilnRule, *,
                       limit: int = MAX_RULE_SPACES) -> list[s_tir.Schedule]:
    """kiln's ``rule`` applied to copies of ``sch`` (a task's fresh Schedule) with its
    choice points tunable: one design space per combination of structural choices
    (``rule.choose``, defaults first, breadth-first), each holding its split-factor
    choices as ``sample_categorical`` decisions (``rule.choose_factor``) at their
    defaults. The first space is kiln's default schedule."""
    spaces, pending = [], [()]
    while pending and len(spaces) < limit:
        forced = pending.pop(0)
        plan = ChoicePlan(forced)
        space = sch.copy()
        space.seed(sch.fork_seed())
        ctx = RuleContext.create(target, const_params, tunable=True, plan=plan)
        try:
            scheduled = rule.schedule(space, ctx) is not None
        except Exception as err:  # noqa: BLE001 - an option the rule cannot take: skip it
            log.debug("kiln's %s rule failed with choices %s: %s", rule.name, forced, err)
            scheduled = False
        if scheduled:
            space.annotate(space.get_sblock("root"), RULE_ANNOTATION, rule.name)
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

    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, not {space!r}")
    if space == "metaschedule":
        return None
    picked = schedule_primfunc(with_const_params(func, const_params), target)
    if picked is None or not picked[1].has_choice_points:
        return None
    rule = picked[1]
    if not rule_design_spaces(s_tir.Schedule(func), target, const_params, rule, limit=1):
        log.debug("kiln's %s rule has no tunable form for this kernel", rule.name)
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


def task_const_params(legal: tvm.IRModule, tasks) -> dict[str, frozenset[int]]:
    """Per task: the params bound to a constant at every call of every kernel it stands
    for (MetaSchedule merges structurally equal kernels; one record serves them all)."""
    import tvm_ffi

    consts = constant_params(legal)
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


def tune_contexts(tasks, legal: tvm.IRModule, target: tvm.target.Target, work_dir: str,
                  space: str, seed: int | None):
    """One TuneContext per task, with kiln's space where its rule is tunable; and the
    tasks' weights."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.logging import get_loggers_from_work_dir
    from tvm.s_tir.meta_schedule.utils import fork_seed

    consts = task_const_params(legal, tasks)
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
