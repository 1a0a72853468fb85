"""Channels-last convolutions for CPU builds: NCHW graphs rewritten to NHWC before legalization.

In NCHW a convolution's output tile (a few output rows x a few vectors of output
channels, the register tile of kiln's contraction rule) is written back with a stride
of H*W floats per channel: scalar stores. In NHWC the output channel is the innermost
dimension, so the same tile is contiguous (vector stores), a 1x1 convolution *is* a
GEMM over ``[H*W, C]``, the input channels a 3x3 window reads are contiguous, and
depthwise convolutions and pooling vectorize over channels.

Relax's ``ConvertLayout`` does the rewrite: every ``conv2d`` becomes NHWC with OHWI
weights (the weight transposes are constants, folded at compile time), the ops between
convolutions follow, and transposes remain only where a layout-unaware op forces one
(in practice at the graph's inputs and outputs). ``conv2d_transpose`` stays NCHW:
TVM 0.27 legalizes it only in that layout. Where TVM's layout inference gives up on a
graph (it does on GoogLeNet's), the convolutions stay NCHW.

Two things stop ``ConvertLayout`` from following an op, and are normalized first:

- an elementwise op whose constant operand has a lower rank than the activation
  (ONNX's ``[C, 1, 1]`` BatchNorm/bias constants), or comes first (the layout of the
  first operand is the one followed): the constant is reshaped to full rank and moved
  second here (:func:`align_constant_ranks`);
- TensorIR kernels emitted by the importer (``call_tir``); kiln's converters emit
  Relax ops instead where it matters (Clip, Sum: :mod:`.lower`).
"""

from __future__ import annotations

import logging

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

log = logging.getLogger(__name__)

#: conv2d's desired (data, weight) layouts on CPU; conv2d_transpose pinned to NCHW.
DESIRED_LAYOUTS = {
    "relax.nn.conv2d": ["NHWC", "OHWI"],
    "relax.nn.conv2d_transpose": ["NCHW", "IOHW"],
}

#: Binary elementwise ops whose operands may be swapped (ConvertLayout follows the first).
_COMMUTATIVE = frozenset({"relax.add", "relax.multiply", "relax.maximum", "relax.minimum"})
#: Binary elementwise ops whose constant operand is aligned to the other's rank.
_BINARY_OPS = frozenset({
    "relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum",
    "relax.minimum", "relax.power",
})


def _rank(expr: relax.Expr) -> int | None:
    ty = getattr(expr, "ty", None)
    ndim = getattr(ty, "ndim", -1) if ty is not None else -1
    return int(ndim) if ndim is not None and int(ndim) >= 0 else None


@mutator
class _AlignConstantRanks(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.aligned = 0

    def visit_call_(self, op: relax.Call) -> relax.Expr:  # noqa: N802 - PyExprMutator's naming
        call = super().visit_call_(op)
        if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op)
                and call.op.name in _BINARY_OPS and len(call.args) == 2):
            return call
        ranks = [_rank(arg) for arg in call.args]
        if None in ranks:
            return call
        full = max(ranks)
        args = list(call.args)
        changed = False
        if call.op.name in _COMMUTATIVE and isinstance(args[0], tvm.ir.GenericConst) \
                and not isinstance(args[1], tvm.ir.GenericConst):
            args.reverse()  # the activation first: its layout is the one followed
            ranks.reverse()
            changed = True
        for n, arg in enumerate(args):
            if isinstance(arg, tvm.ir.GenericConst) and 0 < ranks[n] < full:
                value = arg.value.numpy()
                args[n] = relax.const(value.reshape((1,) * (full - value.ndim) + value.shape),
                                      str(value.dtype))
                changed = True
        if not changed:
            return call
        self.aligned += 1
        return relax.Call(call.op, args, call.attrs, call.ty_args)


#: Elementwise ops evaluated in numpy when all their operands are constants.
_NUMPY_BINARY = {"relax.add": np.add, "relax.subtract": np.subtract,
                 "relax.multiply": np.multiply, "relax.divide": np.divide}
_NUMPY_UNARY = {"relax.sqrt": np.sqrt, "relax.rsqrt": lambda v: np.float32(1) / np.sqrt(v)}


def _static_shape(call: relax.Call) -> list[int] | None:
    ty = call.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return [int(d) for d in ty.shape.values]
    except (TypeError, AttributeError):
        return None


