"""Rewrite rules written as small ONNX graphs: parsing, matching, instantiating.

A rule is a **pattern** and a **replacement**, each a graph in ONNX's textual syntax
(``onnx.parser``; docs/spec.md, "Rewrite rules")::

    pattern (float[N] x, float[N] s) => (float[N] y) {
        t = Mul (x, s)
        y = Mul (t, s)
    }

- The pattern's inputs are **variables**: each binds to one value of the model (the same
  name twice means the same value). Its nodes must match the model's nodes by op type,
  domain and attributes (exactly: an attribute the pattern does not write must be absent in
  the model too); ``Add``, ``Mul``, ``Max``, ``Min``, ``And``, ``Or``, ``Xor``, ``Equal``
  and ``Sum`` of two inputs match either input order. A ``Constant`` node or initializer in the
  pattern matches a constant of the model with the same value.
- Values computed inside the match must be used only inside it (and not be graph outputs):
  the match is replaced whole. The pattern has one output.
- The replacement has the same output count and reads only the pattern's variables (by
  name) and constants of its own (``Constant`` nodes); its output takes the place, and the
  name, of the pattern's output.
- Conditions (``where``) on variables: ``constant`` (an initializer or Constant output),
  ``value`` (every element equals it), ``rank``, ``shape`` and ``dtype``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
from onnx import helper

COMMUTATIVE = frozenset({"Add", "Mul", "Max", "Min", "And", "Or", "Xor", "Equal", "Sum"})


def _domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


@dataclass(frozen=True)
class RuleGraph:
    """A parsed pattern or replacement graph."""

    graph: onnx.GraphProto
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    producers: dict[str, onnx.NodeProto]                  # value name -> node
    constants: dict[str, np.ndarray] = field(default_factory=dict)


def parse_rule_graph(text: str, what: str) -> RuleGraph:
    """Parse ONNX textual syntax; ValueError with the parser's message, or a structural one."""
    try:
        graph = onnx.parser.parse_graph(text)
    except Exception as error:  # onnx.parser.ParseError and others
        message = str(error).strip().splitlines()
        raise ValueError(f"{what} is not an ONNX graph in textual syntax "
                         f"({message[-1] if message else type(error).__name__})") from None
    producers: dict[str, onnx.NodeProto] = {}
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        for name in node.output:
            if name:
                producers[name] = node
        if node.op_type == "Constant" and _domain(node.domain) == "":
            value = _constant_attribute(node)
            if value is not None:
                constants[node.output[0]] = value
    inputs = tuple(i.name for i in graph.input)
    known = set(inputs) | set(producers) | set(constants)
    for node in graph.node:
        for name in node.input:
            if name and name not in known:
                raise ValueError(f"{what}: value {name!r} is read by {node.op_type} but is "
                                 "not an input of the graph nor computed in it")
    outputs = tuple(o.name for o in graph.output)
    for name in outputs:
        if name not in producers and name not in inputs:
            raise ValueError(f"{what}: output {name!r} is not computed in the graph")
    if not graph.node:
        raise ValueError(f"{what} has no nodes")
    return RuleGraph(graph, inputs, outputs, producers, constants)


def _constant_attribute(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return onnx.numpy_helper.to_array(attr.t)
        if attr.name in ("value_float", "value_int", "value_floats", "value_ints"):
            return np.asarray(helper.get_attribute_value(attr))
    return None


def _plain(value: Any) -> Any:
    if isinstance(value, (ir.TensorProtocol, onnx.TensorProto)):
        array = value.numpy() if isinstance(value, ir.TensorProtocol) else \
            onnx.numpy_helper.to_array(value)
        return ("tensor", array.dtype.str, array.shape, array.tobytes())
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, float):
        return float(np.float32(value))
    return value


def _pattern_attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: _plain(helper.get_attribute_value(a)) for a in node.attribute}


def _model_attributes(node: ir.Node) -> dict[str, Any]:
    return {name: _plain(attr.value) for name, attr in node.attributes.items()}


