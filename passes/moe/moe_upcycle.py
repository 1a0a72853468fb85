"""moe_upcycle: a dense FFN f(x) = act(x W1 + b1) W2 + b2 becomes a MoE layer of
``experts`` copies of f with a new router (seeded N(0, router_std^2) weights), softmax
gate, top-k, renormalized (sparse upcycling):

    y = sum_{j<k} v_j f(x),  sum_j v_j = 1   =>   y = f(x)

so the rewrite is exact (float32 tolerance) whatever the router; fine-tuning then lets the
experts diverge. Written in the documented top-k form (docs/moe.md).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from pydantic import Field

from kiln.compiler.core import graph as kir
from kiln.compiler.core.pass_api import Candidate, PassConfig
from kiln.passes.moe.emit import MIN_OPSET, MOE_KEY, model_opset
from kiln.passes.moe.form import (
    ACTIVATION_OPS,
    Expert,
    MoeLayer,
    bias_after,
    recognize,
    weighted_matmul,
)
from kiln.passes.moe.layer_pass import MoeLayerPass


class MoeUpcycleConfig(PassConfig):
    """Options of ``moe_upcycle``."""

    experts: int = Field(default=8, ge=2, description="copies of the FFN")
    k: int = Field(default=2, ge=1, description="experts per token")
    router_std: float = Field(default=0.02, ge=0.0, description="router weight init scale")
    seed: int = 0


def _single_user(value: ir.Value) -> ir.Node | None:
    users = [n for n, _ in value.uses()]
    return users[0] if len(users) == 1 and not value.is_graph_output() else None


def _activation(value: ir.Value) -> tuple[str, ir.Value, list[ir.Node]] | None:
    """(activation, its output, its nodes) for a one-op activation or SiLU = x sigmoid(x)."""
    users = [n for n, _ in value.uses()]
    if value.is_graph_output():
        return None
    if len(users) == 1 and users[0].op_type in ("Relu", "Gelu", "Tanh"):
        return ACTIVATION_OPS[users[0].op_type], users[0].outputs[0], users
    if len(users) == 2 and {u.op_type for u in users} == {"Sigmoid", "Mul"}:
        sig = next(u for u in users if u.op_type == "Sigmoid")
        mul = next(u for u in users if u.op_type == "Mul")
        if _single_user(sig.outputs[0]) is mul:
            return "silu", mul.outputs[0], [sig, mul]
    return None


def find_ffn(node: ir.Node) -> tuple[ir.Value, ir.Value, tuple[ir.Node, ...], Expert, str] | str:
    """(x, y, nodes, expert, activation) of the dense FFN whose first layer is ``node``."""
    first = weighted_matmul(node)
    if first is None or first[0].ndim != 2:
        return "not a MatMul/Gemm with a constant 2-D weight"
    h, b1 = bias_after(node)
    nodes = [node] + ([h.producer()] if h.producer() is not node else [])
    act = _activation(h)
    if act is None:
        return "not followed by a Relu/Gelu/Tanh/SiLU activation"
    activation, a, act_nodes = act
    second_node = _single_user(a)
    second = weighted_matmul(second_node) if second_node is not None else None
    if second is None or second[0].ndim != 2:
        return "the activation does not feed one MatMul/Gemm with a constant weight"
    y, b2 = bias_after(second_node)
    nodes += act_nodes + [second_node] + ([y.producer()] if y.producer() is not second_node
                                          else [])
    b1 = _sum(first[1], b1)
    b2 = _sum(second[1], b2)
    expert = Expert(first[0], second[0], None if b1 is None else b1.reshape(-1),
                    None if b2 is None else b2.reshape(-1))
    return node.inputs[0], y, tuple(nodes), expert, activation


def _sum(a, b):
    if a is None:
        return b
    return a if b is None else a + b


class MoeUpcycle(MoeLayerPass):
    """Dense FFN -> E identical experts + router (exact)."""

    name = "moe_upcycle"
    config_class = MoeUpcycleConfig
    exact = True

    def candidates(self, model: ir.Model) -> list[Candidate]:
        inside = {id(n) for _, layer in recognize(model) if isinstance(layer, MoeLayer)
                  for n in layer.nodes}
        found = []
        taken: set[int] = set()
        opset = model_opset(model)
        rng = np.random.default_rng(self.config.seed)
        c = self.config
        for node in self.selected_nodes(model):
            if node.op_type not in ("MatMul", "Gemm") or id(node) in taken:
                continue
            label = kir.node_label(node)
            if id(node) in inside or MOE_KEY in node.metadata_props:
                found.append(Candidate(node, label, reason="already inside a MoE layer"))
                continue
            ffn = find_ffn(node)
            if isinstance(ffn, str):
                continue  # a plain MatMul: not an FFN's first layer
            x, y, nodes, expert, activation = ffn
            if opset < MIN_OPSET:
                found.append(Candidate(node, label, reason=f"model opset {opset} < {MIN_OPSET}"))
                continue
            if c.k > c.experts:
                found.append(Candidate(node, label, reason=f"k={c.k} > experts={c.experts}"))
                continue
            taken.update(id(n) for n in nodes)
            dim = expert.w1.shape[0]
            router = rng.normal(0.0, c.router_std, (dim, c.experts))
            layer = MoeLayer(x=x, y=y, nodes=nodes, router_w=router, router_b=None,
                             gate="softmax", k=c.k, renormalize=True, activation=activation,
                             experts=[expert] * c.experts, dispatch="per-expert",
                             dtype=kir.constant_tensor(node.inputs[1]).numpy().dtype)
            found.append(Candidate(node, f"{label}: FFN {dim}->{expert.w1.shape[1]}->"
                                         f"{expert.w2.shape[1]} -> {c.experts} experts, top-{c.k}",
                                   nodes=nodes, data=layer))
        return found
