"""The MoE layer form kiln recognizes (docs/moe.md), as a typed description.

A MoE layer reads one activation x (``[T, D]``, or ``[..., D]`` flattened) and computes

    logits = x Wr + br                     (router: MatMul/Gemm with a constant [D, E] weight)
    p      = softmax(logits / t) | sigmoid(logits / t)          (gate; t: temperature)
    k set: (v, i) = topk(p, k);  v /= sum(v) when renormalized   (softmax(topk(logits))
           is the same as the renormalized top-k of softmax(logits))
    y      = sum_{j<k} v_j f_{i_j}(x)   (top-k)   or   sum_e p_e f_e(x)   (dense mixture)
    f_e(x) = act(x W1_e + b1_e) [* (x W3_e + b3_e)] W2_e + b2_e     (two-layer FFN / GLU)

The experts are recognized whatever the dispatch: per-expert MatMul/Gemm stacks (a
PyTorch loop over experts, with masks, index_add/ScatterND or a dense weighted sum) or one
batched MatMul over a stacked ``[E, D, H]`` weight. Per-expert stacks are numbered in
graph order (the order an exporter writes a loop over experts); the driver's
verification checks every rewrite of a recognized layer against the original.

``recognize(model)`` returns one ``MoeLayer`` (or a refusal reason) per gate found.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np
import onnx_ir as ir

from kiln.compiler.core import graph as kir

GATE_OPS = ("Softmax", "Sigmoid")
#: the node metadata key of the layers kiln's MoE passes write (``emit.emit``): the prefix
MOE_KEY = "kiln.moe"
WEIGHT_OPS = ("MatMul", "Gemm")
#: ops an expert's hidden activation may pass through between its two layers
ACTIVATION_OPS = {"Relu": "relu", "Gelu": "gelu", "Erf": "gelu", "Tanh": "tanh",
                  "Sigmoid": "silu"}
#: ops the router logits may pass through on their way to the gate (no change of value)
NO_EXPERTS = "no expert FFNs found"
#: how many nodes past the first common descendant of gate and experts may be the combine
MAX_COMBINE_TRIES = 64
PASS_THROUGH = ("Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze")


@dataclass
class Expert:
    """One expert: ``act(x W1 + b1) [* (x W3 + b3)] W2 + b2`` (float64 arrays)."""

    w1: np.ndarray                 # [D, H]
    w2: np.ndarray                 # [H, D_out]
    b1: np.ndarray | None = None   # [H]
    b2: np.ndarray | None = None   # [D_out]
    w3: np.ndarray | None = None   # [D, H] (GLU "up" projection)
    b3: np.ndarray | None = None

    def flat(self) -> np.ndarray:
        parts = [self.w1, self.w2] + [a for a in (self.b1, self.b2, self.w3, self.b3)
                                      if a is not None]
        return np.concatenate([a.ravel() for a in parts])


@dataclass
class MoeLayer:
    """A recognized MoE layer: where it is in the graph and what it computes."""

    x: ir.Value
    y: ir.Value
    nodes: tuple[ir.Node, ...]
    router_w: np.ndarray            # [D, E]
    router_b: np.ndarray | None
    gate: str                       # "softmax" | "sigmoid"
    k: int | None                   # None: dense mixture
    renormalize: bool
    activation: str                 # relu | gelu | silu | tanh | identity
    experts: list[Expert]
    dispatch: str                   # "per-expert" | "stacked"
    temperature: float = 1.0
    gate_value: ir.Value | None = field(default=None, repr=False)
    dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))
    #: every node of the layer carries ``kiln.moe``: written by kiln's passes (emit.py), the
    #: form the TVM build lowers to the grouped sparse dispatch (docs/moe.md)
    emitted: bool = False

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def describe(self) -> str:
        e = self.experts[0]
        glu = " GLU" if e.w3 is not None else ""
        routing = f"top-{self.k}{' renormalized' if self.renormalize else ''}" \
            if self.k else "dense mixture"
        return (f"MoE {self.x.name} -> {self.y.name}: {self.num_experts} experts "
                f"(FFN {e.w1.shape[0]}->{e.w1.shape[1]}->{e.w2.shape[1]}, "
                f"{self.activation}{glu}), {self.gate} gate, {routing}, "
                f"{self.dispatch} dispatch")

    def with_(self, **changes) -> MoeLayer:
        return replace(self, **changes)


# -- small graph helpers -------------------------------------------------------------------
def _const(value: ir.Value | None) -> np.ndarray | None:
    tensor = kir.constant_tensor(value)
    return None if tensor is None else tensor.numpy()


def _users(value: ir.Value) -> list[ir.Node]:
    return [node for node, _ in value.uses()]


def _descendants(values: Iterable[ir.Value]) -> set[int]:
    seen: set[int] = set()
    stack = [n for v in values for n in _users(v)]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for out in node.outputs:
            stack.extend(_users(out))
    return seen


def _ancestors(node: ir.Node, stop: ir.Value) -> set[int]:
    seen: set[int] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        for value in n.inputs:
            if value is not None and value is not stop and value.producer() is not None:
                stack.append(value.producer())
    return seen


def weighted_matmul(node: ir.Node) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(W, bias) of a MatMul/Gemm reading an activation times a constant weight, W as
    ``x W`` reads it (Gemm's transB and alpha/beta applied); None if it is not one."""
    if node.op_type not in WEIGHT_OPS or node.domain not in ("", "ai.onnx"):
        return None
    if len(node.inputs) < 2 or _const(node.inputs[0]) is not None:
        return None
    w = _const(node.inputs[1])
    if w is None or w.ndim not in (2, 3) or w.dtype.kind != "f":
        return None
    w = w.astype(np.float64)
    if node.op_type == "MatMul":
        return w, None
    if node.attributes.get_int("transA", 0):
        return None
    if node.attributes.get_int("transB", 0):
        w = w.T
    w = w * node.attributes.get_float("alpha", 1.0)
    c = _const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if len(node.inputs) > 2 and node.inputs[2] is not None and c is None:
        return None
    bias = None if c is None else np.broadcast_to(
        c.astype(np.float64) * node.attributes.get_float("beta", 1.0), (w.shape[-1],)).copy()
    return w, bias


