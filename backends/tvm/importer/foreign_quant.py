"""Quantized forms other tools write, rewritten before import onto kiln's QDQ kernels.

ONNX Runtime's quantizers write three forms besides QDQ; each node of the main graph
becomes standard ``DequantizeLinear`` -> float op -> ``QuantizeLinear`` (in place, on the
backend's copy), so it reaches the kernels of kiln's own int8 and int4 passes (int8_dense
for a static int8 MatMul, the weight decoded inside the kernel by decode_conv /
decode_contraction, the fused int4 GEMV). ``axis`` is written only for a per-channel scale
(opsets 10-12 have none); a per-channel rewrite (opset 13) or MatMulNBits' blocked
``DequantizeLinear`` (21) first raises the model with kiln's opset upgrader. Float16 scales
are cast to float32: ORT's QLinear kernels requantize in float32.

- QOperator (``quantize_static(quant_format=QOperator)``): ``QLinearConv``,
  ``QLinearMatMul``, com.microsoft ``QLinearAdd``/``Mul``/``Concat``/``Sigmoid``/
  ``LeakyRelu``/``Softmax``/``Where``/``AveragePool``/``GlobalAveragePool`` and ``QGemm``
  (the ops ORT leaves on uint8 tensors, MaxPool, Reshape, Transpose, ..., need nothing).
  ``y = Q(op(DQ(x), DQ(w)) + b)`` with the int32 bias folded to float:
  ``b = B * sx * sw`` (QGemm: ``C * alpha * sa * sb``).
  ORT requantizes ``acc * (sx * sw / sy)`` and rounds half to even, saturating;
  ``QuantizeLinear`` rounds and saturates the same way, on the float sum, so a value
  that lands on a rounding boundary may differ by one step of ``sy``.
- ``quantize_dynamic``: ``MatMulInteger(a, b, za, zb)`` / ``ConvInteger`` become
  ``Cast<int32>(MatMul(DQ(a, 1, za), DQ(b, 1, zb)))`` (the Cast dropped where only a
  Cast back to float reads it): the float sum of integer products is exact while
  ``|acc| < 2**24`` (K * 255 * 128 < 2**24 for K < 513; beyond, the relative error is
  float32's, far below the step of the Mul by scales that follows).
- com.microsoft ``MatMulNBits`` (4 bits, ``block_size``, optional packed uint4 zero
  points, default 8; ``g_idx`` refused): ``B[n, blk, byte]`` holds codes low nibble
  first along K; they become an int4 ``[K, N]`` weight (``code - 8``, no zero point) or
  uint4 with a uint4 ``[K / block, N]`` zero point, read by a blocked ``DequantizeLinear``
  (``axis=0``), which :mod:`.packed_weights` keeps packed for the fused int4 GEMV.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from kiln.compiler.core.errors import LoweringError, PassError
from kiln.compiler.core.opset import BLOCKED_OPSET, PER_AXIS_OPSET, ensure_opset

from .packed_weights import attributes, initializers

logger = logging.getLogger(__name__)

MICROSOFT = "com.microsoft"
#: QOperator elementwise ops: (domain, op) -> the float op between DQ and Q.
_UNARY = {"QLinearSigmoid": "Sigmoid", "QLinearLeakyRelu": "LeakyRelu"}
_BINARY = {"QLinearAdd": "Add", "QLinearMul": "Mul"}


class _Rewriter:
    """Appends the replacement nodes and constants of one node, with unique names."""

    def __init__(self, graph: onnx.GraphProto, node: onnx.NodeProto, index: int,
                 opset: int) -> None:
        self.graph, self.node, self.opset = graph, node, opset
        self.inits = initializers(graph)
        self.prefix = f"{node.name or node.op_type}__kiln_{index}"
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def name(self, what: str) -> str:
        self._count += 1
        return f"{self.prefix}_{what}{self._count}"

    def constant(self, what: str, array: np.ndarray) -> str:
        tensor = numpy_helper.from_array(array, self.name(what))
        self.graph.initializer.append(tensor)
        return tensor.name

    def array(self, name: str) -> np.ndarray:
        if name not in self.inits:
            raise LoweringError(f"{self.node.op_type} node '{self.node.name}': input '{name}' "
                                "must be a constant (an initializer) to be lowered",
                                ops={self.node.op_type: self.node.name})
        return numpy_helper.to_array(self.inits[name])

    def add(self, op: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        output = output or self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [output], name=self.name(op), **attrs))
        return output

    def elem_type(self, name: str) -> int | None:
        if name in self.inits:
            return self.inits[name].data_type
        for value in [*self.graph.input, *self.graph.value_info]:
            if value.name == name:
                return value.type.tensor_type.elem_type
        return None

    def float32(self, scale: str) -> str:
        """``scale`` as float32: ORT's QLinear kernels requantize in float32 whatever the
        scale's type, so a float16 scale must not make the op in between float16."""
        if self.elem_type(scale) in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
            return self.add("Cast", [scale], to=TensorProto.FLOAT)
        return scale

    def dequantize(self, x: str, scale: str, zero_point: str = "",
                   axis: int | None = None) -> str:
        """``axis`` only for a per-channel scale: opsets 10-12 have no such attribute."""
        scale = self.float32(scale)
        return self.add("DequantizeLinear", [x, scale, zero_point] if zero_point else [x, scale],
                        **({} if axis is None else {"axis": axis}))

    def quantize(self, y: str, scale: str, zero_point: str, output: str) -> str:
        scale = self.float32(scale)
        return self.add("QuantizeLinear", [y, scale, zero_point] if zero_point else [y, scale],
                        output)

    def size(self, name: str) -> int | None:
        return _size(self.graph, self.inits, name)

    def weight_axis(self, scale: str, axis: int) -> int | None:
        """The per-channel axis of a weight's scale (None for a scalar scale)."""
        size = self.size(scale)
        if size is None:
            raise LoweringError(f"{self.node.op_type} node '{self.node.name}': the size of "
                                f"scale '{scale}' is unknown (per tensor or per channel?)",
                                ops={self.node.op_type: self.node.name})
        return axis if size > 1 else None

    def float_bias(self, bias: str, scales: list[str], factor: float = 1.0) -> str:
        """An int32 bias in float: ``bias * factor * prod(scales)``, folded when all are
        constants, else a DequantizeLinear by the scales' product (computed in the graph)."""
        if bias in self.inits and all(s in self.inits for s in scales):
            value = self.array(bias).astype(np.float64) * factor
            for scale in scales:
                value = value * self.array(scale).astype(np.float64)
            return self.constant("bias", value.astype(np.float32))
        scale = self.float32(scales[0])
        for other in map(self.float32, scales[1:]):
            scale = self.add("Mul", [scale, other])
        if factor != 1.0:
            scale = self.add("Mul", [scale, self.constant("alpha", np.float32(factor))])
        per_channel = any((self.size(s) or 1) > 1 for s in scales)
        return self.dequantize(bias, scale, axis=0 if per_channel else None)


