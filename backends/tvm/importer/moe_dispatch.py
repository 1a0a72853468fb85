"""kiln's top-k MoE dispatch (docs/moe.md "What kiln writes") as one internal op.

The emitted top-k form runs, per expert e, ``NonZero(Equal(indices, e))``, ``GatherND`` of
the chosen rows, the expert's FFN, a gate ``Mul`` and a ``ScatterND`` into zeros, and sums
the E parts. TVM's generic import gives every one of those ops its own kernel (the gathers
and scatters over all tokens, E times). :func:`fuse_moe_dispatch` finds each emitted layer
by its nodes' ``kiln.moe`` metadata and replaces everything after the (renormalized)
``TopK`` by one :data:`.internal_ops.MOE_DISPATCH` node::

    KilnMoeDispatch(x[T, D], values[T, k], indices[T, k], W1[E, D, H], b1[E, H],
                    W2[E, H, D'], b2[E, D'], W3[E, D, H], b3[E, H]) -> y[T, D']

(biases and the GLU's W3/b3 optional: empty input names), attribute ``activation``.
A weight whose column count a tile divides is stored packed, ``[E, N/B, K, B]``
(:func:`column_block`). The
router, its gate and the ``TopK`` stay standard ops; :mod:`.moe_kernels` converts the node
to the sorted, grouped kernels. A layer whose parts do not read as the emitted form (an
unknown activation, a non-float32 weight, a value used outside the layer) is left as it is.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import internal_ops

logger = logging.getLogger(__name__)

#: The node metadata key kiln's MoE emission writes (the layer's prefix).
MOE_KEY = "kiln.moe"
#: Activations the dispatch kernels apply (the emitted form's spellings, docs/moe.md).
ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "none")


@dataclasses.dataclass
class _Expert:
    w1: np.ndarray
    b1: np.ndarray | None
    w2: np.ndarray
    b2: np.ndarray | None
    w3: np.ndarray | None
    b3: np.ndarray | None
    activation: str


@dataclasses.dataclass
class DispatchLayer:
    """One emitted top-k layer: its prefix, the values it reads, its experts."""

    prefix: str
    x: str
    values: str
    indices: str
    output: str
    experts: list[_Expert]

    @property
    def activation(self) -> str:
        return self.experts[0].activation


class _Graph:
    def __init__(self, graph: onnx.GraphProto) -> None:
        self.inits = {t.name: t for t in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                if name:
                    self.readers.setdefault(name, []).append(node)

    def array(self, name: str) -> np.ndarray | None:
        tensor = self.inits.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def node(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None


def _linear_back(g: _Graph, value: str) -> tuple[str, np.ndarray, np.ndarray | None] | None:
    """``(input, W, b)`` when ``value`` is ``MatMul(input, W) [+ b]`` with constant W, b."""
    bias = None
    add = g.node(value, "Add")
    if add is not None:
        bias = g.array(add.input[1])
        if bias is None:
            return None
        value = add.input[0]
    matmul = g.node(value, "MatMul")
    if matmul is None or (w := g.array(matmul.input[1])) is None or w.ndim != 2:
        return None
    return matmul.input[0], w, bias


def _activation_back(g: _Graph, h: str) -> tuple[str, str] | None:
    """``(activation, pre-activation value)`` for the emitted spellings of ``act(l)``."""
    node = g.producer.get(h)
    if node is None:
        return None
    simple = {"Relu": "relu", "Tanh": "tanh", "Gelu": "gelu"}
    if node.op_type in simple:
        return simple[node.op_type], node.input[0]
    if node.op_type == "Mul":
        a, b = node.input
        sig = g.node(b, "Sigmoid")
        if sig is not None and sig.input[0] == a:                       # silu: l * Sigmoid(l)
            return "silu", a
        half, plus = g.node(a, "Mul"), g.node(b, "Add")                 # gelu: (l/2)(1+erf)
        erf = g.node(plus.input[0], "Erf") if plus is not None else None
        scaled = g.node(erf.input[0], "Mul") if erf is not None else None
        if half is not None and scaled is not None and scaled.input[0] == half.input[0]:
            return "gelu", half.input[0]
    return None


def _expert(g: _Graph, y_e: str, x_e: str) -> _Expert | None:
    """The expert FFN producing ``y_e`` from ``x_e`` (FFN or GLU, docs/moe.md)."""
    second = _linear_back(g, y_e)
    if second is None:
        return None
    h, w2, b2 = second
    w3 = b3 = None
    mul = g.node(h, "Mul")
    if mul is not None:
        up = _linear_back(g, mul.input[1])
        if up is not None and up[0] == x_e:                             # GLU: act(.) * up
            _, w3, b3 = up
            h = mul.input[0]
    found = _activation_back(g, h)
    activation, pre = found if found is not None else ("none", h)
    first = _linear_back(g, pre)
    if first is None or first[0] != x_e:
        return None
    _, w1, b1 = first
    if w3 is not None and w3.shape != w1.shape:
        return None
    return _Expert(w1, b1, w2, b2, w3, b3, activation)


def _layer(g: _Graph, prefix: str, nodes: list[onnx.NodeProto]) -> DispatchLayer | None:
    topk = [n for n in nodes if n.op_type == "TopK"]
    scatters = [n for n in nodes if n.op_type == "ScatterND"]
    if len(topk) != 1 or not scatters:
        return None
    indices = topk[0].output[1]
    sums = [n for n in nodes if n.op_type == "Sum"
            and sorted(n.input) == sorted(s.output[0] for s in scatters)]
    final = sums[0] if sums else (scatters[0] if len(scatters) == 1 else None)
    if final is None:
        return None
    x = values = None
    experts = []
    for scatter in scatters:
        mul = g.node(scatter.input[2], "Mul")
        unsq = g.node(mul.input[1], "Unsqueeze") if mul is not None else None
        gate = g.node(unsq.input[0], "GatherND") if unsq is not None else None
        rows = g.node(mul.input[0], "Add") or g.node(mul.input[0], "MatMul") \
            if mul is not None else None
        if gate is None or rows is None:
            return None
        x_e = _first_input(g, rows.output[0])
        gather = g.node(x_e, "GatherND") if x_e else None
        if gather is None or gather.input[1] != scatter.input[1]:
            return None
        if x not in (None, gather.input[0]) or values not in (None, gate.input[0]):
            return None
        x, values = gather.input[0], gate.input[0]
        expert = _expert(g, mul.input[0], x_e)
        if expert is None:
            return None
        experts.append(expert)
    # the experts are numbered by the Equal(indices, e) constant of their NonZero
    order = []
    for scatter in scatters:
        e = _expert_index(g, scatter.input[1], indices)
        if e is None:
            return None
        order.append(e)
    if sorted(order) != list(range(len(scatters))):
        return None
    experts = [experts[order.index(e)] for e in range(len(order))]
    first = experts[0]
    if any(e.activation != first.activation or e.w1.shape != first.w1.shape
           or e.w2.shape != first.w2.shape or (e.b1 is None) != (first.b1 is None)
           or (e.b2 is None) != (first.b2 is None) or (e.w3 is None) != (first.w3 is None)
           or (e.b3 is None) != (first.b3 is None) or e.w1.dtype != np.float32
           for e in experts):
        return None
    return DispatchLayer(prefix, x, values, indices, final.output[0], experts)


def _first_input(g: _Graph, value: str) -> str | None:
    """The activation input of the expert's first MatMul, walking back from its output."""
    node = g.producer.get(value)
    seen = 0
    while node is not None and seen < 16:
        if node.op_type == "GatherND":
            return node.output[0]
        node = g.producer.get(node.input[0])
        seen += 1
    return None


