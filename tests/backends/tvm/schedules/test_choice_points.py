"""Choice points of kiln's rules (``analysis.choose`` / ``choose_factor``).

Untuned, a rule samples nothing and its default decisions are exactly the heuristic's;
tuned, every option of every choice point (each structural variant a design space,
each split factor a ``sample_categorical`` MetaSchedule replays) is a valid kernel that
computes what the unscheduled one does. Small shapes: ~30 tiny LLVM builds in all.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax, s_tir, tirx

from kiln.backends.tvm.pipeline import legalize_passes
from kiln.backends.tvm.schedules.registry import (
    constant_params,
    rule_named,
    schedule_primfunc,
)
from kiln.backends.tvm.schedules.rule import with_const_params
from kiln.backends.tvm.targets import resolve_target
from kiln.backends.tvm.tuning.space import RULE_ANNOTATION, rule_design_spaces

# fp32 results may differ from the unscheduled kernel only by summation order.
RTOL = 1e-5


def _rng():
    return np.random.default_rng(0)


def _matmul_bias_relu(bb, x):
    rng = _rng()
    w = rng.standard_normal((64, 32)).astype("float32")
    bias = rng.standard_normal(32).astype("float32")
    y = bb.emit(relax.op.matmul(x, relax.const(w)))
    return bb.emit(relax.op.nn.relu(bb.emit(relax.op.add(y, relax.const(bias)))))


def _conv3x3(bb, x):
    w = _rng().standard_normal((32, 8, 3, 3)).astype("float32")
    return bb.emit(relax.op.nn.conv2d(x, relax.const(w), padding=1))


def _depthwise3x3(bb, x):
    w = _rng().standard_normal((64, 1, 3, 3)).astype("float32")
    return bb.emit(relax.op.nn.conv2d(x, relax.const(w), padding=1, groups=64))


# (model, input shape, the rule that schedules its kernel)
KERNELS = {
    "matmul": (_matmul_bias_relu, (8, 64), "contraction"),
    "conv": (_conv3x3, (1, 8, 6, 10), "contraction"),
    "depthwise": (_depthwise3x3, (1, 64, 4, 6), "window"),
}


def _kernel(kind: str):
    """(PrimFunc, its const params, target) of KERNELS[kind]'s kernel of the rule."""
    builder, shape, _ = KERNELS[kind]
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(builder(bb, x))
        bb.emit_func_output(out)
    target = resolve_target("host")
    with target.tvm_target():
        legal = tvm.transform.Sequential(legalize_passes(target))(bb.get())
    consts = constant_params(legal)
    kernels = []
    for gvar, func in legal.functions.items():  # (a conv also has layout transposes)
        if not isinstance(func, tirx.PrimFunc):
            continue
        const = consts.get(gvar.name_hint, frozenset())
        if schedule_primfunc(with_const_params(func, const),
                             target.tvm_target())[1].name == KERNELS[kind][2]:
            kernels.append((func, const, target.tvm_target()))
    (kernel,) = kernels
    return kernel


def _run(func: tirx.PrimFunc, target, args: list[np.ndarray]) -> np.ndarray:
    lib = tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                         target=target)
    tensors = [tvm.runtime.tensor(a) for a in args]
    lib["main"](*tensors)
    return tensors[-1].numpy()


def _random_args(func: tirx.PrimFunc) -> list[np.ndarray]:
    rng = _rng()
    shapes = [[int(d) for d in param.shape] for param in func.params]  # params are Buffers
    return [rng.standard_normal(shape).astype("float32") for shape in shapes]


def _live_choices(trace) -> list:
    return [inst for inst in trace.insts if inst.kind.name == "SampleCategorical"]


@pytest.mark.parametrize("kind", sorted(KERNELS))
def test_untuned_rules_sample_nothing_and_their_defaults_are_the_heuristic(kind):
    func, consts, target = _kernel(kind)
    rule = rule_named(KERNELS[kind][2])
    assert rule.has_choice_points
    annotated = with_const_params(func, consts)
    untuned = rule.apply(annotated, target, False)
    assert _live_choices(untuned.trace) == []

    tuned = rule.apply(annotated, target, True)
    assert _live_choices(tuned.trace)  # the choice points are in the trace ...
    # ... at the heuristic's values
    tvm.ir.assert_structural_equal(tuned.mod["main"], untuned.mod["main"])
    # the first design space of kiln's search space is that schedule too
    first = rule_design_spaces(s_tir.Schedule(func), target, consts, rule, limit=1)[0]
    first.unannotate(first.get_sblock("root"), RULE_ANNOTATION)
    tvm.ir.assert_structural_equal(first.mod["main"].without_attr("global_symbol"),
                                   untuned.mod["main"].without_attr("global_symbol"))


@pytest.mark.parametrize("kind", sorted(KERNELS))
def test_every_option_of_every_choice_point_is_a_correct_kernel(kind):
    func, consts, target = _kernel(kind)
    rule = rule_named(KERNELS[kind][2])
    spaces = rule_design_spaces(s_tir.Schedule(func), target, consts, rule, limit=64)
    # structural choices (column tile x loop order, window unrolled or not): a design
    # space each
    assert len(spaces) >= 2
    args = _random_args(func)
    want = _run(func, target, [a.copy() for a in args])
    scale = max(float(np.abs(want).max()), 1e-6)
    tried = 0
    for space in spaces:
        trace = space.trace.simplified(remove_postproc=True)
        choices = _live_choices(trace)  # split factors: MetaSchedule samples these
        assert choices
        counts = [len(inst.attrs[0]) for inst in choices]
        for option in range(max(counts)):  # option i of every factor at once
            for inst, count in zip(choices, counts, strict=True):
                trace = trace.with_decision(inst, option % count, remove_postproc=True)
            sch = s_tir.Schedule(func)
            trace.apply_to_schedule(sch, remove_postproc=True)
            got = _run(sch.mod["main"], target, [a.copy() for a in args])
            assert float(np.abs(got - want).max()) / scale < RTOL, (kind, option)
            tried += 1
    assert tried >= len(spaces) * 2
