"""Inference batch norm folded before legalization, so that what follows it fuses.

Relax's ``batch_norm`` returns a tuple (output, running mean, running variance); the
``TupleGetItem`` that takes the output stays in the graph after
``DecomposeOpsForInference``, and ``FuseOps`` does not fuse through it: a ReLU (or a
residual Add + ReLU, a HardSwish) after a convolution's batch norm became a kernel of its
own, one more pass over the activation. Here an inference batch norm with constant
parameters becomes arithmetic, computed once in numpy (float64, then the data's dtype):

    s = gamma / sqrt(var + eps),  t = beta - mean * s
    after conv2d(x, W) read by nothing else:  conv2d(x, W * s[o]) + t   (o: W's "O" axis)
    after conv2d(x, W) + b likewise:          conv2d(x, W * s[o]) + (b * s + t)
    anywhere else:                            x * s + t

so the convolution's epilogue is one add (the decomposed form was four ops on four
constant vectors) and the ops after it fuse into the same kernel. Batch norms in training
mode, with a non-constant parameter, or whose mean/variance outputs are read, are left
as they are (``DecomposeOpsForInference`` lowers them later). A constant here is a Relax
constant, or ``broadcast_to`` / ``reshape`` of one.
"""

from __future__ import annotations

import logging

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

log = logging.getLogger(__name__)

_BATCH_NORM = "relax.nn.batch_norm"
_CONV2D = "relax.nn.conv2d"


def _is_op(expr: relax.Expr, name: str) -> bool:
    return (isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op)
            and expr.op.name == name)


def _var_uses(func: relax.Function) -> dict[relax.Var, int]:
    """How many times each variable of ``func`` is read (a binding is not a read)."""
    uses: dict[relax.Var, int] = {}

    def visit(node) -> None:
        if isinstance(node, relax.Var):
            uses[node] = uses.get(node, 0) + 1

    relax.analysis.post_order_visit(func.body, visit)  # a binding's own var is not visited
    return uses


def _float_dtype(expr: relax.Expr) -> str | None:
    ty = getattr(expr, "ty", None)
    dtype = str(getattr(ty, "dtype", ""))
    return dtype if dtype.startswith(("float", "bfloat")) else None


def _rank(expr: relax.Expr) -> int | None:
    ndim = getattr(getattr(expr, "ty", None), "ndim", -1)
    return int(ndim) if ndim is not None and int(ndim) >= 0 else None


