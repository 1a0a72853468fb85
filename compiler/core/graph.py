"""Helpers over ``onnx_ir`` that every layer shares: node labels, module paths,
constant inputs, parameter counts and deterministic serialization.

This module knows no pass and no backend.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import onnx
import onnx_ir as ir

# The dynamo exporter keeps, per node, the scope names and the class of each scope.
NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
CLASS_HIERARCHY_KEY = "pkg.torch.onnx.class_hierarchy"


def nodes(model: ir.Model) -> Iterator[ir.Node]:
    """The nodes of the main graph, in graph order."""
    yield from model.graph


def node_label(node: ir.Node) -> str:
    """A stable, readable name for a node (its name, or op type and position)."""
    if node.name:
        return node.name
    graph = node.graph
    index = list(graph).index(node) if graph is not None else -1
    return f"{node.op_type}#{index}"


def _parse_list(text: str) -> list[str]:
    text = text.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return [text]
    inner = text[1:-1].strip()
    if not inner:
        return []
    items = []
    for part in inner.split(","):
        part = part.strip()
        if len(part) >= 2 and part[0] == part[-1] and part[0] in "'\"":
            part = part[1:-1]
        items.append(part)
    return items


def module_path(node: ir.Node) -> str:
    """The PyTorch module path of a node (``encoder.layers.3.mlp.fc1``), '' if unknown.

    The dynamo exporter stores cumulative scope names
    (``['', 'stem', 'stem.1', 'conv2d']``) and, in parallel, each scope's class;
    the deepest scope whose class is a module (not an ``aten.`` op) is the path.
    """
    scopes_text = node.metadata_props.get(NAME_SCOPES_KEY)
    if not scopes_text:
        return ""
    scopes = _parse_list(scopes_text)
    classes = _parse_list(node.metadata_props.get(CLASS_HIERARCHY_KEY, ""))
    path = ""
    for i, scope in enumerate(scopes):
        cls = classes[i] if i < len(classes) else ""
        if i == len(scopes) - 1 and (not cls or cls.startswith("aten.")):
            break  # the last scope names the op itself
        if scope and not cls.startswith("aten."):
            path = scope
    return path


def constant_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The constant tensor behind a value (initializer or Constant node), else None."""
    if value is None:
        return None
    return ir.convenience.get_const_tensor(value)


def is_initializer_only(value: ir.Value) -> bool:
    """True when a value is an initializer that is not also a graph input (so cannot be fed)."""
    return value.is_initializer() and not value.is_graph_input()


def weight_value(node: ir.Node) -> ir.Value | None:
    """The node's weight: its largest constant input with at least one dimension."""
    best: ir.Value | None = None
    best_size = -1
    for value in node.inputs:
        tensor = constant_tensor(value)
        if tensor is None or len(tensor.shape) == 0:
            continue
        size = int(np.prod(tensor.shape.numpy())) if len(tensor.shape) else 1
        if size > best_size:
            best, best_size = value, size
    return best


def tensor_size(tensor: ir.TensorProtocol) -> int:
    return int(np.prod(tensor.shape.numpy(), dtype=np.int64)) if len(tensor.shape) else 1


def tensor_nbytes(tensor: ir.TensorProtocol) -> int:
    try:
        return int(tensor.nbytes)
    except (AttributeError, NotImplementedError, TypeError):
        return int(tensor_size(tensor) * max(1, tensor.dtype.itemsize))


def _constant_tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            yield value.const_value
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Constant" and node.domain == "" and "value" in node.attributes:
            yield node.attributes["value"].as_tensor()


def count_params(model: ir.Model) -> int:
    """Number of weight elements (initializers and Constant tensors)."""
    return sum(tensor_size(t) for t in _constant_tensors(model))


def count_weight_bytes(model: ir.Model) -> int:
    """Bytes the weights take in memory (packed sub-byte types counted packed)."""
    return sum(tensor_nbytes(t) for t in _constant_tensors(model))


def to_proto(model: ir.Model) -> onnx.ModelProto:
    return ir.serde.serialize_model(model)


def model_bytes(model: ir.Model) -> bytes:
    """Deterministic serialization (same model -> same bytes)."""
    return to_proto(model).SerializeToString(deterministic=True)


def model_digest(model: ir.Model) -> str:
    return hashlib.sha256(model_bytes(model)).hexdigest()


def graph_inputs(model: ir.Model) -> list[ir.Value]:
    """Inputs a caller must feed (initializers listed as inputs excluded)."""
    return [v for v in model.graph.inputs if not v.is_initializer()]


def shape_list(value: ir.Value) -> list[int | str | None]:
    """A value's shape as a list (ints for static dims, names or None for symbolic)."""
    if value.shape is None:
        return []
    dims: list[int | str | None] = []
    for dim in value.shape.dims:
        if isinstance(dim, int):
            dims.append(dim)
        else:
            dims.append(getattr(dim, "value", None))
    return dims


def numpy_dtype(value: ir.Value) -> np.dtype:
    if value.dtype is None:
        raise ValueError(f"value {value.name!r} has no known dtype")
    return value.dtype.numpy()
