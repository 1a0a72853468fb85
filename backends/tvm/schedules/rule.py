"""What a kiln schedule rule is: dlight's ``ScheduleRule`` shape, plus the context and
choice points kiln's rules share.

A rule is an object with ``apply(func, target, tunable)`` returning a Schedule, or None
when ``func`` is not its kind of kernel (``tvm.s_tir.dlight.ScheduleRule``; kiln's rules
subclass it, so ``dlight.ApplyDefaultSchedule`` could run them too). Besides the
PrimFunc and the target a rule needs to know which params are constants at every call
site (a weight it may re-lay out at compile time): that is read from the PrimFunc's
``layout_free_buffers`` attribute (TVM's own name for it, see
``relax.transform.AttachAttrLayoutFreeBuffers``), which ``apply`` drops before
scheduling so that the schedule is of the plain kernel.

A rule implements ``schedule(sch, ctx)``. ``tunable=True`` gives the same schedule with
the rule's choice points recorded as ``sample_categorical`` decisions at their defaults
(one MetaSchedule design space); kiln's search space
(``kiln.backends.tvm.tuning.space``) enumerates the structural ones through
``RuleContext.plan``.
"""

from __future__ import annotations

import dataclasses

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target.codegen import llvm_get_vector_width, target_has_features

#: PrimFunc attribute: positions of the params bound to a constant at every call.
CONST_PARAMS_ATTR = "layout_free_buffers"


def vector_lanes_f32(target: tvm.target.Target) -> int:
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


def vector_registers(target: tvm.target.Target) -> int:
    """SIMD registers the target's ISA has: 32 zmm with AVX-512 (and 32 NEON/SVE registers
    on arm64), 16 ymm/xmm on AVX2 and older x86."""
    try:
        if target.kind.name == "llvm":
            if target_has_features("avx512f", target):
                return 32
            mtriple = str(target.attrs.get("mtriple", "")) if target.attrs else ""
            return 32 if mtriple.startswith(("aarch64", "arm64")) else 16
    except Exception:  # noqa: BLE001 - non-LLVM targets
        pass
    return 32


def register_accumulators(target: tvm.target.Target) -> int:
    """Accumulator registers a micro-kernel may use: what is left of the vector registers
    after the tile's B vectors (up to 4... 6) and the broadcast A value. 25 of 32 on AVX-512
    (4 x 4 vectors, 5 x 3, 6 x 4 with B reuse); 12 of 16 on AVX2 (6 rows x 2 vectors, the
    classic AVX2 sgemm kernel) instead of spilling a 4 x 4 tile."""
    return 25 if vector_registers(target) >= 32 else 12


@dataclasses.dataclass(frozen=True, kw_only=True)
class RuleContext:
    """What a rule may know besides the PrimFunc: the target and which params are constants."""

    target: tvm.target.Target
    vector_lanes_f32: int  # fp32 lanes in one SIMD register (16 for AVX-512)
    num_cores: int
    # fp32 accumulators a register tile may hold (register_accumulators(target))
    accumulators: int
    const_params: frozenset[int]  # indices of params bound to relax.Constant at every call site
    # Tuning (kiln.backends.tvm.tuning): the rule's choice points become MetaSchedule
    # decisions; ``plan`` picks the structural ones (see ``choose``). False: defaults only.
    tunable: bool = False
    plan: ChoicePlan | None = None

    @classmethod
    def create(cls, target: tvm.target.Target, const_params: frozenset[int] = frozenset(),
               *, tunable: bool = False, plan: ChoicePlan | None = None) -> RuleContext:
        """The context of a kernel built for ``target``."""
        cores = int(target.attrs.get("num-cores", 0) or 0) if target.attrs else 0
        return cls(target=target, vector_lanes_f32=vector_lanes_f32(target), num_cores=cores,
                   accumulators=register_accumulators(target),
                   const_params=frozenset(const_params), tunable=tunable, plan=plan)


def with_const_params(func: tirx.PrimFunc, const_params: frozenset[int]) -> tirx.PrimFunc:
    """``func`` annotated with the params that are constants (what ``apply`` reads)."""
    return func.with_attr(CONST_PARAMS_ATTR, sorted(int(n) for n in const_params))


