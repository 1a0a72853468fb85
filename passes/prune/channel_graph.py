"""The channel dependency graph that structured pruning works on.

Model. A node of the graph is one channel dimension ``(tensor name, axis)`` with a
static size C. An edge couples two dimensions that must lose the same channels, and
it carries the channel mapping: pairs ``(i, j)`` saying channel i of one side *is*
channel j of the other. Edges come from the ops between them:

- Conv / Gemm / MatMul with a constant weight **produce** a fresh dimension (their
  output channels: Conv axis 1, Gemm axis 1, MatMul the last axis) and **consume**
  their input's channel axis (the weight's input slice): no edge crosses them, so
  they bound a group. A depthwise Conv (``group == C_in``) couples output channel
  ``k*m + i`` with input channel k (multiplier m); a grouped Conv couples all the
  channels of one group on both sides (only whole groups can go).
- elementwise ops (Add/Sub/Mul/Div/Max/Min/Pow/PRelu, broadcasting right-aligned),
  activations, pooling, BatchNormalization / InstanceNormalization (per-channel
  parameters are sliced), Softmax or LayerNormalization over other axes: identity.
- Concat along the axis: input k's channel j is output channel ``offset_k + j``.
- Transpose moves the axis; Reshape / Flatten / Squeeze / Unsqueeze are mapped when
  the channel axis is kept or merged with neighbouring axes into one output axis
  (``[N, C, H, W] -> [N, C*H*W]``: channel c owns H*W consecutive features), or split
  into several (``[B, S, H*d] -> [B, S, H, d]``: attention heads): channel c is head
  ``c // d`` of the outer axis, so a head's d channels form one unit.
- a MatMul of two activations (``Q K^T``, ``P V``) couples the batch axes of both
  operands (broadcast aligned) with the output's, A's rows and B's columns with the
  output's last two axes; its contraction axis is refused. Together with the split
  Reshape this puts the Q, K and V projections of one attention and the output
  projection's input rows in one group whose units are the heads.

Connected components are **prune groups**. Inside a group, the channel positions of
all its dimensions fall into classes (the transitive closure of the edges' pairs):
a class is a **unit**, the thing pruning keeps or removes whole. A group is refused,
with a reason, when it reaches a graph input or output (the interface is never
pruned), an op whose channel mapping kiln does not know, a dynamic shape, or a weight
that another node also uses.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import onnx_ir as ir

from kiln.compiler.core import graph as kir

Dim = tuple[str, int]

UNARY_OPS = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Gelu", "Elu", "Selu", "Celu", "HardSigmoid",
    "HardSwish", "Softplus", "Softsign", "Mish", "Clip", "Identity", "Dropout", "Neg", "Abs",
    "Exp", "Log", "Sqrt", "Reciprocal", "Erf", "Cast", "Floor", "Ceil", "Round", "Sign",
    "Sin", "Cos", "ThresholdedRelu", "Shrink"})
BINARY_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "PRelu", "Sum"})
# keep axes 0 and 1 (N, C), change the spatial ones
SPATIAL_OPS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
                         "LpPool", "GlobalLpPool"})
NORM_OPS = frozenset({"BatchNormalization", "InstanceNormalization"})
AXIS_OPS = frozenset({"Softmax", "LogSoftmax", "LayerNormalization"})
RESHAPE_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
PRODUCER_OPS = frozenset({"Conv", "Gemm", "MatMul"})


@dataclass(frozen=True)
class Producer:
    """A Conv/Gemm/MatMul whose weight slices make a group's channels."""

    node: ir.Node
    out_dim: Dim
    weight: ir.Value
    weight_axis: int              # the weight's output-channel axis
    bias: ir.Value | None         # Conv B / Gemm C (sliced with the channels)


