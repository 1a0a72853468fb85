"""QDQ chains around a MatMul/Gemm rewritten into one integer kernel (CPU targets).

A W8A8 model in QDQ form computes each quantized layer in float::

    y = Q(act(DQ(x_q) @ DQ(w_q) + b))          DQ(v) = (v - z) * s,  Q(v) = sat(rne(v / s) + z)

On the backend's own ONNX copy each such chain becomes one internal
``KilnInt8Dense`` node reading ``x_q`` directly (per-tensor ``sx``, ``zx``; weight int8
symmetric, per tensor or per output column). With ``a = x_q`` as uint8 (int8
activations are shifted by +128 and their zero point with them)::

    acc[m, n] = sum_k a[m, k] * w[k, n]                         (u8 x s8 -> s32)
    v[m, n]   = act((acc - comp[n]) * mult[n] + bias[n])        comp[n] = zx * sum_k w[k, n]
    y_q       = sat(rne(v / sy) + zy)                           mult = sx * sw

``act`` is none, Relu or Gelu (erf or tanh form). ``comp`` is an exact int32 constant
(no float cancellation); without a following ``QuantizeLinear`` (or when the float
result has other readers) the kernel writes ``v`` as float32. A layer's output Q then feeds the next
layer's DQ, which the next chain reads through: int8 tensors flow between layers.

The weight is packed here in the layout the target's dot-product instruction reads,
``[N / L, K / G, L, G]`` (:func:`weight_layout`): AVX-512 VNNI ``vpdpbusd`` (L=16,
G=4), AVX2 ``vpmaddubsw + vpmaddwd`` (L=8, G=4) when no pair of weights can saturate
the instruction's int16 sum (``255 * (|w0| + |w1|) <= 32767``), else AVX2 ``vpmaddwd``
on int16 weights (L=8, G=2; exact). ``schedules.int8_dense`` tensorizes it.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import int8_conv, internal_ops
from .int8_epilogue import dumps, match_tail
from .int8_exact_ops import push_quantize
from .int8_layout import channels_last_regions
from .packed_weights import attributes, initializers

logger = logging.getLogger(__name__)

_STANDARD_DOMAINS = ("", "ai.onnx")
_INT8 = (TensorProto.UINT8, TensorProto.INT8)
#: ``KILN_INT8_KERNELS=never`` keeps every chain in QDQ form (A/B timings; default auto).
KERNELS_ENV = "KILN_INT8_KERNELS"
#: int16 saturation bound of vpmaddubsw's pair sums.
_I16_MAX = 32767


@dataclasses.dataclass(frozen=True)
class WeightLayout:
    """``[N / lanes, K / group, lanes, group]`` weights of dtype ``dtype`` (the kernel's
    ``isa`` names the instruction: ``vnni512``, ``avx2_u8s8``, ``avx2_s16``)."""

    isa: str
    lanes: int
    group: int
    dtype: str


VNNI512 = WeightLayout("vnni512", 16, 4, "int8")
AVX2_U8S8 = WeightLayout("avx2_u8s8", 8, 4, "int8")
AVX2_S16 = WeightLayout("avx2_s16", 8, 2, "int16")


def target_isa(target_name: str | None) -> str | None:
    """'vnni512' or 'avx2' for an x86 CPU target that has the instructions, else None."""
    if target_name is None:
        return None
    from tvm.target.codegen import target_has_features

    from kiln.backends.tvm.targets import resolve_target

    try:
        resolved = resolve_target(target_name)
        if resolved.family != "cpu":
            return None
        target = resolved.tvm_target()
        if target_has_features("avx512vnni", target) and target_has_features("avx512bw", target):
            return "vnni512"
        if target_has_features("avx2", target):
            return "avx2"
    except Exception:  # noqa: BLE001 - a target LLVM cannot query gets no integer kernels
        logger.debug("no integer kernels for target %r", target_name, exc_info=True)
    return None


def weight_layout(isa: str, w: np.ndarray) -> WeightLayout:
    """The packed layout for ``w`` [K, N] int8 on ``isa`` (AVX2: u8s8 only when safe)."""
    if isa == "vnni512":
        return VNNI512
    k = w.shape[0]
    pairs = np.abs(w.astype(np.int32)).reshape(k // 2, 2, -1).sum(axis=1)
    return AVX2_U8S8 if int(pairs.max(initial=0)) * 255 <= _I16_MAX else AVX2_S16


def pack_weight(w: np.ndarray, layout: WeightLayout) -> np.ndarray:
    """``w`` [K, N] as ``[N / L, K / G, L, G]``: ``p[j, i, l, g] = w[i*G + g, j*L + l]``."""
    k, n = w.shape
    lanes, group = layout.lanes, layout.group
    packed = w.reshape(k // group, group, n // lanes, lanes).transpose(2, 0, 3, 1)
    return np.ascontiguousarray(packed).astype(layout.dtype)


@dataclasses.dataclass
class _Chain:
    node: onnx.NodeProto          # the MatMul/Gemm
    x_q: str
    sx: float
    zx: int
    x_signed: bool
    w: np.ndarray                 # [K, N] int8
    sw: np.ndarray                # [N] float
    bias: np.ndarray              # [N] float
    activation: str               # "", "relu", "gelu", "gelu_tanh"
    last: onnx.NodeProto          # the node whose output the kernel replaces
    out_scale: float | None = None
    out_zero: int = 0
    out_dtype: str = "float32"
    absorbed: list = dataclasses.field(default_factory=list)
    nchw: bool = False            # a Conv: channels on axis 1 (transposed around)
    conv: dict | None = None      # a KxK / strided / depthwise Conv's geometry (int8_conv)
    program: list = dataclasses.field(default_factory=list)  # the elementwise tail


class ChainGraph:
    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.inits = initializers(graph)
        self.producer = {o: n for n in graph.node for o in n.output}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for name in n.input:
                self.readers.setdefault(name, []).append(n)
        self.outputs = {o.name for o in graph.output}

    def const(self, name: str) -> np.ndarray | None:
        """An initializer's or a ``Constant`` node's value; None for anything computed."""
        t = self.inits.get(name)
        if t is None:
            node = self.producer.get(name)
            if node is None or node.domain not in _STANDARD_DOMAINS:
                return None
            if node.op_type == "QuantizeLinear":
                return self._quantized_constant(node)
            if node.op_type != "Constant":
                return None
            t = next((a.t for a in node.attribute if a.name == "value"), None)
        return None if t is None else numpy_helper.to_array(t)

    def _quantized_constant(self, node: onnx.NodeProto) -> np.ndarray | None:
        """``QuantizeLinear`` of a float constant (ORT's QDQ form may keep weights float),
        evaluated as ONNX does: ``sat(rne(x / s) + z)`` in float32, per tensor or axis."""
        x, s = self.const(node.input[0]), self.const(node.input[1])
        z = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        attrs = attributes(node)
        if x is None or s is None or x.dtype != np.float32 or attrs.get("block_size"):
            return None
        z = np.zeros(s.shape, np.uint8) if z is None else z
        if z.dtype not in (np.uint8, np.int8):
            return None
        if s.size > 1:
            shape = [1] * x.ndim
            shape[attrs.get("axis", 1) % x.ndim] = s.size
            s, z = s.reshape(shape), z.reshape(shape)
        info = np.iinfo(z.dtype)
        q = np.rint(x / s.astype(np.float32)) + z.astype(np.float32)
        return np.clip(q, info.min, info.max).astype(z.dtype)

    def const_tensor(self, name: str) -> TensorProto | None:
        """The TensorProto of :meth:`const` (its element type: uint8 vs int8 zero points)."""
        if name in self.inits:
            return self.inits[name]
        node = self.producer.get(name)
        if node is None or node.op_type != "Constant":
            return None
        return next((a.t for a in node.attribute if a.name == "value"), None)

    def only_reader(self, name: str) -> onnx.NodeProto | None:
        users = self.readers.get(name, [])
        if len(users) != 1 or name in self.outputs:
            return None
        return users[0]

    def dq(self, name: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        if node is None or node.op_type != "DequantizeLinear" or node.domain not in _STANDARD_DOMAINS:
            return None
        if attributes(node).get("block_size"):
            return None
        return node


def _scalar(array: np.ndarray | None) -> float | None:
    if array is None or array.size != 1:
        return None
    return array.reshape(-1)[0].item()


def _activation(g: ChainGraph, a_name: str):
    """(x_q, sx, zx, signed) of a per-tensor ``DequantizeLinear`` feeding ``a_name``."""
    dq = g.dq(a_name)
    if dq is None or len(dq.input) < 3 or not dq.input[2]:
        return None
    sx, zx_t = _scalar(g.const(dq.input[1])), g.const_tensor(dq.input[2])
    if sx is None or zx_t is None or zx_t.data_type not in _INT8 or sx <= 0:
        return None
    zx = int(_scalar(numpy_helper.to_array(zx_t)))
    return dq.input[0], float(sx), zx, zx_t.data_type == TensorProto.INT8


def _weight(g: ChainGraph, b_name: str, transposed: bool):
    """(w [K, N] int8, sw [N]) of a symmetric int8 ``DequantizeLinear`` on a constant."""
    dq = g.dq(b_name)
    if dq is None or g.only_reader(b_name) is None:
        return None
    w, sw = g.const(dq.input[0]), g.const(dq.input[1])
    if w is not None and w.ndim == 4 and transposed and w.shape[2:] == (1, 1):
        w = w.reshape(w.shape[:2])  # a 1x1 conv's [N, C, 1, 1]
    if w is None or sw is None or w.dtype != np.int8 or w.ndim != 2:
        return None
    if len(dq.input) > 2 and dq.input[2]:
        zw = g.const(dq.input[2])
        if zw is None or np.any(zw != 0):
            return None
    n_axis = 0 if transposed else 1
    if sw.size != 1:
        axis = attributes(dq).get("axis", 1)
        if sw.ndim != 1 or axis % 2 != n_axis or sw.size != w.shape[n_axis]:
            return None
    w = w.T if transposed else w
    sw = np.broadcast_to(sw.reshape(-1).astype(np.float32), (w.shape[1],))
    if np.any(sw <= 0):
        return None
    return np.ascontiguousarray(w), sw.copy()


def _conv_weight(g: ChainGraph, name: str):
    """(w [N, C/g, KH, KW] int8, sw [N]) of a symmetric int8 ``DequantizeLinear``
    (per tensor or per output channel) on a constant conv weight."""
    dq = g.dq(name)
    if dq is None or g.only_reader(name) is None:
        return None
    w, sw = g.const(dq.input[0]), g.const(dq.input[1])
    if w is None or sw is None or w.dtype != np.int8 or w.ndim != 4:
        return None
    if len(dq.input) > 2 and dq.input[2]:
        zw = g.const(dq.input[2])
        if zw is None or np.any(zw != 0):
            return None
    if sw.size != 1 and (sw.ndim != 1 or attributes(dq).get("axis", 1) % 4 != 0
                         or sw.size != w.shape[0]):
        return None
    sw = np.broadcast_to(sw.reshape(-1).astype(np.float32), (w.shape[0],))
    if np.any(sw <= 0):
        return None
    return w, sw.copy()


def _pointwise_conv(node: onnx.NodeProto) -> bool:
    """A Conv that is a matmul over channels: 1x1, stride 1, no padding, one group."""
    attrs = attributes(node)
    return (list(attrs.get("kernel_shape", [1, 1])) == [1, 1] and attrs.get("group", 1) == 1
            and all(v == 1 for v in attrs.get("strides", [1, 1]))
            and all(v == 1 for v in attrs.get("dilations", [1, 1]))
            and not any(attrs.get("pads", [0, 0, 0, 0]))
            and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET", b"VALID", "VALID"))


def _match(g: ChainGraph, node: onnx.NodeProto) -> _Chain | None:
    if node.domain not in _STANDARD_DOMAINS or node.op_type not in ("MatMul", "Gemm", "Conv"):
        return None
    transposed = False
    bias = None
    conv = None
    if node.op_type == "Conv":
        transposed = True
        found = _conv_weight(g, node.input[1])
        if not _pointwise_conv(node) or found is not None and (
                found[0].shape[0] % VNNI512.lanes or found[0].shape[1] % 4):
            # KxK, strided, depthwise; or a 1x1 whose N or C the dense kernel cannot
            # tile (the conv form pads them)
            if found is None:
                return None
            conv, why = int8_conv.geometry(node, found[0])
            if conv is None:
                logger.debug("Conv %s stays in QDQ form: %s", node.name, why)
                return None
        if len(node.input) > 2 and node.input[2]:
            bias = g.const(node.input[2])
            if bias is None or bias.dtype != np.float32 or bias.ndim != 1:
                return None
    if node.op_type == "Gemm":
        attrs = attributes(node)
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            return None
        transposed = bool(attrs.get("transB", 0))
        if len(node.input) > 2 and node.input[2]:
            bias = g.const(node.input[2])
            if bias is None or bias.dtype != np.float32 or bias.ndim > 1:
                return None
    act = _activation(g, node.input[0])
    if conv is not None:
        w4, sw = _conv_weight(g, node.input[1])
        conv["channels"] = int(w4.shape[0] if conv["mode"] == "depthwise" else w4.shape[1])
        weight = (int8_conv.depthwise_weight(w4) if conv["mode"] == "depthwise"
                  else int8_conv.gemm_weight(w4)), sw
    else:
        weight = _weight(g, node.input[1], transposed)
    if act is None or weight is None:
        return None
    w, sw = weight
    n = w.shape[1]
    chain = _Chain(node=node, x_q=act[0], sx=act[1], zx=act[2], x_signed=act[3], w=w, sw=sw,
                   bias=np.zeros(n, np.float32), activation="", last=node,
                   nchw=node.op_type == "Conv", conv=conv)
    if bias is not None:
        chain.bias = np.broadcast_to(bias.reshape(-1), (n,)).astype(np.float32)
    out = node.output[0]
    nxt = g.only_reader(out)
    if bias is None and node.op_type == "MatMul" and nxt is not None and nxt.op_type == "Add":
        other = nxt.input[1] if nxt.input[0] == out else nxt.input[0]
        b = g.const(other)
        if b is not None and b.dtype == np.float32 and b.size in (1, n) and b.ndim <= 1:
            chain.bias = np.broadcast_to(b.reshape(-1), (n,)).astype(np.float32)
            chain.absorbed.append(nxt)
            chain.last, out = nxt, nxt.output[0]
            nxt = g.only_reader(out)
    activation = _activation_of(nxt)
    if activation:
        chain.activation = activation
        chain.absorbed.append(nxt)
        chain.last, out = nxt, nxt.output[0]
        nxt = g.only_reader(out)
    program, tail, result = match_tail(g, out)
    if program:
        chain.program = program
        chain.absorbed += tail
        chain.last, out = tail[-1], result
        nxt = g.only_reader(out)
    if nxt is not None and nxt.op_type == "QuantizeLinear" and len(nxt.input) > 2 and nxt.input[2] \
            and not attributes(nxt).get("block_size"):
        sy, zy_t = _scalar(g.const(nxt.input[1])), g.const_tensor(nxt.input[2])
        if sy is not None and sy > 0 and zy_t is not None and zy_t.data_type in _INT8 \
                and attributes(nxt).get("saturate", 1):
            chain.out_scale, chain.out_zero = float(sy), int(_scalar(numpy_helper.to_array(zy_t)))
            chain.out_dtype = "int8" if zy_t.data_type == TensorProto.INT8 else "uint8"
            chain.absorbed.append(nxt)
            chain.last = nxt
    return chain


def _activation_of(node: onnx.NodeProto | None) -> str:
    """The epilogue activation a node is ("relu", "gelu", "gelu_tanh"), else ""."""
    if node is None or node.domain not in _STANDARD_DOMAINS:
        return ""
    if node.op_type == "Relu":
        return "relu"
    if node.op_type == "Gelu":
        return "gelu_tanh" if attributes(node).get("approximate", b"none") in (b"tanh", "tanh") \
            else "gelu"
    return ""


def _refusal(chain: _Chain, isa: str) -> str | None:
    k, n = chain.w.shape
    if chain.conv is not None and chain.conv["mode"] == "depthwise":
        # the window rule vectorizes over channels: 16 or 8 int32 lanes
        return f"C={n} is not a multiple of 8" if n % 8 else None
    if chain.conv is not None:
        return None  # C padded to 4 (int8_conv.gemm_weight)
    if k % 4:
        return f"K={k} is not a multiple of 4"
    return None  # N padded to the lanes (int8_conv.pad_columns)


def rewrite_int8_chains(model: onnx.ModelProto, target_name: str | None) -> int:
    """Replace each QDQ MatMul/Gemm chain by one ``KilnInt8Dense`` node (in place).

    Only for x86 CPU targets with VNNI or AVX2 (:func:`target_isa`) unless
    ``KILN_INT8_KERNELS=never``; returns how many
    chains were rewritten. A chain whose shapes the kernel cannot take stays in QDQ form
    (logged at DEBUG with the reason).
    """
    isa = target_isa(target_name)
    if isa is None or os.environ.get(KERNELS_ENV, "auto") == "never":
        return 0
    graph = model.graph
    g = ChainGraph(graph)
    replaced: dict[int, onnx.NodeProto] = {}
    dropped: set[int] = set()
    new_inits: list[TensorProto] = []
    for index, node in enumerate(list(graph.node)):
        chain = _match(g, node)
        if chain is None:
            continue
        reason = _refusal(chain, isa)
        if reason is not None:
            logger.debug("%s %s stays in QDQ form: %s", node.op_type, node.name, reason)
            continue
        new_nodes, tensors = _kernel_nodes(chain, isa,
                                           f"{node.name or node.op_type}__kiln_int8_{index}")
        replaced[id(chain.last)] = new_nodes
        dropped.update(id(n) for n in [chain.node, *chain.absorbed] if n is not chain.last)
        new_inits += tensors
    if not replaced:
        return 0
    keep = []
    for node in graph.node:
        if id(node) in replaced:
            keep.extend(replaced[id(node)])
        elif id(node) not in dropped:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(new_inits)
    push_quantize(graph)
    cancel_transposes(graph)
    channels_last_regions(graph, _opset(model))
    if not any(o.domain == internal_ops.DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(internal_ops.DOMAIN, 1))
    logger.info("%d QDQ MatMul/Gemm/1x1-Conv chain(s) -> integer kernels (%s)", len(replaced),
                isa)
    return len(replaced)


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in _STANDARD_DOMAINS), 13)


def _kernel_nodes(chain: _Chain, isa: str, prefix: str):
    """The internal node (a conv's between NCHW <-> NHWC transposes) and its constants."""
    w, sw, bias = chain.w, chain.sw, chain.bias
    depthwise = chain.conv is not None and chain.conv["mode"] == "depthwise"
    if not depthwise:
        lanes = VNNI512.lanes if isa == "vnni512" else AVX2_U8S8.lanes
        w, sw, bias = int8_conv.pad_columns(lanes, w, sw, bias)
    layout = weight_layout(isa, w) if not depthwise else None
    zx = chain.zx + (128 if chain.x_signed else 0)
    comp = (zx * w.astype(np.int64).sum(axis=0)).astype(np.int32)
    mult = np.float64(chain.sx) * sw.astype(np.float64)
    packed = w if depthwise else pack_weight(w, layout)
    tensors = [numpy_helper.from_array(packed, prefix + "_w"),
               numpy_helper.from_array(comp, prefix + "_comp"),
               numpy_helper.from_array(mult.astype(np.float32), prefix + "_mult"),
               numpy_helper.from_array(bias.astype(np.float32), prefix + "_bias")]
    x, y = chain.x_q, chain.last.output[0]
    nodes = []
    if chain.nchw:
        x, y = prefix + "_nhwc", prefix + "_y_nhwc"
        nodes.append(helper.make_node("Transpose", [chain.x_q], [x], name=prefix + "_to_nhwc",
                                      perm=list(_TO_NHWC)))
    common = {"x_signed": int(chain.x_signed), "activation": chain.activation,
              "out_dtype": chain.out_dtype, "out_scale": float(chain.out_scale or 0.0),
              "out_zero": chain.out_zero}
    if chain.program:
        common["epilogue"] = dumps(chain.program)
    if chain.conv is not None:
        conv = chain.conv
        nodes.append(helper.make_node(
            internal_ops.INT8_CONV, [x, *(t.name for t in tensors)], [y], name=prefix,
            domain=internal_ops.DOMAIN, mode=conv["mode"], kernel=conv["kernel"],
            strides=conv["strides"], dilations=conv["dilations"], pads=conv["pads"],
            zx=int(chain.zx), isa=layout.isa if layout else isa, n=int(chain.w.shape[1]),
            **common))
    else:
        nodes.append(helper.make_node(
            internal_ops.INT8_DENSE, [x, *(t.name for t in tensors)], [y],
            name=prefix, domain=internal_ops.DOMAIN, isa=layout.isa, k=int(w.shape[0]),
            n=int(w.shape[1]), columns=int(chain.w.shape[1]), **common))
    if chain.nchw:
        nodes.append(helper.make_node("Transpose", [y], [chain.last.output[0]],
                                      name=prefix + "_to_nchw", perm=list(_TO_NCHW)))
    return nodes, tensors


_TO_NHWC = (0, 2, 3, 1)
_TO_NCHW = (0, 3, 1, 2)


def cancel_transposes(graph: onnx.GraphProto) -> int:
    """Drop NCHW -> NHWC transposes of an integer kernel's NHWC -> NCHW output (the next
    integer conv reads the NHWC tensor itself); the NCHW copy stays only if something
    else reads it. Returns how many were dropped."""
    producer = {o: n for n in graph.node for o in n.output}
    rename: dict[str, str] = {}
    drop: set[int] = set()
    for node in graph.node:
        if node.op_type != "Transpose" or list(attributes(node).get("perm", [])) != list(_TO_NHWC):
            continue
        first = producer.get(node.input[0])
        if first is None or first.op_type != "Transpose" \
                or list(attributes(first).get("perm", [])) != list(_TO_NCHW) \
                or not first.name.endswith("_to_nchw"):
            continue
        rename[node.output[0]] = first.input[0]
        drop.add(id(node))
    if not drop:
        return 0
    outputs = {o.name for o in graph.output}
    keep = []
    for node in graph.node:
        if id(node) in drop:
            continue
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        keep.append(node)
    while True:  # the NCHW copies nothing reads any more, and the activation DQs on them
        read = {name for n in keep for name in n.input} | outputs
        dead = [n for n in keep if n.output[0] not in read and (
            n.op_type == "DequantizeLinear" or n.op_type == "Transpose"
            and n.name.endswith("_to_nchw"))]
        if not dead:
            break
        keep = [n for n in keep if all(n is not d for d in dead)]
    del graph.node[:]
    graph.node.extend(keep)
    return len(drop)