def split_const_params(func: tirx.PrimFunc) -> tuple[tirx.PrimFunc, frozenset[int]]:
    """(``func`` without the annotation, the constant params it named)."""
    attrs = func.attrs
    if attrs is None or CONST_PARAMS_ATTR not in attrs:
        return func, frozenset()
    consts = frozenset(int(n) for n in attrs[CONST_PARAMS_ATTR])
    return func.without_attr(CONST_PARAMS_ATTR), consts


class KilnRule(ScheduleRule):
    """A kiln CPU schedule rule.

    ``name`` is what reports show (``kiln.schedule_rule``); ``has_choice_points`` says
    whether tuning may search the rule's own decisions (then ``schedule`` must schedule
    the Schedule it is given in place and return it).
    """

    name: str = ""
    has_choice_points: bool = False

    def schedule(self, sch: s_tir.Schedule, ctx: RuleContext) -> s_tir.Schedule | None:
        """Schedule ``sch``'s kernel; None when it is not this rule's kind."""
        raise NotImplementedError

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target,
              tunable: bool) -> s_tir.Schedule | None:
        plain, consts = split_const_params(func)
        plan = ChoicePlan() if tunable else None
        return self.schedule(s_tir.Schedule(plain),
                             RuleContext.create(target, consts, tunable=tunable, plan=plan))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


# ------------------------------------------------------------------- choice points
#
# A rule's parameters (register tile, unroll, loop order) are choice points: without
# tuning each is its heuristic default; with ``ctx.tunable`` each is recorded in the
# schedule's trace as ``sample_categorical`` so MetaSchedule can search it. Two kinds,
# because MetaSchedule replays a trace instruction by instruction, never the rule's
# Python code:
#   choose_factor  a split factor: the sampled value itself is the split's factor, so a
#                  replay with another decision is that other schedule (one design space
#                  holds every option; MetaSchedule samples it);
#   choose         a value the rule's code branches on (a loop order, a packed layout):
#                  a replay cannot change it, so each option is its own design space
#                  (the tuner enumerates them through ``ctx.plan``).


class ChoicePlan:
    """Which option each ``choose`` takes, in the order the rule meets them.

    ``forced[i]`` is the option index the i-th choice point takes (its default past the
    end); ``met`` records ``(number of options, index taken)`` of each one met, so a
    caller can enumerate every combination (``tuning.space.rule_design_spaces``).
    """

    def __init__(self, forced: tuple[int, ...] = ()) -> None:
        self.forced = forced
        self.met: list[tuple[int, int]] = []

    def take(self, count: int, default: int) -> int:
        at = len(self.met)
        index = self.forced[at] if at < len(self.forced) and self.forced[at] < count else default
        self.met.append((count, index))
        return index


def _uniform(count: int) -> list[float]:
    return [1.0 / count] * count


def choose(sch: s_tir.Schedule, ctx: RuleContext, options, default):
    """A structural choice: ``default`` unless tuning, then the option ``ctx.plan`` picks
    (recorded as a ``sample_categorical`` over the option indices with that decision;
    no instruction uses it, so MetaSchedule's search simplifies it away and a record
    shows the choice only through the constants it led to).

    ``options`` must hold only values the rule can schedule; ``default`` is one of them.
    """
    options = list(options)
    if not ctx.tunable or len(options) < 2:
        return default
    index = options.index(default)
    if ctx.plan is not None:
        index = ctx.plan.take(len(options), index)
    rv = sch.sample_categorical(candidates=list(range(len(options))),
                                probs=_uniform(len(options)), decision=index)
    return options[int(sch.get(rv))]


def choose_factor(sch: s_tir.Schedule, ctx: RuleContext, options, default: int):
    """A split factor: the int ``default`` unless tuning, then a ``sample_categorical``
    over ``options`` (decision: ``default``) whose random variable is the factor.

    Use the result only as a ``split`` factor (an ExprRV when tuning), never in Python
    arithmetic or branches: a MetaSchedule replay changes the decision, not the code.
    """
    options = [int(o) for o in options]
    if not ctx.tunable or len(options) < 2:
        return default
    return sch.sample_categorical(candidates=options, probs=_uniform(len(options)),
                                  decision=options.index(int(default)))