@dataclass
class ChannelGroup:
    """One connected component: dims, their sizes and each position's unit."""

    index: int
    dims: list[Dim]
    sizes: dict[Dim, int]
    producers: list[Producer]
    unit_of: dict[Dim, np.ndarray] = field(default_factory=dict)
    units: int = 0
    reason: str | None = None
    consumed: list[Dim] = field(default_factory=list)  # read as input channels downstream

    @property
    def label(self) -> str:
        names = [kir.node_label(p.node) for p in self.producers]
        shown = ", ".join(names[:4]) + (f" +{len(names) - 4}" if len(names) > 4 else "")
        count = self.units or self.sizes.get(self.dims[0], 0)
        return f"group {self.index} ({shown or self.dims[0][0]}: {count} channels)"

    def kept_positions(self, kept_units: Iterable[int]) -> dict[Dim, np.ndarray]:
        """For each dim, the sorted channel positions that stay when ``kept_units`` stay."""
        keep = np.zeros(self.units, dtype=bool)
        keep[np.asarray(list(kept_units), dtype=np.int64)] = True
        return {dim: np.nonzero(keep[units])[0] for dim, units in self.unit_of.items()}

    def unit_scores(self, per_producer: dict[Dim, np.ndarray]) -> np.ndarray:
        """Sum per unit of per-channel scores given for (some of) the group's dims."""
        scores = np.zeros(self.units, dtype=np.float64)
        for dim, values in per_producer.items():
            np.add.at(scores, self.unit_of[dim], values)
        return scores


class _Refused(Exception):
    """A dim whose mapping is unknown: the whole group is refused with this reason."""


def shape_dims(value: ir.Value | None) -> list | None:
    """A value's dims (ints, or symbolic dims) when its rank is known, else None."""
    if value is None or value.shape is None:
        return None
    return list(value.shape.dims)


def static_shape(value: ir.Value | None) -> list[int] | None:
    if value is None or value.shape is None:
        return None
    dims = list(value.shape.dims)
    return dims if all(isinstance(d, int) for d in dims) else None


def infer_missing_shapes(model: ir.Model) -> None:
    """Fill in value shapes with ONNX shape inference when some node output has none (a
    loaded file without value_info); best effort, never a semantic change."""
    from onnx_ir.passes.common import ShapeInferencePass

    if any(v.shape is None for n in model.graph for v in n.outputs if v.name):
        ShapeInferencePass(strict_mode=False)(model)


def const_array(value: ir.Value | None) -> np.ndarray | None:
    tensor = kir.constant_tensor(value)
    return None if tensor is None else tensor.numpy()


