"""Constant folding that leaves compressed (low-bit) weights compressed.

Relax's ``FoldConstant`` evaluates any kernel whose inputs are all constants.
For ``dequantize(int4 weight, scale)`` that would store the float32 weights in
the library (8x the bytes) and drop the point of quantizing. Folding still
matters for the rest (weight transposes, reshapes of constants), so this pass
hides low-bit constants behind temporary function parameters, folds, and
binds them back as constants: the unpack/dequantize then runs in the kernel
that consumes the weight.
"""

from __future__ import annotations

import logging

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

logger = logging.getLogger(__name__)

#: Element types of compressed weights (4-bit weights arrive as packed uint8; uint16:
#: codebook indices of more than 256 centroids).
COMPRESSED_DTYPES = frozenset({"int8", "uint8", "int4", "uint4", "float8_e4m3fn",
                               "float8_e5m2", "float4_e2m1fn", "uint16"})
#: Smaller constants (zero points, lookup tables, shapes) may fold freely.
MIN_ELEMENTS = 256


@mutator
class _LiftCompressedConstants(PyExprMutator):
    """Replaces each large low-bit constant with a Var (one per tensor), remembering its value.

    One Var per tensor matters: the nibble unpack reads the packed weight twice,
    and two Vars would become two kernel parameters for the same buffer.
    """

    def __init__(self, mod=None) -> None:
        super().__init__(mod)
        self.lifted: list[tuple[relax.Var, tvm.runtime.Tensor]] = []

    def visit_generic_const_(self, op):
        value = op.value
        if str(value.dtype) not in COMPRESSED_DTYPES or _numel(value.shape) < MIN_ELEMENTS:
            return op
        for var, seen in self.lifted:
            if seen.same_as(value):
                return var
        var = relax.Var(f"kiln_compressed_{len(self.lifted)}", op.ty)
        self.lifted.append((var, value))
        return var


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _has_constant_calls(func: relax.Function) -> bool:
    """Whether some call in ``func`` has only constant tensor operands (what FoldConstant
    folds). TVM 0.27's FoldConstant takes seconds on large modules even when it folds
    nothing, so it is skipped then."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    found = []

    def visit(node) -> None:
        if found or not isinstance(node, relax.Call):
            return
        args = node.args
        if node.op.same_as(call_tir):
            args = args[1].fields if isinstance(args[1], relax.Tuple) else [args[1]]
        tensors = [a for a in args if isinstance(a.ty, relax.TensorType)] if args else []
        if tensors and all(isinstance(a, tvm.ir.GenericConst) for a in tensors):
            found.append(node)

    relax.analysis.post_order_visit(func, visit)
    return bool(found)


def fold_constants_keeping_compressed(func_name: str = "main") -> tvm.transform.Pass:
    """``FoldConstant`` on ``func_name`` that never expands low-bit weights to float."""

    @tvm.transform.module_pass(opt_level=0, name="FoldConstantKeepingCompressed")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        gvar = mod.get_global_var(func_name)
        func = mod[gvar]
        lifter = _LiftCompressedConstants(mod)
        body = lifter.visit_expr(func.body)
        if not lifter.lifted:
            return relax.transform.FoldConstant()(mod) if _has_constant_calls(func) else mod
        new_vars = [var for var, _ in lifter.lifted]
        lifted = relax.Function(list(func.params) + new_vars, body, func.ret_ty,
                                func.is_pure, func.attrs, func.span)
        mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        mod[gvar] = lifted
        if _has_constant_calls(lifted):
            mod = relax.transform.FoldConstant()(mod)
        values = dict(lifter.lifted)
        mod = relax.transform.BindParams(func_name, values)(mod)
        logger.debug("kept %d compressed constant(s) out of folding", len(values))
        return mod

    return _pass
