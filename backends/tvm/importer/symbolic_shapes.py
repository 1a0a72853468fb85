"""ONNX clean-ups that let TVM's importer keep a symbolic shape as a shape.

With a symbolic input dim the frontend cannot fold the graph's shape arithmetic, and
TVM's importer follows it only while it stays a Relax shape: ``Shape`` and the
data-movement ops on it (Slice, Gather, Squeeze, Unsqueeze, Concat) give shapes, a
``Cast`` makes it a tensor, and a ``Reshape`` by a tensor is refused ("Reshape requires
the input new shape to be Shape"). Exporters (paddle2onnx) write ``Shape -> Cast(int32)
-> Slice -> Cast(int64)``: :func:`drop_shape_round_trips` removes such int64 -> int32
-> int64 round trips, which change no value (a dim fits int32), so the shape stays a
shape. Only for symbolic builds; a static model is folded before import.
"""

from __future__ import annotations

import onnx

#: ops that move a shape's values without computing on them
_MOVES = {"Slice", "Gather", "Squeeze", "Unsqueeze"}
_INT32 = onnx.TensorProto.INT32
_INT64 = onnx.TensorProto.INT64


def _cast_to(node: onnx.NodeProto) -> int | None:
    for attr in node.attribute:
        if attr.name == "to":
            return int(attr.i)
    return None


def drop_shape_round_trips(graph: onnx.GraphProto) -> int:
    """Remove every ``Cast(int32)`` of a ``Shape`` output whose values reach only
    ``Cast(int64)`` nodes (through :data:`_MOVES` ops), and those casts; returns how
    many round trips were removed."""
    producer = {out: n for n in graph.node for out in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    outputs = {o.name for o in graph.output}
    removed = 0
    drop: list[onnx.NodeProto] = []
    for node in list(graph.node):
        if node.op_type != "Cast" or _cast_to(node) != _INT32:
            continue
        source = producer.get(node.input[0])
        if source is None or source.op_type != "Shape":
            continue
        ends: list[onnx.NodeProto] = []
        stack, ok = [node.output[0]], True
        while stack and ok:
            value = stack.pop()
            if value in outputs:
                ok = False
            for user in consumers.get(value, []):
                if user.op_type == "Cast" and _cast_to(user) == _INT64:
                    ends.append(user)
                elif user.op_type in _MOVES and user.input[0] == value:
                    stack.append(user.output[0])
                else:
                    ok = False
        if not ok or not ends:
            continue
        rename = {node.output[0]: node.input[0]}
        rename.update({end.output[0]: end.input[0] for end in ends})
        for n in graph.node:  # consumers read the int64 values directly
            for i, name in enumerate(n.input):
                while name in rename:
                    name = rename[name]
                n.input[i] = name
        drop.extend([node, *ends])
        removed += 1
    for n in drop:
        graph.node.remove(n)
    return removed