@mutator
class _FoldInferenceBatchNorm(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.uses: dict[relax.Var, int] = {}
        self.into_conv = 0
        self.as_scale_shift = 0

    def _resolve(self, expr: relax.Expr) -> relax.Expr:
        """``expr``, or what the dataflow variable ``expr`` is bound to."""
        if isinstance(expr, relax.Var):
            bound = self.lookup_binding(expr)
            if bound is not None:
                return bound
        return expr

    def _constant(self, expr: relax.Expr) -> np.ndarray | None:
        """The value of a constant, or of ``broadcast_to`` (ONNX's ConstantOfShape weights
        are imported so) or ``reshape`` (a Conv's bias) of one, or None."""
        value = self._resolve(expr)
        if _is_op(value, "relax.broadcast_to") or _is_op(value, "relax.reshape"):
            source = self._resolve(value.args[0])
            shape = getattr(value.ty, "shape", None)
            if not isinstance(source, tvm.ir.GenericConst) or shape is None:
                return None
            try:
                dims = [int(d) for d in shape.values]
            except (TypeError, AttributeError):
                return None
            source = source.value.numpy()
            if value.op.name == "relax.reshape":
                return source.reshape(dims) if source.size == int(np.prod(dims)) else None
            return np.broadcast_to(source, dims)
        return value.value.numpy() if isinstance(value, tvm.ir.GenericConst) else None

    def _read_once(self, expr: relax.Expr) -> bool:
        return isinstance(expr, relax.Var) and self.uses.get(expr, 0) == 1

    def _scale_shift(self, call: relax.Call) -> tuple[np.ndarray, np.ndarray] | None:
        """The batch norm's per-channel ``(s, t)`` in float64, or None if not foldable."""
        attrs = call.attrs
        if bool(attrs.training):
            return None
        gamma, beta, mean, var = (self._constant(a) for a in call.args[1:5])
        if any(v is None or v.ndim != 1 for v in (gamma, beta, mean, var)):
            return None
        if not gamma.shape == beta.shape == mean.shape == var.shape:
            return None
        gamma = gamma.astype(np.float64) if bool(attrs.scale) else np.ones(gamma.shape)
        beta = beta.astype(np.float64) if bool(attrs.center) else np.zeros(beta.shape)
        scale = gamma / np.sqrt(var.astype(np.float64) + float(attrs.epsilon))
        return scale, beta - mean.astype(np.float64) * scale

    def _conv_fold(self, data: relax.Expr, axis: int, scale: np.ndarray, shift: np.ndarray,
                   dtype: str, rank: int) -> relax.Expr | None:
        """``conv2d(x, W * s) + shift'`` when ``data`` is a constant-weight conv2d (with
        an optional constant bias add) that only the batch norm reads."""
        if not self._read_once(data):
            return None
        producer = self._resolve(data)
        bias = None
        if _is_op(producer, "relax.add") and self._read_once(producer.args[0]):
            bias = self._constant(producer.args[1])
            conv = self._resolve(producer.args[0])
            if bias is None or bias.size != scale.size:
                return None
        else:
            conv = producer
        if not _is_op(conv, _CONV2D):
            return None
        weight = self._constant(conv.args[1])
        attrs = conv.attrs
        if weight is None or str(weight.dtype) != dtype:
            return None
        out_layout = str(attrs.out_layout or attrs.data_layout)
        kernel_layout = str(attrs.kernel_layout)
        if (attrs.out_dtype and str(attrs.out_dtype) not in ("", dtype)) \
                or "C" not in out_layout or out_layout.index("C") != axis \
                or "O" not in kernel_layout or weight.shape[kernel_layout.index("O")] != scale.size:
            return None
        if bias is not None:
            shape = [1] * rank
            shape[axis] = scale.size
            if bias.ndim > rank or bias.reshape(-1).size != scale.size \
                    or bias.shape != tuple(shape[rank - bias.ndim:]):
                return None  # only a per-output-channel bias folds
            shift = shift + bias.astype(np.float64).reshape(-1) * scale
        per_out = [1] * weight.ndim
        per_out[kernel_layout.index("O")] = scale.size
        folded = (weight.astype(np.float64) * scale.reshape(per_out)).astype(weight.dtype)
        new_conv = self.builder_.emit(
            relax.Call(conv.op, [conv.args[0], relax.const(folded, dtype)], attrs, conv.ty_args))
        self.into_conv += 1
        return relax.op.add(new_conv, relax.const(self._per_channel(shift, axis, rank), dtype))

    @staticmethod
    def _per_channel(values: np.ndarray, axis: int, rank: int) -> np.ndarray:
        shape = [1] * rank
        shape[axis] = values.size
        return values.reshape(shape)

    def visit_tuple_getitem_(self, op: relax.TupleGetItem) -> relax.Expr:  # noqa: N802
        item = super().visit_tuple_getitem_(op)
        if not isinstance(item, relax.TupleGetItem) or item.index != 0 \
                or not self._read_once(op.tuple_value):
            return item
        call = self._resolve(item.tuple_value)
        if not _is_op(call, _BATCH_NORM):
            return item
        data = call.args[0]
        dtype, rank = _float_dtype(data), _rank(data)
        folded = self._scale_shift(call)
        if dtype is None or rank is None or folded is None:
            return item
        scale, shift = folded
        axis = int(call.attrs.axis) % rank
        conv = self._conv_fold(data, axis, scale, shift, dtype, rank)
        if conv is not None:
            return conv
        self.as_scale_shift += 1
        scaled = self.builder_.emit(
            relax.op.multiply(data, relax.const(self._per_channel(scale, axis, rank).astype(dtype))))
        return relax.op.add(scaled, relax.const(self._per_channel(shift, axis, rank).astype(dtype)))

    def fold(self, func: relax.Function) -> relax.Function:
        self.uses = _var_uses(func)
        return relax.analysis.remove_all_unused(self.visit_expr(func))


def fold_inference_batchnorm() -> tvm.transform.Pass:
    """Inference batch norms with constant parameters folded into the convolution before
    them, or into a per-channel multiply-add (module docstring)."""

    @tvm.transform.module_pass(opt_level=0, name="kiln.FoldInferenceBatchNorm")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mutator_ = _FoldInferenceBatchNorm(mod)
        for gvar, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                mutator_.builder_.update_func(gvar, mutator_.fold(func))
        log.debug("inference batch norms folded: %d into a conv, %d as scale/shift",
                  mutator_.into_conv, mutator_.as_scale_shift)
        return mutator_.builder_.get()

    return _pass


__all__ = ["fold_inference_batchnorm"]