def bias_after(node: ir.Node) -> tuple[ir.Value, np.ndarray | None]:
    """The value after the node's output and a constant bias Add that follows it alone."""
    out = node.outputs[0]
    users = _users(out)
    if len(users) == 1 and users[0].op_type == "Add":
        add = users[0]
        other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
        bias = _const(other)
        if bias is not None and bias.dtype.kind == "f":
            return add.outputs[0], bias.astype(np.float64)
    return out, None


# -- the gate -------------------------------------------------------------------------------
@dataclass
class _Gate:
    router: ir.Node
    gate: ir.Node
    w: np.ndarray
    b: np.ndarray | None
    temperature: float
    k: int | None
    renormalize: bool
    topk: ir.Node | None


def _back(value: ir.Value) -> ir.Value:
    producer = value.producer()
    while producer is not None and producer.op_type in PASS_THROUGH and producer.inputs:
        value = producer.inputs[0]
        producer = value.producer()
    return value


def _router(value: ir.Value) -> tuple[ir.Node, np.ndarray, np.ndarray | None, float] | str:
    """Walk from the gate's input back to the router: (node, W, b, temperature)."""
    value = _back(value)
    temperature = 1.0
    producer = value.producer()
    if producer is not None and producer.op_type in ("Div", "Mul"):
        scalar = _const(producer.inputs[1])
        if scalar is not None and scalar.size == 1 and float(scalar.ravel()[0]) != 0:
            s = float(scalar.ravel()[0])
            temperature = s if producer.op_type == "Div" else 1.0 / s
            value = _back(producer.inputs[0])
            producer = value.producer()
    bias = None
    if producer is not None and producer.op_type == "Add":
        for i in (0, 1):
            c = _const(producer.inputs[1 - i])
            if c is not None and producer.inputs[i].producer() is not None \
                    and producer.inputs[i].producer().op_type in WEIGHT_OPS:
                bias = c.astype(np.float64).ravel()
                producer = producer.inputs[i].producer()
                break
    if producer is None:
        return "the gate does not read a router MatMul/Gemm"
    found = weighted_matmul(producer)
    if found is None or found[0].ndim != 2:
        return "the gate does not read a MatMul/Gemm with a constant [D, E] weight"
    w, gemm_bias = found
    if gemm_bias is not None:
        bias = gemm_bias if bias is None else bias + gemm_bias
    return producer, w, bias, temperature