def _size(graph: onnx.GraphProto, inits: dict, name: str) -> int | None:
    """How many elements ``name`` holds: from its initializer, or the static shape a graph
    input or value_info declares; None when unknown."""
    if name in inits:
        return int(np.prod(inits[name].dims, dtype=np.int64))
    for value in [*graph.input, *graph.value_info]:
        if value.name == name and value.type.tensor_type.HasField("shape"):
            dims = value.type.tensor_type.shape.dim
            if all(d.HasField("dim_value") for d in dims):
                return int(np.prod([d.dim_value for d in dims], dtype=np.int64))
    return None


def _optional(inputs, i: int) -> str:
    return inputs[i] if len(inputs) > i else ""


def _rank(r: _Rewriter, name: str, default: int) -> int:
    if name in r.inits:
        return len(r.inits[name].dims)
    for value in [*r.graph.input, *r.graph.value_info]:
        if value.name == name and value.type.tensor_type.HasField("shape"):
            return len(value.type.tensor_type.shape.dim)
    return default


def _qlinear_conv(r: _Rewriter) -> None:
    x, sx, zx, w, sw, zw, sy, zy, *rest = list(r.node.input) + [""] * 1
    conv_in = [r.dequantize(x, sx, zx), r.dequantize(w, sw, zw, axis=r.weight_axis(sw, 0))]
    if rest and rest[0]:
        conv_in.append(r.float_bias(rest[0], [sx, sw]))
    y = r.add("Conv", conv_in, **attributes(r.node))
    r.quantize(y, sy, zy, r.node.output[0])