def constant_value(value: ir.Value | None) -> np.ndarray | None:
    """The array of an initializer or a Constant node's output (None otherwise)."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and \
            _domain(producer.domain) == "":
        attr = producer.attributes.get("value")
        if attr is not None and isinstance(attr.value, ir.TensorProtocol):
            return attr.value.numpy()
    return None


@dataclass
class Match:
    anchor: ir.Node                              # the node computing the pattern's output
    nodes: list[ir.Node]                         # every matched model node
    binding: dict[str, ir.Value]                 # pattern variable -> model value


def _match_node(rule: RuleGraph, pnode: onnx.NodeProto, mnode: ir.Node,
                binding: dict[str, ir.Value], nodes: dict[int, ir.Node]
                ) -> Iterator[tuple[dict[str, ir.Value], dict[int, ir.Node]]]:
    if pnode.op_type != mnode.op_type or _domain(pnode.domain) != _domain(mnode.domain):
        return
    if id(mnode) in nodes:
        return
    if _pattern_attributes(pnode) != _model_attributes(mnode):
        return
    p_inputs = list(pnode.input)
    m_inputs = list(mnode.inputs)
    if len(p_inputs) != len(m_inputs):
        return
    orders = [m_inputs]
    if pnode.op_type in COMMUTATIVE and len(m_inputs) == 2:
        orders.append(m_inputs[::-1])
    for order in orders:
        yield from _match_inputs(rule, p_inputs, order, binding,
                                 {**nodes, id(mnode): mnode})


def _match_inputs(rule: RuleGraph, p_inputs: list[str], m_inputs: list[ir.Value | None],
                  binding: dict[str, ir.Value], nodes: dict[int, ir.Node]
                  ) -> Iterator[tuple[dict[str, ir.Value], dict[int, ir.Node]]]:
    if not p_inputs:
        yield binding, nodes
        return
    name, value = p_inputs[0], m_inputs[0]
    rest_p, rest_m = p_inputs[1:], m_inputs[1:]
    if not name:                                      # an omitted optional input
        if value is None:
            yield from _match_inputs(rule, rest_p, rest_m, binding, nodes)
        return
    if value is None:
        return
    if name in rule.inputs:                           # a variable
        bound = binding.get(name)
        if bound is not None and bound is not value:
            return
        yield from _match_inputs(rule, rest_p, rest_m, {**binding, name: value}, nodes)
        return
    if name in rule.constants and (name not in rule.producers or
                                   rule.producers[name].op_type == "Constant"):
        array = constant_value(value)
        want = rule.constants[name]
        if array is None or array.shape != want.shape or \
                not np.array_equal(array.astype(np.float64), want.astype(np.float64)):
            return
        producer = value.producer()
        extra = {id(producer): producer} if producer is not None else {}
        yield from _match_inputs(rule, rest_p, rest_m, binding, {**nodes, **extra})
        return
    if name in binding:                               # computed once, read twice
        if binding[name] is value:
            yield from _match_inputs(rule, rest_p, rest_m, binding, nodes)
        return
    producer = value.producer()
    if producer is None:
        return
    for bound, matched in _match_node(rule, rule.producers[name], producer,
                                      {**binding, name: value}, nodes):
        yield from _match_inputs(rule, rest_p, rest_m, bound, matched)


def find_matches(rule: RuleGraph, model: ir.Model, nodes: list[ir.Node],
                 check: Callable[[dict[str, ir.Value]], str | None] | None = None
                 ) -> list[tuple[Match, str | None]]:
    """Non-overlapping matches of the pattern (anchored at its output), in graph order, each
    with why ``check`` refuses its binding (None: accepted). Of a node's structural matches
    (commutative inputs give several) the first that ``check`` accepts is taken, else the
    first one, refused."""
    (output,) = rule.outputs
    root = rule.producers[output]
    taken: set[int] = set()
    found: list[tuple[Match, str | None]] = []
    for node in nodes:
        if id(node) in taken:
            continue
        refused: tuple[Match, str] | None = None
        for binding, matched in _match_node(rule, root, node, {}, {}):
            if any(key in taken for key in matched) or not _closed(matched, node):
                continue
            variables = {k: v for k, v in binding.items() if k in rule.inputs}
            match = Match(node, list(matched.values()), variables)
            reason = check(variables) if check is not None else None
            if reason is None:
                found.append((match, None))
                taken.update(matched)
                refused = None
                break
            refused = refused or (match, reason)
        if refused is not None:
            found.append(refused)
    return found


def _closed(matched: Mapping[int, ir.Node], anchor: ir.Node) -> bool:
    """Values computed inside the match (but its output) are used only inside it."""
    for node in matched.values():
        if node is anchor:
            continue
        for value in node.outputs:
            if value.is_graph_output():
                return False
            if any(id(user) not in matched for user, _ in value.uses()):
                return False
    return True


def check_condition(name: str, value: ir.Value, condition: Any) -> str | None:
    """Why ``value`` (bound to variable ``name``) fails ``condition`` (None: it holds)."""
    array = constant_value(value)
    if condition.constant is True and array is None:
        return f"{name} is not a constant"
    if condition.constant is False and array is not None:
        return f"{name} is a constant"
    if condition.value is not None:
        if array is None:
            return f"{name} is not a constant (value {condition.value} required)"
        if array.size == 0 or not np.all(array.astype(np.float64) == condition.value):
            return f"{name} is not {condition.value} everywhere"
    shape = list(array.shape) if array is not None else (
        [d if isinstance(d, int) else str(d) for d in value.shape] if value.shape is not None
        else None)
    if condition.rank is not None and (shape is None or len(shape) != condition.rank):
        return f"{name} has rank {len(shape) if shape is not None else '?'}, not {condition.rank}"
    if condition.shape is not None and shape != list(condition.shape):
        return f"{name} has shape {shape}, not {list(condition.shape)}"
    if condition.dtype is not None:
        dtype = array.dtype.name if array is not None else (
            value.dtype.numpy().name if value.dtype is not None else None)
        if dtype != condition.dtype.lower():
            return f"{name} has dtype {dtype}, not {condition.dtype}"
    return None
