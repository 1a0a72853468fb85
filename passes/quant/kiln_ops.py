"""The bodies of the ``kiln`` domain's ops as model-local ONNX functions.

Each op (semantics and names: :mod:`kiln.compiler.core.kiln_domain`) is stored in the
model as a ``FunctionProto`` whose body is standard ops, so ONNX Runtime (which
inlines functions) runs the exact semantics, and ``onnxscript``/``onnx_ir`` inliners
turn it into plain ops for importers that do not know the op. A backend may instead
match the op by (domain ``kiln``, name) and emit a fused kernel.

``kiln.UnpackBits`` is used for int3/int2 weights (then a standard blocked
``DequantizeLinear``) and 1-bit masks and signs. ``kiln.DequantizeTable`` is used for
FP4 E2M1 (codes are the FLOAT4E2M1 bit patterns, stored as UINT4, because ONNX Runtime
1.32 implements neither Cast nor DequantizeLinear for FLOAT4E2M1), kiln's FP4 E3M0 and
binarized weights (table [-1, 1]).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import AttributeProto, TensorProto, helper

from kiln.compiler.core.kiln_domain import DEQUANTIZE_TABLE, DOMAIN, DOMAIN_VERSION, UNPACK_BITS


def _ref(node: onnx.NodeProto, name: str, ref: str, kind: int) -> onnx.NodeProto:
    attr = AttributeProto()
    attr.name, attr.ref_attr_name, attr.type = name, ref, kind
    node.attribute.append(attr)
    return node


def _const(name: str, array) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name],
                            value=onnx.numpy_helper.from_array(np.asarray(array), name))


def _unpack_bits(opset: int) -> onnx.FunctionProto:
    n = helper.make_node
    body = [
        _ref(n("Constant", [], ["shape"]), "value_ints", "shape", AttributeProto.INTS),
        _ref(n("Constant", [], ["bits"]), "value_int", "bits", AttributeProto.INT),
        _const("zero", np.int64(0)), _const("one_u", np.uint64(1)), _const("eight", np.int64(8)),
        _const("minus_one", np.array([-1], np.int64)),
        _const("start", np.array([0], np.int64)), _const("one", np.int64(1)),
        _const("byte_base", np.int64(256)), _const("pad_next", np.array([0, 0, 0, 1], np.int64)),
        n("Unsqueeze", ["bits", "start"], ["bits_1d"]),
        n("Concat", ["minus_one", "bits_1d"], ["rows_shape"], axis=0),
        n("Cast", ["packed"], ["packed64"], to=TensorProto.INT64),
        n("Reshape", ["packed64", "rows_shape"], ["rows"]),                  # [M, bits]
        # code j of a run of 8 starts at bit j*bits: its low byte is rows[:, j*bits // 8],
        # and it ends in that byte or the next (bits <= 8), so a 16-bit word holds it
        # (exact: a 64-bit word summed in ReduceSum loses low bits under ONNX Runtime)
        n("Pad", ["rows", "pad_next"], ["padded"]),                        # [M, bits + 1]
        n("Range", ["zero", "eight", "one"], ["code_index"]),              # 0 .. 7
        n("Mul", ["code_index", "bits"], ["bit_offset"]),                  # 0, b, 2b ... 7b
        n("Div", ["bit_offset", "eight"], ["low_byte"]),
        n("Add", ["low_byte", "one"], ["high_byte"]),
        n("Gather", ["padded", "low_byte"], ["low"], axis=1),              # [M, 8]
        n("Gather", ["padded", "high_byte"], ["high"], axis=1),
        n("Mul", ["high", "byte_base"], ["high_shifted"]),
        n("Add", ["low", "high_shifted"], ["word"]),
        n("Cast", ["word"], ["word_u"], to=TensorProto.UINT64),
        n("Mod", ["bit_offset", "eight"], ["code_shift"]),
        n("Cast", ["code_shift"], ["code_shift_u"], to=TensorProto.UINT64),
        n("BitShift", ["word_u", "code_shift_u"], ["shifted"], direction="RIGHT"),  # [M, 8]
        n("Cast", ["bits"], ["bits_u"], to=TensorProto.UINT64),
        n("BitShift", ["one_u", "bits_u"], ["levels"], direction="LEFT"),
        n("Sub", ["levels", "one_u"], ["mask"]),
        n("BitwiseAnd", ["shifted", "mask"], ["codes_u"]),
        n("Reshape", ["codes_u", "minus_one"], ["flat"]),
        n("ReduceProd", ["shape"], ["count"], keepdims=1),
        n("Slice", ["flat", "start", "count"], ["used"]),
        n("Cast", ["used"], ["used8"], to=TensorProto.UINT8),
        n("Reshape", ["used8", "shape"], ["codes"]),
    ]
    return helper.make_function(DOMAIN, UNPACK_BITS, ["packed"], ["codes"], body,
                                [helper.make_opsetid("", opset)], attributes=["bits", "shape"])


def _dequantize_table(opset: int) -> onnx.FunctionProto:
    n = helper.make_node
    body = [
        _ref(n("Constant", [], ["axis"]), "value_int", "axis", AttributeProto.INT),
        _ref(n("Constant", [], ["block"]), "value_int", "block_size", AttributeProto.INT),
        _const("zero", np.int64(0)), _const("one", np.int64(1)),
        n("Cast", ["codes"], ["index"], to=TensorProto.INT64),
        n("Gather", ["table", "index"], ["values"], axis=0),
        n("Shape", ["codes"], ["shape"]),
        n("Gather", ["shape", "axis"], ["length"], axis=0),
        n("Range", ["zero", "length", "one"], ["positions"]),
        n("Div", ["positions", "block"], ["blocks"]),
        _ref(n("Gather", ["scale", "blocks"], ["scale_full"]), "axis", "axis", AttributeProto.INT),
        n("Mul", ["values", "scale_full"], ["y"]),
    ]
    return helper.make_function(DOMAIN, DEQUANTIZE_TABLE, ["codes", "table", "scale"], ["y"],
                                body, [helper.make_opsetid("", opset)],
                                attributes=["axis", "block_size"])


_BUILDERS = {UNPACK_BITS: _unpack_bits, DEQUANTIZE_TABLE: _dequantize_table}


def ensure_function(model: ir.Model, name: str) -> None:
    """Add the kiln function ``name`` to the model (once) and import the kiln domain."""
    opset = model.opset_imports.get("", 21)
    key = (DOMAIN, name, "")
    if key not in model.functions:
        model.functions[key] = ir.serde.deserialize_function(_BUILDERS[name](opset))
    model.opset_imports[DOMAIN] = DOMAIN_VERSION


def sync_function_opsets(model: ir.Model) -> None:
    """Keep the kiln functions' standard opset equal to the model's (ONNX Runtime checks)."""
    opset = model.opset_imports.get("")
    for (domain, _, _), function in model.functions.items():
        if domain == DOMAIN and opset is not None:
            function.opset_imports[""] = opset