def _qlinear_matmul(r: _Rewriter) -> None:
    a, sa, za, b, sb, zb, sy, zy = r.node.input
    rank = _rank(r, b, 2)
    y = r.add("MatMul", [r.dequantize(a, sa, za),
                         r.dequantize(b, sb, zb, axis=r.weight_axis(sb, rank - 1))])
    r.quantize(y, sy, zy, r.node.output[0])


def _qgemm(r: _Rewriter) -> None:
    inputs = list(r.node.input)
    a, sa, za, b, sb, zb = inputs[:6]
    c, sy, zy = _optional(inputs, 6), _optional(inputs, 7), _optional(inputs, 8)
    attrs = attributes(r.node)
    alpha = float(attrs.get("alpha", 1.0))
    trans_b = int(attrs.get("transB", 0))
    gemm_in = [r.dequantize(a, sa, za),
               r.dequantize(b, sb, zb, axis=r.weight_axis(sb, 0 if trans_b else 1))]
    if c:
        gemm_in.append(r.float_bias(c, [sa, sb], alpha))
    gemm_attrs = {"alpha": alpha, "transA": int(attrs.get("transA", 0)), "transB": trans_b}
    if sy:
        y = r.add("Gemm", gemm_in, **gemm_attrs)
        r.quantize(y, sy, zy, r.node.output[0])
    else:
        r.add("Gemm", gemm_in, r.node.output[0], **gemm_attrs)


def _qlinear_unary(r: _Rewriter) -> None:
    x, sx, zx, sy, zy = (list(r.node.input) + [""])[:5]
    y = r.add(_UNARY[r.node.op_type], [r.dequantize(x, sx, zx)], **attributes(r.node))
    r.quantize(y, sy, zy, r.node.output[0])


def _qlinear_softmax(r: _Rewriter) -> None:
    """``opset`` says which Softmax the node means: before 13 the input is coerced to 2-D
    at ``axis`` (written out as Flatten -> Softmax over the last axis -> Reshape back),
    from 13 on one axis; the two agree for the last axis."""
    x, sx, zx, sy, zy = r.node.input
    attrs = attributes(r.node)
    meant = int(attrs.get("opset", r.opset))
    axis = int(attrs.get("axis", -1 if meant >= 13 else 1))
    xf = r.dequantize(x, sx, zx)
    if meant < 13 and axis != -1:
        flat = r.add("Flatten", [xf], axis=axis)
        y = r.add("Reshape", [r.add("Softmax", [flat], axis=1), r.add("Shape", [xf])])
    elif meant >= 13 > r.opset and axis != -1:
        raise LoweringError(f"QLinearSoftmax node '{r.node.name}': opset={meant} with "
                            f"axis={axis} in a model of opset {r.opset}",
                            ops={r.node.op_type: r.node.name})
    else:
        y = r.add("Softmax", [xf], axis=axis)
    r.quantize(y, sy, zy, r.node.output[0])