def _fold_in_numpy(call: relax.Call, args: list | None = None) -> np.ndarray | None:
    """The value of ``call`` on constant operands, or None if kiln does not fold it here.

    ``args``: the call's operands with variables bound to constants resolved (default:
    ``call.args`` as they are)."""
    name = call.op.name
    args = list(call.args) if args is None else args
    values = [a.value.numpy() for a in args if isinstance(a, tvm.ir.GenericConst)]
    if name in _NUMPY_BINARY and len(values) == 2 == len(args):
        if values[0].dtype != values[1].dtype or values[0].dtype.kind != "f":
            return None
        return _NUMPY_BINARY[name](values[0], values[1]).astype(values[0].dtype)
    if name in _NUMPY_UNARY and len(values) == 1 == len(args) and values[0].dtype.kind == "f":
        return np.asarray(_NUMPY_UNARY[name](values[0])).astype(values[0].dtype)
    if not values or not isinstance(args[0], tvm.ir.GenericConst):
        return None
    value = values[0]
    if name == "relax.permute_dims":
        axes = call.attrs.axes
        return np.transpose(value, [int(a) for a in axes] if axes is not None else None)
    shape = _static_shape(call)
    if shape is None:
        return None
    if name in ("relax.reshape", "relax.expand_dims", "relax.squeeze"):
        return value.reshape(shape)
    if name == "relax.broadcast_to":
        return np.broadcast_to(value, shape)
    return None


@mutator
class _FoldConstantTransposes(PyExprMutator):
    """Layout ops (transpose, reshape, expand_dims, broadcast) and float arithmetic on
    constants, evaluated in numpy. Relax's FoldConstant builds a kernel for each
    (measured: 10 s for PP-OCR rec's 130 weight transposes)."""

    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.folded = 0

    def _constant_of(self, expr: relax.Expr) -> relax.Expr:
        """``expr``, or the constant a dataflow variable is bound to."""
        if isinstance(expr, relax.Var):
            bound = self.lookup_binding(expr)
            if isinstance(bound, tvm.ir.GenericConst):
                return bound
        return expr

    def visit_call_(self, op: relax.Call) -> relax.Expr:  # noqa: N802 - PyExprMutator's naming
        call = super().visit_call_(op)
        if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) and call.args):
            return call
        args = [self._constant_of(a) for a in call.args]
        folded = _fold_in_numpy(call, args)
        if folded is None:
            return call
        self.folded += 1
        # ascontiguousarray makes a 0-d array 1-d (a scalar Min's broadcast: stack failed)
        contiguous = np.ascontiguousarray(folded).reshape(folded.shape)
        return relax.const(contiguous, str(folded.dtype))


def _function_pass(mutator_cls, name: str) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mutator_ = mutator_cls(mod)
        for gvar, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                mutator_.builder_.update_func(gvar, mutator_.visit_expr(func))
        log.debug("%s: %d calls rewritten", name,
                  getattr(mutator_, "aligned", getattr(mutator_, "folded", 0)))
        return mutator_.builder_.get()

    return _pass


def fold_constant_transposes() -> tvm.transform.Pass:
    """Evaluate layout ops and float arithmetic on constants at compile time, in numpy."""
    return _function_pass(_FoldConstantTransposes, "kiln.FoldConstantTransposes")


def align_constant_ranks() -> tvm.transform.Pass:
    """Reshape low-rank constant operands of elementwise ops to the activation's rank,
    and put the activation first in commutative ones."""
    return _function_pass(_AlignConstantRanks, "kiln.AlignConstantRanks")


def has_conv2d(mod: tvm.IRModule) -> bool:
    """Whether any Relax function of ``mod`` calls ``relax.nn.conv2d``."""
    conv = tvm.ir.Op.get("relax.nn.conv2d")
    found = []

    def visit(node) -> None:
        if isinstance(node, relax.Call) and isinstance(node.op, tvm.ir.Op) and node.op.same_as(conv):
            found.append(node)

    for _, func in mod.functions.items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return bool(found)


def channels_last_convs() -> tvm.transform.Pass:
    """Rewrite the module's 2-D convolutions (and what follows them) to NHWC."""
    align = align_constant_ranks()
    convert = relax.transform.ConvertLayout(DESIRED_LAYOUTS)
    fold = fold_constant_transposes()

    @tvm.transform.module_pass(opt_level=0, name="kiln.ChannelsLastConvs")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if not has_conv2d(mod):
            return mod
        aligned = align(mod)
        try:
            converted = convert(aligned)
        except Exception as err:  # noqa: BLE001 - TVM's layout inference gives up on some graphs
            detail = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            log.info("convolutions stay NCHW (layout conversion failed: %s)", detail)
            return aligned
        return fold(converted)

    return _pass


__all__ = ["DESIRED_LAYOUTS", "align_constant_ranks", "channels_last_convs",
           "fold_constant_transposes", "has_conv2d"]