def _renormalized(values: ir.Value) -> bool:
    """True when the top-k values are divided by their own sum (ReduceSum + Div)."""
    for user in _users(values):
        if user.op_type == "Div" and user.inputs[0] is values:
            divisor = user.inputs[1].producer()
            if divisor is not None and divisor.op_type == "ReduceSum" \
                    and _back(divisor.inputs[0]) is values:
                return True
    return False


def _is_silu(sigmoid: ir.Node) -> bool:
    """x * sigmoid(x): an activation, not a gate."""
    x = sigmoid.inputs[0]
    return any(u.op_type == "Mul" and x in u.inputs for u in _users(sigmoid.outputs[0]))


def _find_gate(gate: ir.Node) -> _Gate | str:
    if gate.op_type == "Sigmoid" and _is_silu(gate):
        return "a SiLU activation"
    if gate.op_type == "Softmax" and gate.attributes.get_int("axis", -1) not in (-1, 1):
        return "softmax is not over the last axis"
    source = _back(gate.inputs[0])
    producer = source.producer()
    if producer is not None and producer.op_type == "TopK" and gate.op_type == "Softmax":
        # softmax over the top-k logits = the renormalized top-k of the softmax
        k = _const(producer.inputs[1])
        router = _router(producer.inputs[0])
        if isinstance(router, str) or k is None:
            return router if isinstance(router, str) else "TopK's k is not a constant"
        return _Gate(router[0], gate, router[1], router[2], router[3], int(k.ravel()[0]),
                     True, producer)
    router = _router(gate.inputs[0])
    if isinstance(router, str):
        return router
    topk = next((u for u in _users(gate.outputs[0]) if u.op_type == "TopK"), None)
    for user in _users(gate.outputs[0]):
        if user.op_type == "Cast":
            topk = topk or next((u for u in _users(user.outputs[0]) if u.op_type == "TopK"),
                                None)
    k = None
    renormalize = False
    if topk is not None:
        kk = _const(topk.inputs[1])
        if kk is None:
            return "TopK's k is not a constant"
        k = int(kk.ravel()[0])
        renormalize = _renormalized(topk.outputs[0])
    return _Gate(router[0], gate, router[1], router[2], router[3], k, renormalize, topk)


# -- the experts ----------------------------------------------------------------------------
def _upstream(value: ir.Value, x: ir.Value, weighted: dict[int, ir.Node],
              skip: set[int]) -> tuple[set[int], set[str], bool]:
    """Weighted matmuls reached walking back from ``value`` (not past them), the activation
    ops passed, and whether x was reached."""
    found: set[int] = set()
    ops: set[str] = set()
    reached_x = False
    seen: set[int] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if v is x:
            reached_x = True
            continue
        node = v.producer()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if id(node) in skip:
            continue
        if id(node) in weighted:
            found.add(id(node))
            continue
        ops.add(node.op_type)
        stack.extend(i for i in node.inputs if i is not None)
    return found, ops, reached_x


def _activation(ops: set[str]) -> str | None:
    acts = {ACTIVATION_OPS[o] for o in ops if o in ACTIVATION_OPS}
    if len(acts) > 1:
        return None
    return acts.pop() if acts else "identity"


