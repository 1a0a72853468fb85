"""Weights computed from shared constants once at load time, not stored in the library.

A graph may compute a weight from constants that several weights share: template_share
writes each layer's weight as ``Reshape(MatMul(c_l, T))`` with the templates T read by
every layer. Constant folding would store the L products in ``model.so`` (L full weights,
as if nothing were shared); running the mix in ``main`` would redo it on every call. So
these computations move into a function :data:`INIT_FUNCTION` of no arguments that
returns the weights, and ``main`` takes them as parameters after the model's inputs: the
library holds T and the c_l once, the runtime calls :data:`INIT_FUNCTION` once when it
loads the library and passes the results on every call (:mod:`.runtime`).

What moves: a call whose tensor operands are all constants, two or more of them distinct,
one of which another such computation also reads (the shared one), and, after it, every
call that reads only constants and moved values (the Reshape). A transpose of one shared
weight does not move (it has one constant operand; folding it is stored once). Inside
:data:`INIT_FUNCTION` each constant is first passed through ``vm.builtin.copy``, an
identity that constant folding does not evaluate, so the build keeps the mix there.

The schedule rules treat these parameters as constants (``registry.constant_params``),
so a matmul or conv packs them as it packs a constant weight; the packing call, which
for a parameter would run on every call, then moves to the end of :data:`INIT_FUNCTION`
(:func:`move_prepack_to_load_time`, after the compile-time packing): ``main`` receives
the packed weights and runs the same prepacked kernels as an unshared build.
"""

from __future__ import annotations

import logging

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .manifest import LOAD_TIME_INIT as INIT_FUNCTION
from .manifest import LOAD_TIME_KEY as MANIFEST_KEY  # noqa: F401 - used by build.py, tests

logger = logging.getLogger(__name__)

#: name prefix of ``main``'s parameters that :data:`INIT_FUNCTION` computes
PARAM_PREFIX = "kiln_load_time_"


def _tensor_args(call: relax.Call) -> list[relax.Expr]:
    return [a for a in call.args if isinstance(a.ty, relax.TensorType)]


def _index(items: list, item) -> int:
    """Position of ``item`` in ``items`` by identity (-1 if absent)."""
    return next((i for i, seen in enumerate(items) if seen.same_as(item)), -1)


def _moved_bindings(bindings: list[relax.VarBinding]) -> list[relax.VarBinding]:
    """The bindings of ``main``'s dataflow that compute weights from shared constants."""
    constant_calls = []
    for b in bindings:
        value = b.value
        if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
            tensors = _tensor_args(value)
            if tensors and all(isinstance(a, tvm.ir.GenericConst) for a in tensors):
                constant_calls.append((b, tensors))
    readers: list[tuple[tvm.ir.GenericConst, int]] = []   # constant -> all-constant calls reading it
    for _, tensors in constant_calls:
        for c in {id(t): t for t in tensors}.values():
            i = _index([r[0] for r in readers], c)
            if i < 0:
                readers.append((c, 1))
            else:
                readers[i] = (c, readers[i][1] + 1)
    shared = [c for c, n in readers if n > 1]
    moved: list[relax.VarBinding] = []
    moved_vars: list[relax.Var] = []
    for b in bindings:
        value = b.value
        if not (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op)):
            continue
        tensors = _tensor_args(value)
        reads_moved = any(_index(moved_vars, a) >= 0 for a in tensors)
        inputs_known = tensors and all(isinstance(a, tvm.ir.GenericConst) or _index(moved_vars, a) >= 0
                                       for a in tensors)
        distinct = [t for i, t in enumerate(tensors) if _index(tensors[:i], t) < 0]
        mixes = (len(distinct) >= 2 and all(isinstance(a, tvm.ir.GenericConst) for a in tensors)
                 and any(_index(shared, t) >= 0 for t in tensors))
        if inputs_known and (mixes or reads_moved):
            moved.append(b)
            moved_vars.append(b.var)
    return moved


@mutator
class _DropAndRebind(PyExprMutator):
    """``main`` without the moved bindings, their values read from new parameters."""

    def __init__(self, moved: list[relax.Var], params: dict[int, relax.Var]) -> None:
        super().__init__()
        self.moved = moved
        self.params = params

    def visit_var_binding_(self, binding) -> None:
        i = _index(self.moved, binding.var)
        if i < 0:
            super().visit_var_binding_(binding)
        elif i in self.params:
            self.set_var_remap(binding.var, self.params[i])


def _init_function(moved: list[relax.VarBinding], outputs: list[int]) -> relax.Function:
    bb = relax.BlockBuilder()
    with bb.function(INIT_FUNCTION, params=[], pure=True):
        with bb.dataflow():
            copies: list[tuple[tvm.ir.GenericConst, relax.Var]] = []
            values: list[relax.Var] = []
            moved_vars = [b.var for b in moved]

            def operand(arg):
                if isinstance(arg, tvm.ir.GenericConst):
                    i = _index([c for c, _ in copies], arg)
                    if i < 0:
                        copy = bb.emit(relax.call_pure_packed(
                            "vm.builtin.copy", arg, ty_args=[arg.ty]))
                        copies.append((arg, copy))
                        return copy
                    return copies[i][1]
                i = _index(moved_vars, arg)
                return values[i] if i >= 0 else arg

            for b in moved:
                call = b.value
                values.append(bb.emit(relax.Call(call.op, [operand(a) for a in call.args],
                                                 call.attrs, call.ty_args)))
            results = [bb.emit_output(values[i]) for i in outputs]
        bb.emit_func_output(relax.Tuple(results))
    return bb.get()[INIT_FUNCTION]


