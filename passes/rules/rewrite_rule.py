"""rewrite_rule: a pattern and its replacement written as small ONNX graphs, applied by the
same machinery as the built-in passes (plan, selection, verification, report).

Specs give rules in their ``rules:`` section (each becomes a step named ``rule:NAME``, run
before ``passes:``) or as a ``rewrite_rule`` item of ``passes:`` where the order matters.
The graph syntax and the matching are :mod:`.pattern`'s (docs/spec.md, "Rewrite rules").
A rule is checked like an exact pass unless its spec entry says ``exact: false`` (then its
``budget`` applies). A structural match whose ``where`` conditions fail is a refused
candidate with the condition in the reason, so ``kiln plan`` shows why a rule did not fire.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx
import onnx_ir as ir
from pydantic import BaseModel, ConfigDict, Field, model_validator

from kiln.compiler.core.pass_api import Candidate, KilnPass, PassConfig, replace_value, unique_name

from .pattern import RuleGraph, check_condition, find_matches, parse_rule_graph


class Condition(BaseModel):
    """What a pattern variable must be (every key optional)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    constant: bool | None = Field(default=None, description="an initializer or Constant output")
    value: float | None = Field(default=None, description="constant, every element equal to it")
    rank: int | None = Field(default=None, ge=0)
    shape: list[int] | None = None
    dtype: str | None = Field(default=None, description="numpy name, e.g. float32, int64")


class RewriteRuleConfig(PassConfig):
    """Options of ``rewrite_rule``."""

    name: str = Field(default="rule", description="shown in plan and the report")
    pattern: str = Field(description="the pattern graph, ONNX textual syntax")
    replacement: str = Field(description="the replacement graph, ONNX textual syntax")
    where: dict[str, Condition] = Field(default_factory=dict,
                                        description="conditions on pattern inputs")

    @model_validator(mode="after")
    def _graphs(self) -> RewriteRuleConfig:
        pattern = parse_rule_graph(self.pattern, "pattern")
        replacement = parse_rule_graph(self.replacement, "replacement")
        if len(pattern.outputs) != 1:
            raise ValueError(f"a pattern has one output, this one has {len(pattern.outputs)}")
        if len(replacement.outputs) != 1:
            raise ValueError("the replacement must have one output, like the pattern")
        if replacement.outputs[0] not in replacement.producers:
            raise ValueError("the replacement's output must be computed by one of its nodes "
                             "(write `y = Identity (x)` to pass a value through)")
        extra = [n for n in replacement.inputs if n not in pattern.inputs]
        if extra:
            raise ValueError(f"the replacement reads {extra}, which the pattern does not "
                             f"bind (its inputs: {list(pattern.inputs)})")
        unknown = [n for n in self.where if n not in pattern.inputs]
        if unknown:
            raise ValueError(f"where: {unknown} are not inputs of the pattern "
                             f"({list(pattern.inputs)})")
        return self

    def graphs(self) -> tuple[RuleGraph, RuleGraph]:
        return (parse_rule_graph(self.pattern, "pattern"),
                parse_rule_graph(self.replacement, "replacement"))


class RewriteRule(KilnPass):
    """Replace every match of a pattern graph by a replacement graph (spec rules)."""

    name = "rewrite_rule"
    config_class = RewriteRuleConfig
    exact = True

    def candidates(self, model: ir.Model) -> list[Candidate]:
        pattern, _ = self.config.graphs()
        def check(binding: dict[str, ir.Value]) -> str | None:
            for variable, condition in self.config.where.items():
                reason = check_condition(variable, binding[variable], condition)
                if reason is not None:
                    return reason
            return None

        found = []
        for match, reason in find_matches(pattern, model, self.selected_nodes(model), check):
            label = f"{match.anchor.name or match.anchor.op_type} ({len(match.nodes)} nodes)"
            found.append(Candidate(match.anchor, label, reason=reason,
                                   nodes=tuple(match.nodes), data=match))
        return found

    def rewrite(self, model: ir.Model, accepted: Sequence[Candidate]) -> int:
        graph = model.graph
        _, replacement = self.config.graphs()
        for candidate in accepted:
            match = candidate.data
            values: dict[str, ir.Value] = dict(match.binding)
            prefix = f"{match.anchor.name or match.anchor.op_type}/{self.config.name}"
            new_nodes = []
            for i, proto in enumerate(replacement.graph.node):
                node = _instantiate(graph, proto, values, f"{prefix}/{i}")
                new_nodes.append(node)
            graph.insert_before(match.anchor, new_nodes)
            (out_name,) = replacement.outputs
            replace_value(graph, match.anchor.outputs[0], values[out_name])
            for node in reversed(_graph_order(graph, match.nodes)):
                graph.remove(node, safe=True)
        self.note = f"{self.config.name}: {len(accepted)} matches replaced"
        return len(accepted)


def _instantiate(graph: ir.Graph, proto: onnx.NodeProto, values: dict[str, ir.Value],
                 name: str) -> ir.Node:
    inputs = [values[n] if n else None for n in proto.input]
    attributes = [ir.serde.deserialize_attribute(a) for a in proto.attribute]
    node = ir.Node(proto.domain, proto.op_type, inputs, attributes=attributes,
                   num_outputs=len(proto.output), name=name)
    for value, out in zip(node.outputs, proto.output, strict=True):
        value.name = unique_name(graph, f"{name}/{out}")
        values[out] = value
    return node


def _graph_order(graph: ir.Graph, nodes: list[ir.Node]) -> list[ir.Node]:
    wanted = {id(n) for n in nodes}
    return [n for n in graph if id(n) in wanted]
