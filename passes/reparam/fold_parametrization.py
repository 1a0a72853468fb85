"""fold_parametrization: a weight computed from constants -> one constant.

Training-time parametrizations export as a little graph in front of the weight input:
weight norm ``W = g * v / ||v||`` (``torch.nn.utils.parametrizations.weight_norm``:
ReduceL2, Div, Mul of the initializers g and v), spectral or orthogonal maps, a
``Transpose``/``Reshape``/``Cast`` of a stored tensor. At inference the result is a
constant, so each such subgraph is evaluated once (ONNX's reference evaluator, through
``kiln.passes.quant.fold_weights.fold_weight_paths``) and replaced by one initializer:
exact, bit for bit what the nodes computed.

A candidate is a node that reads runtime data (at least one input not computable from
constants) and has another input that is computed from constants only; with
``ops`` set only nodes of those op types are folded. A path that reads a random op, a
(de)quantize or a node of another domain is refused by ``fold_weight_paths`` and left.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir
from pydantic import Field

from kiln.compiler.core import graph as kir
from kiln.compiler.core.pass_api import Candidate, KilnPass, PassConfig
from kiln.passes.quant.fold_weights import fold_weight_paths


class FoldParametrizationConfig(PassConfig):
    """Options of ``fold_parametrization``."""

    ops: list[str] | None = Field(default=None, description="op types whose computed inputs "
                                  "are folded (None: every op)")


def _is_leaf(value: ir.Value | None) -> bool:
    return value is None or (value.const_value is not None and not value.is_graph_input())


def _constant_values(model: ir.Model) -> set[int]:
    """ids of the values computable from constants alone (forward, in graph order)."""
    constant: set[int] = set()
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or not node.inputs and node.op_type != "Constant":
            continue
        if all(_is_leaf(v) or id(v) in constant for v in node.inputs):
            constant.update(id(v) for v in node.outputs)
    return constant


class FoldParametrization(KilnPass):
    """Evaluate constant-only subgraphs feeding a node's inputs into one initializer each."""

    name = "fold_parametrization"
    config_class = FoldParametrizationConfig
    exact = True

    def candidates(self, model: ir.Model) -> list[Candidate]:
        constant = _constant_values(model)
        ops = self.config.ops
        found = []
        for node in self.selected_nodes(model):
            if node.domain not in ("", "ai.onnx") or (ops is not None and node.op_type not in ops):
                continue
            if not node.inputs or all(_is_leaf(v) or id(v) in constant for v in node.inputs):
                continue  # inside a constant path (or a Constant): folded with its consumer
            computed = [v for v in node.inputs if not _is_leaf(v) and id(v) in constant]
            if computed:
                names = ", ".join(v.name or "?" for v in computed)
                found.append(Candidate(node, f"{kir.node_label(node)} <- {names}",
                                       nodes=(node,)))
        return found

    def rewrite(self, model: ir.Model, accepted: Sequence[Candidate]) -> int:
        nodes = [c.anchor for c in accepted if c.anchor is not None]
        folded = fold_weight_paths(model, nodes, ops=None, indices=None)
        if folded:
            self.note = f"{len(folded)} node(s) folded into {len(nodes)} constant input(s)"
        return len(folded)
