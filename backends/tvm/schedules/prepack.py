"""Run weight-packing kernels at compile time (and only those).

The dense and conv rules mark the block that re-lays out a constant weight as a
layout-rewrite preprocess; ``SplitLayoutRewritePreproc`` moves it into its own
PrimFunc (``<kernel>_weight_prepack``) called from Relax on the constant.  This pass
evaluates exactly those calls and binds the packed result as a new constant.  It does
not use Relax's ``FoldConstant``, which would also evaluate any other all-constant
kernel (for instance a dequantize of low-bit weights, which must stay compressed).
"""

from __future__ import annotations

import logging

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

log = logging.getLogger(__name__)

PREPACK_SUFFIX = "_weight_prepack"


@mutator
class _FoldPrepackCalls(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.mod_ = mod
        self.call_tir = tvm.ir.Op.get("relax.call_tir")
        self.built: dict[str, tvm.runtime.Module] = {}
        self.folded = 0

    def visit_call_(self, op):
        call = super().visit_call_(op)
        if not (isinstance(call, relax.Call) and call.op.same_as(self.call_tir)):
            return call
        gvar = call.args[0]
        if not gvar.name_hint.endswith(PREPACK_SUFFIX) and PREPACK_SUFFIX not in gvar.name_hint:
            return call
        args = call.args[1].fields if isinstance(call.args[1], relax.Tuple) else [call.args[1]]
        if not all(isinstance(a, tvm.ir.GenericConst) for a in args):
            return call
        out_ty = call.ty
        if not isinstance(out_ty, relax.TensorType):
            return call
        func = self.mod_[gvar]
        key = gvar.name_hint
        if key not in self.built:
            func = func.with_attr("global_symbol", "main")
            self.built[key] = tvm.tirx.build(tvm.IRModule({"main": func}),
                                             target=tvm.target.Target({"kind": "llvm"}))
        shape = [int(d) for d in out_ty.shape.values]
        out = tvm.runtime.tensor(np.empty(shape, dtype=str(out_ty.dtype)))
        self.built[key]["main"](*[a.value for a in args], out)
        self.folded += 1
        return relax.const(out)


def fold_weight_prepack() -> tvm.transform.Pass:
    """Evaluate ``*_weight_prepack`` calls on constants at compile time."""

    @tvm.transform.module_pass(opt_level=0, name="kiln.FoldWeightPrepack")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        folder = _FoldPrepackCalls(mod)
        for gvar, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                folder.builder_.update_func(gvar, folder.visit_expr(func))
        result = folder.builder_.get()
        # drop prepack PrimFuncs that no call uses any more
        used = _called_globals(result)
        for gvar, func in list(result.functions.items()):
            if isinstance(func, tirx.PrimFunc) and PREPACK_SUFFIX in gvar.name_hint \
                    and gvar.name_hint not in used:
                del result[gvar]
        log.info("folded %d weight-packing calls", folder.folded)
        return result

    return _pass


def _called_globals(mod: tvm.IRModule) -> set[str]:
    names: set[str] = set()

    def visit(node):
        if isinstance(node, relax.GlobalVar):
            names.add(node.name_hint)

    for _, func in mod.functions.items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return names