def _experts(x: ir.Value, gate: _Gate, region: set[int], order: dict[int, int]
             ) -> tuple[list[Expert], list[ir.Value], str, str] | str:
    weighted = {id(n): n for n in x.graph if id(n) in region and id(n) != id(gate.router)
                and weighted_matmul(n) is not None} if x.graph is not None else {}
    skip = {id(gate.router)}
    firsts: dict[int, ir.Node] = {}
    for key, node in weighted.items():
        found, _, reached = _upstream(node.inputs[0], x, weighted, skip)
        if reached and not found:
            firsts[key] = node
    experts: list[tuple[int, Expert, ir.Value]] = []
    activation = None
    dispatch = "per-expert"
    for key, node in weighted.items():
        if key in firsts:
            continue
        found, ops, _ = _upstream(node.inputs[0], x, weighted, skip)
        if not found or not found <= set(firsts):
            continue
        w2, b2 = weighted_matmul(node)
        out, add_bias = bias_after(node)
        b2 = _sum_bias(b2, add_bias)
        layers = sorted((firsts[f] for f in found), key=lambda n: order[id(n)])
        if len(layers) > 2:
            return f"an expert's second layer reads {len(layers)} first layers"
        act = _activation(ops)
        if act is None or (activation is not None and act != activation):
            return "experts use different or unknown activations"
        activation = act
        parts = []
        for layer in layers:
            w, b = weighted_matmul(layer)
            parts.append((w, _sum_bias(b, bias_after(layer)[1]), layer))
        if len(parts) == 2:
            # GLU: the gate projection is the one whose path to W2 passes the activation
            gated = _gate_projection(parts, node)
            parts.sort(key=lambda p: 0 if p[2] is gated else 1)
        (w1, b1, first), *rest = parts
        w3, b3 = (rest[0][0], rest[0][1]) if rest else (None, None)
        if w1.ndim == 3 or w2.ndim == 3:
            if w1.ndim != 3 or w2.ndim != 3 or w1.shape[0] != w2.shape[0]:
                return "stacked expert weights disagree on the number of experts"
            dispatch = "stacked"
            for e in range(w1.shape[0]):
                experts.append((order[id(first)], Expert(
                    w1[e], w2[e], _slice_bias(b1, e), _slice_bias(b2, e),
                    None if w3 is None else w3[e], _slice_bias(b3, e)), out))
        else:
            experts.append((order[id(first)], Expert(w1, w2, _flat(b1), _flat(b2), w3,
                                                     _flat(b3)), out))
    if not experts:
        return f"{NO_EXPERTS} (MatMul/Gemm stacks reading the router's input)"
    experts.sort(key=lambda item: item[0])
    return [e for _, e, _ in experts], [o for _, _, o in experts], activation or "identity", \
        dispatch


def _gate_projection(parts, second: ir.Node) -> ir.Node:
    """Of a GLU's two first layers, the one whose path to the second layer passes an
    activation (SiLU's Sigmoid, Gelu...) that the other does not."""
    for _, _, layer in parts:
        start = layer.outputs[0]
        between = _descendants([start]) & _ancestors(second, start)
        ops = {n.op_type for n in second.graph if id(n) in between and n is not second}
        others = [p[2] for p in parts if p[2] is not layer]
        other_between = _descendants([others[0].outputs[0]]) & _ancestors(second, start)
        if {n.op_type for n in second.graph if id(n) in between - other_between} \
                & set(ACTIVATION_OPS) and ops:
            return layer
    return parts[0][2]


