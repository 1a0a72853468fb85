"""ONNX ``Expand`` by broadcasting rules on symbolic dims too.

``Expand`` broadcasts its input with the target shape: each output dim is the input's
and the target's, whichever is not 1 (ONNX requires them equal or one of them 1).
TVM 0.27's converter gets two symbolic cases wrong:

- a target shape computed in the graph (``Shape`` of a tensor) whose dim is a
  symbolic expression: TVM broadcasts to the target literally. A torch export of a
  Mixtral-style MoE layer (``index_add`` per expert) expands the selected tokens'
  rows ``[n, 64]`` to ``Shape(zeros[0:1])`` = ``[min(1, tokens), 64]``: TVM wrote
  ``[min(1, tokens), 64]`` (wrong numbers; a segfault when ``n`` is 0);
- a constant target shape over an input with a symbolic dim: TVM's converter reads
  ``.value`` of each input dim and fails (``'Var' object has no attribute 'value'``).

Here each dim follows the rule above; where neither side is known to be 1 and they are
not the same expression, the output dim is ``input if input != 1 else target``.
"""

from __future__ import annotations


def _is_one(dim) -> bool:
    import tvm

    return isinstance(dim, tvm.tirx.IntImm) and dim.value == 1


def broadcast_dim(data_dim, target_dim):
    """The output dim of Expand for one input dim and one target dim (PrimExprs)."""
    import tvm
    import tvm_ffi

    if isinstance(target_dim, tvm.tirx.IntImm) and target_dim.value == -1:
        return data_dim  # not ONNX, but TVM's converter reads -1 as "keep"
    if _is_one(data_dim):
        return target_dim
    if _is_one(target_dim) or isinstance(data_dim, tvm.tirx.IntImm):
        return data_dim  # a known input dim other than 1 is the output's
    if isinstance(target_dim, tvm.tirx.IntImm):
        return target_dim  # the input dim is 1 or equal to it
    if tvm_ffi.structural_equal(data_dim, target_dim):
        return data_dim
    one = tvm.tirx.IntImm("int64", 1)
    return tvm.tirx.Select(data_dim == one, target_dim, data_dim)


def expanded_shape(data_shape: list, target_shape: list) -> list:
    """Expand's output shape, the two shapes right-aligned."""
    import tvm

    rank = max(len(data_shape), len(target_shape))
    one = tvm.tirx.IntImm("int64", 1)
    data = [one] * (rank - len(data_shape)) + list(data_shape)
    target = [one] * (rank - len(target_shape)) + list(target_shape)
    return [broadcast_dim(d, t) for d, t in zip(data, target)]


class SymbolicExpand:
    """``Expand`` with a target shape known at import (a shape expression or a
    constant) over an input of known rank; TVM's converter for the rest."""

    def __init__(self, base) -> None:
        self.base = base

    def get_converter(self, opset: int):
        fallback = self.base.get_converter(opset)

        def convert(bb, inputs, attr, params):
            import tvm
            import tvm_ffi
            from tvm import relax

            data, shape = inputs[0], inputs[1]
            data_shape = getattr(getattr(data, "ty", None), "shape", None)
            if not isinstance(data_shape, relax.ShapeExpr):
                return fallback(bb, inputs, attr, params)
            if isinstance(shape, relax.ShapeExpr):
                target = list(shape.values)
            elif isinstance(shape, tvm.ir.GenericConst) and shape.value.numpy().ndim == 1:
                target = [tvm.tirx.IntImm("int64", int(v)) for v in shape.value.numpy()]
            else:
                return fallback(bb, inputs, attr, params)
            current = list(data_shape.values)
            if any(not isinstance(d, tvm.tirx.IntImm) for d in current + target):
                out = expanded_shape(current, target)
                if len(out) == len(current) and all(
                        tvm_ffi.structural_equal(a, b) for a, b in zip(out, current)):
                    return data
                return relax.op.broadcast_to(data, relax.ShapeExpr(out))
            return fallback(bb, inputs, attr, params)

        return convert