def producer_of(node: ir.Node) -> Producer | None:
    """The node as a channel producer (constant float weight), else None."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in PRODUCER_OPS:
        return None
    out = node.outputs[0]
    shape = out.shape
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    w = const_array(weight)
    if shape is None or w is None or not out.name or weight is None:
        return None
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if node.op_type == "Conv":
        return Producer(node, (out.name, 1), weight, 0, bias)
    if node.op_type == "Gemm":
        if w.ndim != 2 or node.attributes.get_int("transA", 0):
            return None
        return Producer(node, (out.name, 1), weight,
                        0 if node.attributes.get_int("transB", 0) else 1, bias)
    if w.ndim != 2 or const_array(node.inputs[0]) is not None:
        return None
    return Producer(node, (out.name, len(shape) - 1), weight, 1, None)


def _identity(n: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.arange(n)
    return r, r


def _aligned_axis(axis: int, out_rank: int, in_rank: int) -> int | None:
    """The input axis that broadcasting aligns with output ``axis`` (None if absent)."""
    i = axis - (out_rank - in_rank)
    return i if i >= 0 else None


def reshape_mapping(in_shape: list[int], out_shape: list[int], axis: int
                    ) -> tuple[int, np.ndarray, np.ndarray] | str:
    """Where channel ``axis`` of a reshape's input lands: ``(output axis, in_pos, out_pos)``
    (input channel ``in_pos[k]`` is output position ``out_pos[k]``), or the reason it cannot
    be followed. A merge (``[N, C, H, W] -> [N, C*H*W]``) gives each output position its
    input channel; a split (``[B, S, H*d] -> [B, S, H, d]``, attention heads) maps channel c
    to position ``c // d`` of the outer axis, so only whole blocks of d channels (heads) can
    go, and the inner axis keeps its size."""
    blocks, i, j = [], 0, 0
    while i < len(in_shape) or j < len(out_shape):
        i0, j0, pi, pj = i, j, 1, 1
        if i < len(in_shape):
            pi, i = in_shape[i], i + 1
        if j < len(out_shape):
            pj, j = out_shape[j], j + 1
        while pi != pj:
            if pi < pj and i < len(in_shape):
                pi, i = pi * in_shape[i], i + 1
            elif pj < pi and j < len(out_shape):
                pj, j = pj * out_shape[j], j + 1
            else:
                return f"shapes {in_shape} and {out_shape} do not line up"
        blocks.append((list(range(i0, i)), list(range(j0, j))))
    for ins, outs in blocks:
        if axis not in ins:
            continue
        outs = [k for k in outs if out_shape[k] > 1] or outs[:1]  # size-1 axes carry nothing
        if len(outs) == 1:
            dims = [in_shape[k] for k in ins]
            position = np.arange(int(np.prod(dims)))
            channel = np.unravel_index(position, dims)[ins.index(axis)]
            return outs[0], np.asarray(channel), position
        if [k for k in ins if in_shape[k] > 1] != [axis]:
            return (f"it splits the channel axis ({in_shape[axis]}) and merges it with "
                    "others")
        inner = int(np.prod([out_shape[k] for k in outs[1:]]))
        channel = np.arange(in_shape[axis])
        return outs[0], channel, channel // inner
    return "the channel axis is lost"


class ChannelGraph:
    """The dims of every group reachable from the model's producers (see module doc)."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.graph = nx.MultiGraph()
        self.values: dict[str, ir.Value] = {}
        for value in model.graph.inputs:
            if value.name:
                self.values[value.name] = value
        for node in model.graph:
            for value in node.outputs:
                if value.name:
                    self.values[value.name] = value
        self.producers: dict[Dim, Producer] = {}
        for node in model.graph:
            producer = producer_of(node)
            if producer is not None:
                self.producers[producer.out_dim] = producer
        self._consumed: set[Dim] = set()
        self.groups = self._build()

    # -- exploring ------------------------------------------------------------------
    def _size(self, dim: Dim) -> int:
        shape = self.values[dim[0]].shape
        size = shape[dim[1]] if shape is not None and dim[1] < len(shape) else None
        if not isinstance(size, int):
            raise _Refused(f"{dim[0]!r} has no static size on axis {dim[1]} "
                           "(bind input shapes first)")
        return size

    def _couple(self, a: Dim, b: Dim, src: np.ndarray, dst: np.ndarray, kind: str) -> None:
        """Channel ``src[k]`` of ``a`` is channel ``dst[k]`` of ``b``."""
        self.graph.add_edge(a, b, first=a, src=np.asarray(src), dst=np.asarray(dst), kind=kind)

    def _explore(self, dim: Dim) -> list[Dim]:
        """Add the edges around ``dim`` (its producer and its consumers); return the
        dims found. A ``_Refused`` marks the dim's group."""
        name, axis = dim
        value = self.values[name]
        size = self._size(dim)
        found: list[Dim] = []
        if value.is_graph_input():
            raise _Refused(f"it reaches graph input {name!r}")
        node = value.producer()
        if node is not None and dim not in self.producers:
            found += self._backward(node, value, axis, size)
        elif node is not None:
            found += self._grouped_conv(node, dim, size)
        if value.is_graph_output():  # after the edges back, so the refusal reaches the group
            raise _Refused(f"it reaches graph output {name!r}")
        for user, index in value.uses():
            found += self._forward(user, index, value, axis, size)
        return found

    def _edge_to(self, other: ir.Value | None, axis: int, dim: Dim, src, dst, kind) -> list[Dim]:
        if other is None or not other.name:
            return []
        if other.name not in self.values:
            raise _Refused(f"constant {other.name!r} is coupled with {dim[0]!r}")
        target = (other.name, axis)
        self._couple(dim, target, src, dst, kind)
        return [target]

    def _grouped_conv(self, node: ir.Node, dim: Dim, size: int) -> list[Dim]:
        group = node.attributes.get_int("group", 1) if node.op_type == "Conv" else 1
        if group == 1:
            return []
        x = node.inputs[0]
        in_shape = shape_dims(x)
        if in_shape is None or not x.name:
            raise _Refused(f"grouped Conv {kir.node_label(node)} input has no static shape")
        c_in = in_shape[1]
        per_in, per_out = c_in // group, size // group
        if per_in == 1:  # depthwise (multiplier per_out): output k*m+i is input channel k
            out = np.arange(size)
            return self._edge_to(x, 1, dim, out, out // per_out, "depthwise")
        # grouped: every channel of group g on either side joins one unit
        ins, outs = np.arange(c_in), np.arange(size)
        self._couple(dim, (x.name, 1), (ins // per_in) * per_out, ins, "group")
        self._couple(dim, (x.name, 1), outs, (outs // per_out) * per_in, "group")
        return [(x.name, 1)]

    def _backward(self, node: ir.Node, value: ir.Value, axis: int, size: int) -> list[Dim]:
        """Dims that ``node`` (which produces ``value``) couples with ``value``'s axis."""
        dim = (value.name, axis)
        op = node.op_type
        label = f"{op} {kir.node_label(node)}"
        if node.domain not in ("", "ai.onnx"):
            raise _Refused(f"{label} ({node.domain}) has no known channel mapping")
        rank = len(value.shape) if value.shape is not None else 0
        if op in UNARY_OPS or op in NORM_OPS or (op in SPATIAL_OPS and axis <= 1) or \
                (op in AXIS_OPS and not _over_axis(node, axis, rank)):
            return self._edge_to(node.inputs[0], axis, dim, *_identity(size), "identity")
        if op in BINARY_OPS:
            found = []
            for operand in node.inputs:
                if operand is None or const_array(operand) is not None:
                    continue
                shape = shape_dims(operand)
                if shape is None:
                    raise _Refused(f"{label} operand {operand.name!r} has no known shape")
                a = _aligned_axis(axis, rank, len(shape))
                if a is not None and shape[a] == size:
                    found += self._edge_to(operand, a, dim, *_identity(size), "identity")
            return found
        if op == "Concat":
            concat_axis = node.attributes.get_int("axis", 0) % rank
            found, offset = [], 0
            for operand in node.inputs:
                shape = shape_dims(operand)
                if shape is None or not isinstance(shape[concat_axis], int):
                    raise _Refused(f"{label} operand has no static size on axis {concat_axis}")
                if axis == concat_axis:
                    r = np.arange(shape[axis])
                    found += self._edge_to(operand, axis, dim, r + offset, r, "concat")
                    offset += shape[axis]
                else:
                    found += self._edge_to(operand, axis, dim, *_identity(size), "identity")
            return found
        if op == "Transpose":
            perm = list(node.attributes.get_ints("perm", list(range(rank))[::-1]))
            return self._edge_to(node.inputs[0], perm[axis], dim, *_identity(size), "transpose")
        if op in RESHAPE_OPS:
            source = node.inputs[0]
            in_shape, out_shape = static_shape(source), static_shape(value)
            if in_shape is None or out_shape is None:
                raise _Refused(f"{label} has no static shapes")
            for in_axis in range(len(in_shape)):
                mapped = reshape_mapping(in_shape, out_shape, in_axis)
                if isinstance(mapped, tuple) and mapped[0] == axis and in_shape[in_axis] > 1:
                    return self._edge_to(source, in_axis, dim, mapped[2], mapped[1], "reshape")
            raise _Refused(f"{label}: output axis {axis} is not made of one input axis")
        if op == "MatMul" and const_array(node.inputs[1]) is None:
            return self._activation_matmul(node, dim, axis, rank, size)
        if op in PRODUCER_OPS:
            raise _Refused(f"{label} has no constant weight: its output channels cannot go")
        raise _Refused(f"{label} has no known channel mapping")

    def _activation_matmul(self, node: ir.Node, dim: Dim, axis: int, rank: int,
                           size: int) -> list[Dim]:
        """A MatMul of two activations (attention's Q K^T, P V): output axis ``axis`` is a
        batch axis of both operands (broadcast aligned), A's rows or B's columns."""
        found = []
        for index, operand in enumerate(node.inputs[:2]):
            shape = shape_dims(operand)
            if shape is None or len(shape) < 2 or rank < 2:
                raise _Refused(f"MatMul {kir.node_label(node)} operand has no known rank >= 2")
            if axis < rank - 2:
                a = _aligned_axis(axis, rank, len(shape))
                if a is None or a >= len(shape) - 2 or shape[a] != size:
                    continue  # broadcast over this axis: that operand has no channels here
            elif axis == rank - 2 + index:
                a = len(shape) - 2 + index
            else:
                continue
            found += self._edge_to(operand, a, dim, *_identity(size), "matmul")
        return found

    def _forward(self, node: ir.Node, index: int, value: ir.Value, axis: int,
                 size: int) -> list[Dim]:
        """Dims that ``node`` (which reads ``value`` as input ``index``) couples with it."""
        dim = (value.name, axis)
        op = node.op_type
        label = f"{op} {kir.node_label(node)}"
        rank = len(value.shape) if value.shape is not None else 0
        if node.domain not in ("", "ai.onnx"):
            raise _Refused(f"{label} ({node.domain}) reads it; its channel mapping is unknown")
        if op == "MatMul" and const_array(node.inputs[1]) is None and \
                const_array(node.inputs[0]) is None:
            out = node.outputs[0]
            out_rank = len(out.shape) if out.shape is not None else 0
            if rank < 2 or out_rank < 2:
                raise _Refused(f"{label} reads it with rank < 2")
            if axis < rank - 2:
                out_axis = axis + out_rank - rank
            elif axis == rank - 2 + index:
                out_axis = out_rank - 2 + index
            else:
                raise _Refused(f"{label} contracts over it")
            return [(out.name, out_axis)] if out.name else []
        if op in PRODUCER_OPS:
            if index != 0:
                raise _Refused(f"{label} reads it as a weight")
            producer = producer_of(node)
            wanted = {"Conv": 1, "Gemm": 1, "MatMul": rank - 1}[op]
            if producer is None:
                raise _Refused(f"{label} reads it and has no constant weight")
            if axis != wanted:
                raise _Refused(f"{label} reads axis {axis}, not its input channels")
            self._check_weight(producer)
            self._consumed.add(dim)
            if op == "Conv" and node.attributes.get_int("group", 1) != 1:
                return [producer.out_dim]  # coupled in _grouped_conv from the output side
            return []
        if op in NORM_OPS:
            if index != 0 or axis != 1:
                raise _Refused(f"{label} reads it as a parameter or off axis 1")
        elif op in SPATIAL_OPS:
            if axis > 1:
                raise _Refused(f"{label} pools over axis {axis}")
        elif op in AXIS_OPS:
            if index != 0 or _over_axis(node, axis, rank):
                raise _Refused(f"{label} normalizes over the channel axis {axis}")
        elif op in UNARY_OPS:
            if index != 0:
                raise _Refused(f"{label} reads it as a parameter")
        elif op in BINARY_OPS or op == "Concat":
            pass
        elif op == "Transpose":
            perm = list(node.attributes.get_ints("perm", list(range(rank))[::-1]))
            return self._edge_to(node.outputs[0], perm.index(axis), dim,
                                 *_identity(size), "transpose")
        elif op in RESHAPE_OPS:
            if index != 0:
                raise _Refused(f"{label} reads it as a shape")
            out_shape = static_shape(node.outputs[0])
            if out_shape is None:
                raise _Refused(f"{label} output has no static shape")
            mapped = reshape_mapping(static_shape(value) or [], out_shape, axis)
            if isinstance(mapped, str):
                raise _Refused(f"{label}: {mapped}")
            out_axis, in_pos, out_pos = mapped
            return self._edge_to(node.outputs[0], out_axis, dim, in_pos, out_pos, "reshape")
        else:
            raise _Refused(f"{label} reads it; its channel mapping is unknown")
        out = node.outputs[0]
        out_shape = shape_dims(out)
        if out_shape is None:
            raise _Refused(f"{label} output has no known shape")
        if op == "Concat":
            out_axis = axis
        else:
            out_axis = axis + (len(out_shape) - rank)
            if out_shape[out_axis] != size:
                return []  # broadcast into a larger dim cannot happen for a channel; be safe
        # the output dim's own _backward adds the edge (with Concat's offsets)
        return [(out.name, out_axis)] if out.name else []

    def _check_weight(self, producer: Producer) -> None:
        users = {id(n) for n, _ in producer.weight.uses()}
        if len(users) > 1 or producer.weight.is_graph_input() or \
                producer.weight.is_graph_output():
            raise _Refused(f"weight {producer.weight.name!r} of {kir.node_label(producer.node)} "
                           "is shared")

    # -- groups -----------------------------------------------------------------------
    def _build(self) -> list[ChannelGroup]:
        reasons: dict[Dim, str] = {}
        seen: set[Dim] = set()
        for root in self.producers:
            stack = [root]
            while stack:
                dim = stack.pop()
                if dim in seen:
                    continue
                seen.add(dim)
                self.graph.add_node(dim)
                try:
                    if dim in self.producers:
                        self._check_weight(self.producers[dim])
                    stack.extend(self._explore(dim))
                except _Refused as refused:
                    reasons.setdefault(dim, str(refused))
        groups = []
        for component in nx.connected_components(self.graph):
            dims = sorted(component)
            producers = [self.producers[d] for d in dims if d in self.producers]
            if not producers:
                continue
            group = ChannelGroup(len(groups), dims, {}, producers,
                                 consumed=[d for d in dims if d in self._consumed])
            refused = [reasons[d] for d in dims if d in reasons]
            try:
                group.sizes = {d: self._size(d) for d in dims}
            except _Refused as error:
                refused.append(str(error))
            group.reason = refused[0] if refused else None
            if group.reason is None:
                self._units(group)
            groups.append(group)
        order = {id(n): i for i, n in enumerate(self.model.graph)}
        groups.sort(key=lambda g: min(order[id(p.node)] for p in g.producers))
        for i, group in enumerate(groups):
            group.index = i
        return groups

    def _units(self, group: ChannelGroup) -> None:
        """Classes of channel positions under the edges' pairs (union-find)."""
        base, total = {}, 0
        for dim in group.dims:
            base[dim] = total
            total += group.sizes[dim]
        parent = np.arange(total)

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        dims = set(group.dims)
        for a, b, data in self.graph.edges(data=True):
            if a not in dims:
                continue
            src, dst = data["src"], data["dst"]
            if data["first"] != a:
                a, b = b, a
            for i, j in zip(src.tolist(), dst.tolist()):
                ri, rj = find(base[a] + i), find(base[b] + j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
        roots = np.array([find(i) for i in range(total)])
        _, labels = np.unique(roots, return_inverse=True)
        group.units = int(labels.max()) + 1 if total else 0
        group.unit_of = {d: labels[base[d]:base[d] + group.sizes[d]] for d in group.dims}


def _over_axis(node: ir.Node, axis: int, rank: int) -> bool:
    """True when a Softmax/LayerNormalization reduces over ``axis``."""
    default = -1
    if node.op_type == "LayerNormalization":
        start = node.attributes.get_int("axis", default) % rank
        return axis >= start
    if node.op_type in ("Softmax", "LogSoftmax"):
        chosen = node.attributes.get_int("axis", default) % rank
        return axis == chosen
    return True