def _qlinear_average_pool(r: _Rewriter) -> None:
    x, sx, zx, sy, zy = r.node.input
    attrs = attributes(r.node)
    if int(attrs.pop("channels_last", 0)):
        raise LoweringError(f"QLinearAveragePool node '{r.node.name}': channels_last=1 is "
                            "not supported (ORT's quantizer writes channels_last=0)",
                            ops={r.node.op_type: r.node.name})
    y = r.add("AveragePool", [r.dequantize(x, sx, zx)], **attrs)
    r.quantize(y, sy, zy, r.node.output[0])


def _qlinear_where(r: _Rewriter) -> None:
    cond, x, sx, zx, y, sy, zy, sz, zz = r.node.input
    z = r.add("Where", [cond, r.dequantize(x, sx, zx), r.dequantize(y, sy, zy)])
    r.quantize(z, sz, zz, r.node.output[0])


def _qlinear_binary(r: _Rewriter) -> None:
    a, sa, za, b, sb, zb, sy, zy = (list(r.node.input) + [""])[:8]
    y = r.add(_BINARY[r.node.op_type], [r.dequantize(a, sa, za), r.dequantize(b, sb, zb)])
    r.quantize(y, sy, zy, r.node.output[0])


def _qlinear_concat(r: _Rewriter) -> None:
    sy, zy, *triples = r.node.input
    parts = [r.dequantize(*triples[i:i + 3]) for i in range(0, len(triples), 3)]
    y = r.add("Concat", parts, axis=int(attributes(r.node)["axis"]))
    r.quantize(y, sy, zy, r.node.output[0])


def _qlinear_global_average_pool(r: _Rewriter) -> None:
    x, sx, zx, sy, zy = r.node.input
    xf = r.dequantize(x, sx, zx)
    if int(attributes(r.node).get("channels_last", 0)):
        raise LoweringError(f"QLinearGlobalAveragePool node '{r.node.name}': channels_last=1 "
                            "is not supported (ORT's quantizer writes channels_last=0)",
                            ops={r.node.op_type: r.node.name})
    r.quantize(r.add("GlobalAveragePool", [xf]), sy, zy, r.node.output[0])