def _sum_bias(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    if a is None:
        return b
    return a if b is None else a + b


def _flat(b: np.ndarray | None) -> np.ndarray | None:
    return None if b is None else b.reshape(-1)


def _slice_bias(b: np.ndarray | None, e: int) -> np.ndarray | None:
    if b is None:
        return None
    return b.reshape(-1) if b.ndim == 1 else b[e].reshape(-1)


# -- the layer ------------------------------------------------------------------------------
def _combine(x: ir.Value, anchors: list[ir.Value], order: dict[int, int]
             ) -> tuple[ir.Node, set[int]] | str:
    """The combine: the first node (graph order) that every anchor flows into and that
    closes the layer (no intermediate value used past it), with the layer's nodes."""
    common: set[int] | None = None
    for value in anchors:
        d = _descendants([value])
        common = d if common is None else common & d
    if not common:
        return "no node combines the gate with every expert"
    reason = "no node combines the gate with every expert"
    tried = 0
    for node in sorted((n for n in x.graph if id(n) in common), key=lambda n: order[id(n)]):
        # a weighted stack (Mul / Concat) is summed over the expert axis by its one consumer
        while node.op_type in ("Mul", "Concat", "Unsqueeze") \
                and len(_users(node.outputs[0])) == 1 \
                and _users(node.outputs[0])[0].op_type in ("ReduceSum", "Sum", "Concat", "Mul"):
            node = _users(node.outputs[0])[0]
        if len(node.outputs) != 1:
            continue
        region = _region(x, node)
        if not isinstance(region, str):
            return node, region
        reason = region
        tried += 1
        if tried >= MAX_COMBINE_TRIES:
            break
    return reason


def _region(x: ir.Value, out: ir.Node) -> set[int] | str:
    """Nodes computing ``out`` from x, plus constant feeders used only there; a reason when
    an intermediate value is used outside."""
    graph = x.graph
    inside = _descendants([x]) & _ancestors(out, x)
    inside.add(id(out))
    changed = True
    while changed:
        changed = False
        for node in graph:
            if id(node) in inside or not node.outputs:
                continue
            if all(not o.is_graph_output() and o.uses() and
                   all(id(u) in inside for u in _users(o)) for o in node.outputs) \
                    and not (_descendants(node.outputs) & _descendants([x])) - inside:
                if x.producer() is node:
                    continue
                inside.add(id(node))
                changed = True
    for node in graph:
        if id(node) not in inside or node is out:
            continue
        for o in node.outputs:
            if o.is_graph_output() or any(id(u) not in inside for u in _users(o)):
                return f"{o.name or node.op_type} is used outside the MoE layer"
    return inside


def recognize_gate(gate_node: ir.Node) -> MoeLayer | str:
    """The MoE layer around one Softmax/Sigmoid gate, or why it is not one."""
    gate = _find_gate(gate_node)
    if isinstance(gate, str):
        return gate
    graph = gate_node.graph
    x = gate.router.inputs[0]
    order = {id(n): i for i, n in enumerate(graph)}
    region = _descendants([x])
    found = _experts(x, gate, region, order)
    if isinstance(found, str):
        return found
    experts, outs, activation, dispatch = found
    e_count = gate.w.shape[1]
    if len(experts) != e_count:
        return f"the router has {e_count} outputs but {len(experts)} experts were found"
    shapes = {(e.w1.shape, e.w2.shape, e.w3 is None) for e in experts}
    if len(shapes) != 1:
        return "experts have different shapes"
    if gate.k is not None and not 1 <= gate.k <= e_count:
        return f"top-k k={gate.k} is not in 1..{e_count}"
    anchors = [gate.gate.outputs[0], *outs] if dispatch == "per-expert" else \
        [gate.gate.outputs[0], outs[0]]
    combine = _combine(x, anchors, order)
    if isinstance(combine, str):
        return combine
    out, nodes = combine
    dtype = kir.constant_tensor(gate.router.inputs[1]).numpy().dtype
    return MoeLayer(x=x, y=out.outputs[0], nodes=tuple(n for n in graph if id(n) in nodes),
                    router_w=gate.w, router_b=gate.b,
                    gate="softmax" if gate.gate.op_type == "Softmax" else "sigmoid",
                    k=gate.k, renormalize=gate.renormalize, activation=activation,
                    experts=experts, dispatch=dispatch, temperature=gate.temperature,
                    gate_value=gate.gate.outputs[0], dtype=dtype,
                    emitted=all(MOE_KEY in n.metadata_props for n in graph if id(n) in nodes))


def recognize(model: ir.Model, selected=None) -> list[tuple[ir.Node, MoeLayer | str]]:
    """Every Softmax/Sigmoid that reads a router and has experts downstream, with its layer
    or the reason it cannot be one (other softmaxes are not listed)."""
    found = []
    claimed: set[int] = set()
    for node in list(model.graph):
        if node.op_type not in GATE_OPS or id(node) in claimed:
            continue
        if selected is not None and not selected(node):
            continue
        if isinstance(_find_gate(node), str):
            continue  # an attention softmax, a SiLU's Sigmoid...: no router, not a gate
        layer = recognize_gate(node)
        if isinstance(layer, str) and layer.startswith(NO_EXPERTS):
            continue  # a classifier's softmax head: a router-like Gemm but no experts
        if isinstance(layer, MoeLayer):
            claimed.update(id(n) for n in layer.nodes)
        found.append((node, layer))
    return found
