"""Residual blocks x + f(x): how ``drop_blocks``, ``share_blocks`` and ``template_share``
find them, and when two blocks are structurally identical.

A **residual block** is an ``Add(x, y)`` (either input order) with a non-empty branch of
nodes computing y = f(x) from x alone:

- every input of a branch node is x, an output of another branch node, or a constant
  (initializer or Constant node output);
- at least one branch node reads x;
- every output of a branch node is used only inside the branch (y only by the Add), and
  none is a graph output; no branch node carries a subgraph (If/Loop/Scan).

So x + f(x) -> x is a valid rewrite (drop the branch) and the branch's weights are
all of f's parameters. A block whose branch contains another block's Add is not listed
(the inner block is): listed blocks never nest.

The **signature** of a block is its canonical structure: the branch's nodes in graph
order, each with op type, domain, attributes and where each input comes from (x, the
j-th output of the i-th branch node, or a constant). A constant is a **weight** when it is
floating point with at least two elements: the signature keeps its dtype and shape only,
so blocks differing only in weight values are identical. Other constants (shapes, axes,
scalars such as 1/sqrt(d)) are part of the structure and compared by value.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from kiln.compiler.core import graph as kir

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


@dataclass(frozen=True)
class ResidualBlock:
    """One block x + f(x) of a model (see the module docstring)."""

    add: ir.Node
    x: ir.Value
    y: ir.Value
    nodes: tuple[ir.Node, ...]                 # the branch f, in graph order (not the Add)
    signature: str
    weight_slots: tuple[tuple[int, int], ...]  # (index in nodes, input index) of each weight

    @property
    def output(self) -> ir.Value:
        return self.add.outputs[0]

    @property
    def label(self) -> str:
        return kir.node_label(self.add)

    def weights(self) -> list[ir.Value]:
        """The weight values in slot order (one value may fill several slots)."""
        return [self.nodes[i].inputs[j] for i, j in self.weight_slots]  # type: ignore[misc]

    def weight_arrays(self) -> list[np.ndarray]:
        return [kir.constant_tensor(v).numpy() for v in self.weights()]  # type: ignore[union-attr]


def is_weight(value: ir.Value) -> bool:
    """A floating-point constant with at least two elements (its values are parameters)."""
    tensor = kir.constant_tensor(value)
    return tensor is not None and tensor.dtype in FLOAT_TYPES and kir.tensor_size(tensor) >= 2


def _branch(x: ir.Value, y: ir.Value, add: ir.Node,
            order: dict[int, int]) -> list[ir.Node] | None:
    """The nodes computing y from x alone, in graph order, or None when y is not f(x)."""
    producer = y.producer()
    if producer is None or producer is add:
        return None
    x_producer = x.producer()
    floor = order[id(x_producer)] if x_producer is not None else -1
    found: dict[int, ir.Node] = {}
    stack = [producer]
    reads_x = False
    while stack:
        node = stack.pop()
        if id(node) in found:
            continue
        if order.get(id(node), -1) <= floor:
            return None  # reaches before x: y depends on something other than x
        found[id(node)] = node
        for value in node.inputs:
            if value is None or kir.constant_tensor(value) is not None:
                continue
            if value is x:
                reads_x = True
                continue
            source = value.producer()
            if source is None:
                return None  # another graph input
            stack.append(source)
    if not reads_x:
        return None
    for node in found.values():
        if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
               for attr in node.attributes.values()):
            return None
        for out in node.outputs:
            if out.is_graph_output():
                return None
            for user, _ in out.uses():
                if id(user) not in found and not (out is y and user is add):
                    return None
    return sorted(found.values(), key=lambda n: order[id(n)])


def _attr_key(attr: ir.Attr) -> str:
    value = attr.value
    if isinstance(value, ir.TensorProtocol):
        return f"{attr.name}=tensor:{hashlib.sha1(value.tobytes()).hexdigest()}"
    return f"{attr.name}={value!r}"


def _signature(x: ir.Value, nodes: list[ir.Node]) -> tuple[str, tuple[tuple[int, int], ...]]:
    position = {id(n): i for i, n in enumerate(nodes)}
    parts: list[str] = []
    slots: list[tuple[int, int]] = []
    for i, node in enumerate(nodes):
        inputs = []
        for j, value in enumerate(node.inputs):
            if value is None:
                inputs.append("-")
            elif value is x:
                inputs.append("x")
            elif is_weight(value):
                tensor = kir.constant_tensor(value)
                assert tensor is not None
                inputs.append(f"w:{tensor.dtype}:{tuple(tensor.shape.numpy())}")
                slots.append((i, j))
            elif (tensor := kir.constant_tensor(value)) is not None:
                digest = hashlib.sha1(tensor.tobytes()).hexdigest()[:16]
                inputs.append(f"c:{tensor.dtype}:{tuple(tensor.shape.numpy())}:{digest}")
            else:
                source = value.producer()
                assert source is not None
                inputs.append(f"{position[id(source)]}.{source.outputs.index(value)}")
        attrs = ",".join(sorted(_attr_key(a) for a in node.attributes.values()))
        parts.append(f"{node.domain}::{node.op_type}({' '.join(inputs)})[{attrs}]"
                     f"->{len(node.outputs)}")
    text = ";".join(parts)
    return hashlib.sha256(text.encode()).hexdigest()[:16], tuple(slots)


def find_blocks(model: ir.Model,
                selected: Callable[[ir.Node], bool] | None = None) -> list[ResidualBlock]:
    """Every residual block of the main graph whose Add is selected, in graph order."""
    order = {id(node): i for i, node in enumerate(model.graph)}
    blocks = []
    for add in model.graph:
        if add.op_type != "Add" or add.domain != "" or len(add.inputs) != 2:
            continue
        if selected is not None and not selected(add):
            continue
        a, b = add.inputs
        if a is None or b is None or a is b:
            continue
        for x, y in ((a, b), (b, a)):
            nodes = _branch(x, y, add, order)
            if nodes:
                signature, slots = _signature(x, nodes)
                blocks.append(ResidualBlock(add, x, y, tuple(nodes), signature, slots))
                break
    adds = {id(block.add) for block in blocks}
    return [block for block in blocks
            if not any(id(node) in adds for node in block.nodes)]


def identical_groups(blocks: Iterable[ResidualBlock]) -> list[list[ResidualBlock]]:
    """Blocks grouped by signature (each group in graph order; groups by first member)."""
    groups: dict[str, list[ResidualBlock]] = {}
    for block in blocks:
        groups.setdefault(block.signature, []).append(block)
    return list(groups.values())


def remove_unused_constants(graph: ir.Graph, values: Iterable[ir.Value]) -> None:
    """Remove the initializers and Constant nodes among ``values`` that nothing uses now
    (a rewrite that redirected or removed their users calls it with the old inputs)."""
    for value in dict.fromkeys(values):
        if value.uses() or value.is_graph_output() or value.is_graph_input():
            continue
        producer = value.producer()
        if producer is not None:
            if producer.op_type == "Constant" and all(not o.uses() for o in producer.outputs):
                graph.remove(producer, safe=True)
        elif graph.initializers.get(value.name or "") is value:
            del graph.initializers[value.name]  # type: ignore[arg-type]