def _expert_index(g: _Graph, rows: str, indices: str) -> int | None:
    """e in ``rows = Transpose(Gather(NonZero(Equal(indices, e)), 0))``."""
    node = g.node(rows, "Transpose")
    node = g.node(node.input[0], "Gather") if node is not None else None
    node = g.node(node.input[0], "NonZero") if node is not None else None
    node = g.node(node.input[0], "Equal") if node is not None else None
    if node is None or node.input[0] != indices:
        return None
    e = g.array(node.input[1])
    return None if e is None or e.size != 1 else int(e.reshape(()))


def _groups(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for prop in node.metadata_props:
            if prop.key == MOE_KEY:
                groups.setdefault(prop.value, []).append(node)
    return groups


def find_dispatch_layers(model: onnx.ModelProto) -> list[DispatchLayer]:
    """The emitted top-k layers of ``model`` that the dispatch kernels can run."""
    g = _Graph(model.graph)
    layers = []
    for prefix, nodes in _groups(model.graph).items():
        layer = _layer(g, prefix, nodes)
        if layer is not None:
            layers.append(layer)
        elif any(n.op_type == "TopK" for n in nodes):
            logger.info("MoE layer %s: not in the emitted top-k form, left to the generic "
                        "import", prefix)
    return layers


def column_block(width: int) -> int:
    """Columns of a packed weight tile: the most of (64, 32, 16) that divide ``width``
    (0: not packed)."""
    return next((b for b in (64, 32, 16) if width % b == 0), 0)


def _stack(name: str, arrays: list[np.ndarray | None]) -> onnx.TensorProto | None:
    """The experts' arrays stacked; a weight ``[E, K, N]`` packed in column tiles as
    ``[E, N / B, K, B]`` (B = :func:`column_block`), so that a kernel's column tile reads
    one contiguous run."""
    if arrays[0] is None:
        return None
    stacked = np.stack(arrays).astype(np.float32)
    if stacked.ndim == 3 and (block := column_block(stacked.shape[2])):
        e, k, n = stacked.shape
        stacked = stacked.reshape(e, k, n // block, block).transpose(0, 2, 1, 3)
    return numpy_helper.from_array(np.ascontiguousarray(stacked), name)


def _remove_dead(graph: onnx.GraphProto, candidates: set[str]) -> None:
    """Drop the candidate nodes (by name) whose outputs nothing reads, until none is left."""
    outputs = {o.name for o in graph.output}
    while True:
        read = {name for n in graph.node for name in n.input} | outputs
        keep = [n for n in graph.node if n.name not in candidates
                or any(o in read for o in n.output if o)]
        if len(keep) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(keep)
    used = {name for n in graph.node for name in n.input} | outputs
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def fuse_moe_dispatch(model: onnx.ModelProto) -> int:
    """Replace each emitted top-k MoE layer's dispatch by one internal op (in place);
    returns how many layers were replaced."""
    layers = find_dispatch_layers(model)
    graph = model.graph
    for layer in layers:
        ex = layer.experts
        tensors = {key: _stack(f"{layer.prefix}_moe_{key}", [getattr(e, key) for e in ex])
                   for key in ("w1", "b1", "w2", "b2", "w3", "b3")}
        inputs = [layer.x, layer.values, layer.indices]
        for key in ("w1", "b1", "w2", "b2", "w3", "b3"):
            tensor = tensors[key]
            if tensor is not None:
                graph.initializer.append(tensor)
            inputs.append(tensor.name if tensor is not None else "")
        while inputs[-1] == "":
            inputs.pop()
        node = helper.make_node(internal_ops.MOE_DISPATCH, inputs, [layer.output],
                                name=f"{layer.prefix}/moe_dispatch", domain=internal_ops.DOMAIN,
                                activation=layer.activation)
        members = {n.name for n in graph.node if n.name
                   and any(p.key == MOE_KEY and p.value == layer.prefix
                           for p in n.metadata_props)}
        position = next(i for i, n in enumerate(graph.node) if layer.output in n.output)
        del graph.node[position]
        graph.node.insert(position, node)
        _remove_dead(graph, members)
        logger.info("MoE layer %s: %d experts, top-k dispatch -> %s", layer.prefix, len(ex),
                    internal_ops.MOE_DISPATCH)
    if layers and not any(o.domain == internal_ops.DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(internal_ops.DOMAIN, 1))
    return len(layers)