def move_shared_mixing_to_load_time(mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
    """``mod`` with the weights computed from shared constants in :data:`INIT_FUNCTION`
    and passed to ``main`` after its inputs; and how many (0: ``mod`` unchanged)."""
    main = mod["main"]
    bindings = [b for block in main.body.blocks for b in block.bindings
                if isinstance(b, relax.VarBinding)]
    moved = _moved_bindings(bindings)
    if not moved:
        return mod, 0
    moved_vars = [b.var for b in moved]
    used_after: list[int] = []

    def note_use(node) -> None:
        i = _index(moved_vars, node) if isinstance(node, relax.Var) else -1
        if i >= 0 and i not in used_after:
            used_after.append(i)

    for b in bindings:
        if _index(moved_vars, b.var) < 0:
            relax.analysis.post_order_visit(b.value, note_use)
    relax.analysis.post_order_visit(main.body.body, note_use)
    used_after.sort()
    params = {i: relax.Var(f"{PARAM_PREFIX}{n}", moved_vars[i].ty)
              for n, i in enumerate(used_after)}
    body = _DropAndRebind(moved_vars, params).visit_expr(main.body)
    new_main = relax.Function(list(main.params) + [params[i] for i in used_after], body,
                              main.ret_ty, main.is_pure, main.attrs, main.span)
    new_mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    new_mod["main"] = new_main
    new_mod[INIT_FUNCTION] = _init_function(moved, used_after).with_attr(
        "global_symbol", INIT_FUNCTION)
    logger.info("%d weight(s) computed from shared constants at load time (%d calls)",
                len(used_after), len(moved))
    return new_mod, len(used_after)


def is_load_time_param(var) -> bool:
    """Whether ``var`` is one of ``main``'s load-time weights (schedules treat them as
    constants: their packing runs at load time, see :func:`move_prepack_to_load_time`)."""
    return isinstance(var, relax.Var) and str(var.name).startswith(PARAM_PREFIX)


def _prepack_moves(main: relax.Function, suffix: str) -> list[tuple[relax.VarBinding, int]]:
    """(binding, position among the load-time params) of each ``*<suffix>`` call in
    ``main`` on a load-time weight that nothing else reads."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    weights = [p for p in main.params if is_load_time_param(p)]
    uses = [0] * len(weights)

    def count(node) -> None:
        i = _index(weights, node) if isinstance(node, relax.Var) else -1
        if i >= 0:
            uses[i] += 1

    relax.analysis.post_order_visit(main.body, count)
    moves = []
    for block in main.body.blocks:
        for b in block.bindings:
            value = b.value
            if not (isinstance(value, relax.Call) and value.op.same_as(call_tir)
                    and suffix in value.args[0].name_hint):
                continue
            args = value.args[1].fields if isinstance(value.args[1], relax.Tuple) \
                else [value.args[1]]
            i = _index(weights, args[0]) if len(args) == 1 else -1
            if i >= 0 and uses[i] == 1:
                moves.append((b, i))
    return moves


def move_prepack_to_load_time(suffix: str) -> tvm.transform.Pass:
    """The packing calls (PrimFuncs named ``*<suffix>``) of load-time weights move from
    ``main`` (where they would run on every call) to the end of :data:`INIT_FUNCTION`,
    which then returns the packed weights; ``main`` takes those instead."""

    @tvm.transform.module_pass(opt_level=0, name="kiln.MovePrepackToLoadTime")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if not any(gv.name_hint == INIT_FUNCTION for gv in mod.get_global_vars()):
            return mod
        main = mod["main"]
        moves = _prepack_moves(main, suffix)
        if not moves:
            return mod
        weights = [p for p in main.params if is_load_time_param(p)]
        init = mod[INIT_FUNCTION]
        outs = list(init.body.body.fields)
        packed: dict[int, relax.Var] = {}
        bindings = []
        for b, i in moves:
            var = relax.Var(f"packed_{i}", b.var.ty)
            value = b.value
            bindings.append(relax.VarBinding(var, relax.Call(
                value.op, [value.args[0], relax.Tuple([outs[i]])], value.attrs,
                value.ty_args)))
            outs[i] = var
            packed[i] = relax.Var(f"{PARAM_PREFIX}{i}", b.var.ty)
        body = relax.SeqExpr(list(init.body.blocks) + [relax.BindingBlock(bindings)],
                             relax.Tuple(outs))
        new_init = relax.Function([], body, relax.TupleType([o.ty for o in outs]),
                                  init.is_pure, init.attrs, init.span)
        moved = [b.var for b, _ in moves]
        body = _DropAndRebind(moved, {n: packed[i] for n, (_, i) in enumerate(moves)}
                              ).visit_expr(main.body)
        params = [packed.get(_index(weights, p), p) if is_load_time_param(p) else p
                  for p in main.params]
        new_main = relax.Function(params, body, main.ret_ty, main.is_pure, main.attrs,
                                  main.span)
        result = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        result["main"] = new_main
        result[INIT_FUNCTION] = new_init
        logger.info("%d load-time weight(s) packed at load time", len(moves))
        return result

    return _pass
