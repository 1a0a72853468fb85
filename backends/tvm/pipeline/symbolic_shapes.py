"""A Relax pass and a legalization that let a symbolic-shape build fuse what a fixed-shape
build fuses.

Over a symbolic dim (``S=2..1024``) two things keep kernels apart that a fixed build
folds or fuses (the bench encoder at S=16: 122 kernel calls against 73):

- ``take(shape_to_tensor(shape_of(x)), i)`` where dim ``i`` of ``x`` is static (ONNX's
  ``Gather`` index normalization, ``where(i < 0, i + dim, i)``, reads the dim from
  ``Shape``): the shape holds ``S`` elsewhere, so FoldConstant leaves the whole chain
  as three tiny kernels per index. :func:`fold_static_shape_takes` writes the static dim
  as a constant, and FoldConstant then folds the rest;
- a reshape over a symbolic dim, as TVM legalizes it, flattens the index and unflattens
  it again (``lv[((v1 * 64 + v2) // 256 + v0) % S, 0, ...]``); TVM's AnnotateTIROpPattern
  calls a divisor that is not a constant opaque, so FuseOps fuses nothing across it
  (each transpose around it stays a copy of its own), and fused anyway the analyzer
  cannot drop the symbolic divisions (measured: the fused K transpose 11x slower than
  the fixed build's). :func:`legalize_symbolic_reshape` groups the dims instead (a
  symbolic dim maps to itself, static dims split or merge within a group of equal
  product, unit dims are dropped), so every divisor is a constant, as in a fixed build.
"""

from __future__ import annotations

import logging

import tvm
import tvm_ffi
from tvm import relax, te, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

logger = logging.getLogger(__name__)


@mutator
class _FoldStaticShapeTakes(PyExprMutator):
    """``take(shape_to_tensor(s), const i)`` -> ``const s[i]`` where ``s[i]`` is static."""

    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.folded = 0

    def _bound(self, expr: relax.Expr) -> relax.Expr:
        if isinstance(expr, relax.Var):
            value = self.lookup_binding(expr)
            if value is not None:
                return value
        return expr

    def visit_call_(self, op: relax.Call) -> relax.Expr:  # noqa: N802 - PyExprMutator's naming
        call = super().visit_call_(op)
        if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op)
                and call.op.name == "relax.take" and len(call.args) == 2):
            return call
        source, index = self._bound(call.args[0]), self._bound(call.args[1])
        if not (isinstance(source, relax.Call) and isinstance(source.op, tvm.ir.Op)
                and source.op.name == "relax.shape_to_tensor"
                and isinstance(index, tvm.ir.GenericConst) and tuple(index.value.shape) == ()):
            return call
        shape = source.args[0].ty
        if not isinstance(shape, relax.ShapeType) or shape.values is None:
            return call
        dims = list(shape.values)
        i = int(index.value.numpy())
        if not -len(dims) <= i < len(dims) or not isinstance(dims[i], tirx.IntImm):
            return call
        out = call.ty
        self.folded += 1
        return relax.const(int(dims[i]), str(out.dtype) if isinstance(out, relax.TensorType)
                           else "int64")


def fold_static_shape_takes() -> tvm.transform.Pass:
    """A static dim read from a partly symbolic shape (``Shape`` + ``Gather``) as a constant."""

    @tvm.transform.module_pass(opt_level=0, name="kiln.FoldStaticShapeTakes")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = _FoldStaticShapeTakes(mod)
        for gvar, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
        logger.debug("kiln.FoldStaticShapeTakes: %d static dims folded", rewriter.folded)
        return rewriter.builder_.get() if rewriter.folded else mod

    return _pass


def _static(dim) -> int | None:
    return int(dim) if isinstance(dim, tirx.IntImm) else None


def reshape_groups(in_shape: list, out_shape: list
                   ) -> list[tuple[list[int], list[int]]] | None:
    """The reshape as groups of (input dims, output dims) with equal products, unit dims
    left out; a symbolic dim must be a group of its own on both sides (the same
    expression). None when the dims do not group so (a symbolic dim merged or split)."""
    ins = [d for d, n in enumerate(in_shape) if _static(n) != 1]
    outs = [d for d, n in enumerate(out_shape) if _static(n) != 1]
    groups: list[tuple[list[int], list[int]]] = []
    i = o = 0
    while i < len(ins) and o < len(outs):
        a, b = in_shape[ins[i]], out_shape[outs[o]]
        if _static(a) is None or _static(b) is None:
            if _static(a) is not None or _static(b) is not None or \
                    not tvm_ffi.structural_equal(a, b):
                return None
            groups.append(([ins[i]], [outs[o]]))
            i, o = i + 1, o + 1
            continue
        g_in, g_out = [ins[i]], [outs[o]]
        p_in, p_out = _static(a), _static(b)
        i, o = i + 1, o + 1
        while p_in != p_out:
            if p_in < p_out:
                if i >= len(ins) or _static(in_shape[ins[i]]) is None:
                    return None
                p_in *= _static(in_shape[ins[i]])
                g_in.append(ins[i])
                i += 1
            else:
                if o >= len(outs) or _static(out_shape[outs[o]]) is None:
                    return None
                p_out *= _static(out_shape[outs[o]])
                g_out.append(outs[o])
                o += 1
        groups.append((g_in, g_out))
    if i != len(ins) or o != len(outs):
        return None
    return groups


def _grouped_reshape(x: te.Tensor, out_shape: list, groups) -> te.Tensor:
    in_shape = list(x.shape)

    def compute(*out):
        idx = [tirx.const(0, "int64")] * len(in_shape)  # unit dims
        for g_in, g_out in groups:
            if len(g_in) == 1 and len(g_out) == 1:
                idx[g_in[0]] = out[g_out[0]]
                continue
            flat = tirx.const(0, "int64")
            for d in g_out:
                flat = flat * out_shape[d] + out[d]
            for d in reversed(g_in):
                idx[d] = flat % in_shape[d]
                flat = flat // in_shape[d]
        return x(*idx)

    return te.compute(out_shape, compute, name="T_reshape")


def legalize_symbolic_reshape(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """``relax.reshape`` over symbolic dims (:func:`reshape_groups`) with each output
    index read from the input directly (constant divisors within a static group); any
    other reshape as TVM legalizes it."""
    x_ty, out_ty = call.args[0].ty, call.ty
    shapes = [getattr(getattr(t, "shape", None), "values", None) for t in (x_ty, out_ty)]
    if all(s is not None for s in shapes):
        in_shape, out_shape = (list(s) for s in shapes)
        if any(_static(d) is None for d in (*in_shape, *out_shape)):
            groups = reshape_groups(in_shape, out_shape)
            if groups is not None:
                return bb.call_te(_grouped_reshape, call.args[0], out_shape, groups,
                                  primfunc_name_hint="reshape")
    return tvm.ir.Op.get("relax.reshape").get_attr("FLegalize")(bb, call)


def symbolic_legalize_map() -> dict:
    """``LegalizeOps`` entries for ops over symbolic dims (reshape)."""
    return {"relax.reshape": legalize_symbolic_reshape}


__all__ = ["fold_static_shape_takes", "legalize_symbolic_reshape", "reshape_groups",
           "symbolic_legalize_map"]
