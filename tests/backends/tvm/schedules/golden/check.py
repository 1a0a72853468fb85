"""The golden-test check: a rule applied to a small ``Before`` PrimFunc, built for a
generic LLVM target (4 fp32 lanes, 2 cores: the same schedule on any host), must give
exactly ``Expected``."""

from __future__ import annotations

import tvm

from kiln.backends.tvm.schedules.registry import rule_named
from kiln.backends.tvm.schedules.rule import with_const_params

GENERIC_TARGET = {"kind": "llvm", "num-cores": 2}


def apply_rule(rule: str, before: tvm.tirx.PrimFunc, const_params=()):
    """The Schedule ``rule`` gives ``before`` (whose ``const_params`` are weights), or None."""
    annotated = with_const_params(before, frozenset(const_params))
    return rule_named(rule).apply(annotated, tvm.target.Target(GENERIC_TARGET), False)


def assert_rule_gives(rule: str, before: tvm.tirx.PrimFunc, expected: tvm.tirx.PrimFunc,
                      const_params=()) -> None:
    sch = apply_rule(rule, before, const_params)
    assert sch is not None, f"{rule} refused its golden kernel"
    tvm.ir.assert_structural_equal(sch.mod["main"], expected)