def _integer_contraction(r: _Rewriter) -> None:
    """MatMulInteger / ConvInteger: the integer result as a float contraction, cast."""
    inputs = list(r.node.input)
    a, b = inputs[0], inputs[1]
    za, zb = _optional(inputs, 2), _optional(inputs, 3)
    is_conv = r.node.op_type == "ConvInteger"

    def shifted(x: str, zero_point: str, axis: int) -> str:
        if not zero_point:
            return r.add("Cast", [x], to=TensorProto.FLOAT)
        size = r.size(zero_point) or 1
        one = r.constant("one", np.ones(size, np.float32) if size > 1 else np.float32(1))
        return r.dequantize(x, one, zero_point, axis=axis if size > 1 else None)

    b_rank = _rank(r, b, 4 if is_conv else 2)
    af = shifted(a, za, 0 if not is_conv else 1)
    bf = shifted(b, zb, 0 if is_conv else b_rank - 1)
    y = r.add("Conv" if is_conv else "MatMul", [af, bf],
              **(attributes(r.node) if is_conv else {}))
    r.add("Cast", [y], r.node.output[0], to=TensorProto.INT32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 bytes -> their 4-bit codes, low nibble first (the last axis doubles)."""
    codes = np.stack([packed & 15, packed >> 4], axis=-1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def _matmul_nbits(r: _Rewriter) -> None:
    inputs = list(r.node.input)
    attrs = attributes(r.node)
    k, n = int(attrs["K"]), int(attrs["N"])
    bits, block = int(attrs.get("bits", 4)), int(attrs["block_size"])
    where = f"MatMulNBits node '{r.node.name}'"
    if bits != 4:
        raise LoweringError(f"{where}: bits={bits} (kiln lowers 4-bit MatMulNBits only)",
                            ops={r.node.op_type: r.node.name})
    if _optional(inputs, 4):
        raise LoweringError(f"{where}: g_idx (act-order) is not supported",
                            ops={r.node.op_type: r.node.name})
    blocks = -(-k // block)
    codes = _nibbles(r.array(inputs[1]).astype(np.uint8).reshape(n, blocks, block // 2))
    codes = codes.reshape(n, blocks * block)[:, :k].T                      # [K, N]
    scale = r.array(inputs[2]).reshape(n, blocks).T.copy()                  # [blocks, N]
    dq_in = []
    zero_point = _optional(inputs, 3)
    if zero_point:
        zp = r.array(zero_point)
        if zp.dtype != np.uint8:
            raise LoweringError(f"{where}: float zero points are not supported (uint8 packed "
                                "zero points are)", ops={r.node.op_type: r.node.name})
        zp = _nibbles(zp.reshape(n, -(-blocks // 2)))[:, :blocks].T         # [blocks, N]
        weight = helper.make_tensor(r.name("w"), TensorProto.UINT4, [k, n],
                                    codes.astype(np.int32).ravel().tolist())
        zp_tensor = helper.make_tensor(r.name("zp"), TensorProto.UINT4, list(zp.shape),
                                       zp.astype(np.int32).ravel().tolist())
        r.graph.initializer.extend([weight, zp_tensor])
        dq_in = [weight.name, r.constant("scale", scale), zp_tensor.name]
    else:
        weight = helper.make_tensor(r.name("w"), TensorProto.INT4, [k, n],
                                    (codes.astype(np.int32) - 8).ravel().tolist())
        r.graph.initializer.append(weight)
        dq_in = [weight.name, r.constant("scale", scale)]
    w = r.add("DequantizeLinear", dq_in, axis=0, block_size=block)
    bias = _optional(inputs, 5)
    if bias:
        r.add("Add", [r.add("MatMul", [r.node.input[0], w]), bias], r.node.output[0])
    else:
        r.add("MatMul", [r.node.input[0], w], r.node.output[0])


#: (domain, op type) -> its rewrite.
REWRITES = {
    ("", "QLinearConv"): _qlinear_conv,
    ("", "QLinearMatMul"): _qlinear_matmul,
    ("", "MatMulInteger"): _integer_contraction,
    ("", "ConvInteger"): _integer_contraction,
    (MICROSOFT, "QGemm"): _qgemm,
    (MICROSOFT, "QLinearConcat"): _qlinear_concat,
    (MICROSOFT, "QLinearGlobalAveragePool"): _qlinear_global_average_pool,
    (MICROSOFT, "MatMulNBits"): _matmul_nbits,
    (MICROSOFT, "QLinearAveragePool"): _qlinear_average_pool,
    (MICROSOFT, "QLinearSoftmax"): _qlinear_softmax,
    (MICROSOFT, "QLinearWhere"): _qlinear_where,
    **{(MICROSOFT, op): _qlinear_unary for op in _UNARY},
    **{(MICROSOFT, op): _qlinear_binary for op in _BINARY},
}


def _key(node: onnx.NodeProto) -> tuple[str, str]:
    return ("" if node.domain in ("", "ai.onnx") else node.domain, node.op_type)


def _drop_int32_round_trips(nodes: list[onnx.NodeProto], ours: set[int],
                            outputs: set[str]) -> list[onnx.NodeProto]:
    """``Cast<float>(Cast<int32>(y))`` -> ``y`` for an integer contraction's float sum read
    only by Casts back to float (ORT's quantize_dynamic writes one after each): ``y`` is
    already an integer, exact while ``|y| < 2**24``, so the round trip only costs a rounding
    epilogue in the contraction's kernel. ``ours``: ids of the nodes the rewrites made."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    replace: dict[int, onnx.NodeProto | None] = {}
    for node in nodes:
        if id(node) not in ours or node.op_type != "Cast" or \
                attributes(node).get("to") != TensorProto.INT32:
            continue
        users = readers.get(node.output[0], [])
        if node.output[0] in outputs or not users or not all(
                u.op_type == "Cast" and attributes(u).get("to") == TensorProto.FLOAT
                for u in users):
            continue
        for user in users:
            replace[id(user)] = helper.make_node("Identity", [node.input[0]], list(user.output),
                                                 name=user.name)
        replace[id(node)] = None
    kept = (replace.get(id(n), n) for n in nodes)
    return [n for n in kept if n is not None]


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every name a node of ``graph`` or of its subgraphs (If/Loop bodies) reads."""
    names: set[str] = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                names |= _names_read(sub)
    return names


#: Per-channel scale / zero-point inputs by op: a DequantizeLinear with ``axis`` needs 13.
_PER_CHANNEL_INPUTS = {"QLinearConv": (4, 5), "QLinearMatMul": (4, 5), "QGemm": (4, 5),
                       "MatMulInteger": (2, 3), "ConvInteger": (2, 3)}


def _needed_opset(graph: onnx.GraphProto) -> int:
    """The opset the rewrite's nodes need: 21 for MatMulNBits' blocked 4-bit
    DequantizeLinear, 13 for a per-channel one, else 10 (any opset with QLinear ops)."""
    inits = initializers(graph)
    needed = 10
    for node in graph.node:
        if _key(node) == (MICROSOFT, "MatMulNBits"):
            return BLOCKED_OPSET
        if _key(node) in REWRITES and any(
                (_size(graph, inits, node.input[i]) or 1) > 1
                for i in _PER_CHANNEL_INPUTS.get(node.op_type, ()) if i < len(node.input)
                and node.input[i]):
            needed = PER_AXIS_OPSET
    return needed


def _raise_opset(model: onnx.ModelProto, needed: int) -> None:
    """Raise ``model`` (in place) to opset ``needed`` with kiln's upgrader (every standard
    node whose operator changed is converted); a node that cannot be converted refuses."""
    upgraded = ir.serde.deserialize_model(model)
    try:
        ensure_opset(upgraded, needed, pass_name="lower_foreign_quant")
    except PassError as error:
        raise LoweringError(f"cannot raise the model to opset {needed} for its quantized "
                            f"ops: {error}") from error
    model.CopyFrom(ir.serde.serialize_model(upgraded))


def lower_foreign_quant(model: onnx.ModelProto) -> int:
    """Rewrite every QOperator / integer / MatMulNBits node of ``model``'s main graph into
    QDQ form (in place, the backend's own copy). Returns how many nodes were rewritten.
    Initializers that only the rewritten nodes read (int32 biases, packed nibbles) go."""
    graph = model.graph
    if not any(_key(node) in REWRITES for node in graph.node):
        return 0
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    needed = _needed_opset(graph)
    if needed > opset:
        _raise_opset(model, needed)
        graph, opset = model.graph, needed
    keep: list[onnx.NodeProto] = []
    ours: set[int] = set()
    replaced_inputs: set[str] = set()
    rewritten = 0
    for index, node in enumerate(graph.node):
        rewrite = REWRITES.get(_key(node))
        if rewrite is None:
            keep.append(node)
            continue
        rewriter = _Rewriter(graph, node, index, opset)
        rewrite(rewriter)
        keep.extend(rewriter.nodes)
        ours.update(id(n) for n in rewriter.nodes)
        replaced_inputs.update(node.input)
        rewritten += 1
    outputs = {value.name for value in graph.output}
    nodes = _drop_int32_round_trips(keep, ours, outputs)
    del graph.node[:]
    graph.node.extend(nodes)
    # an initializer that is also a graph input (IR < 4) stays: its input would dangle
    still_read = _names_read(graph) | outputs | {value.name for value in graph.input}
    unused = [t for t in graph.initializer
              if t.name in replaced_inputs and t.name not in still_read]
    for tensor in unused:
        graph.initializer.remove(tensor)
    logger.info("rewrote %d foreign quantized node(s) into QDQ form", rewritten)
    return rewritten
