"""Ops that TVM's importer lacks but ONNX defines as functions, expanded before import.

Many newer ONNX ops are specified by a function body in their schema
(``NegativeLogLikelihoodLoss``, ``SoftmaxCrossEntropyLoss``, ``Celu``, ``Swish``,
``CenterCropPad``, the ``*Window`` generators, ``CausalConvWithState``, ...): the body
*is* the op's definition, written in older standard ops. For an op with no converter
(TVM's or kiln's), each node is replaced by that body (onnx's inliner with
``inline_schema_functions``; context-dependent bodies are built from the node's
inferred input types), repeatedly, since a body may use another such op
(``SoftmaxCrossEntropyLoss`` -> ``NegativeLogLikelihoodLoss``).

A node whose op has a converter that refuses its form (``Attention`` with
``nonpad_kv_seqlen``) is expanded the same way. An expansion is kept only if every op
it leaves has a converter: otherwise the model is returned unchanged, so the refusal
names the op the user wrote (``Bernoulli``), not a helper of its body
(``RandomUniformLike``).

Size operands of the window generators fed by a model input are fixed first to the
value the declared output shape implies (:mod:`.static_operands`): their bodies run
``Range`` on it, which only folds to a static shape as a constant.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import onnx
import onnx.inliner

from .static_operands import fix_shape_operands

logger = logging.getLogger(__name__)

_STANDARD = ("", "ai.onnx")
#: the domain of the bodies while they are model-local functions (before inlining)
_LOCAL_DOMAIN = "kiln.schema_function"
#: ops a body may use though they have no converter: unrolled before import (:mod:`.unroll`)
_UNROLLED = frozenset({"Scan", "Loop"})
#: ops with a converter that refuses some forms, which their function bodies cover:
#: op -> does this node need its body (Attention's nonpad_kv_seqlen: the 7th input)
_CONVERTER_GAPS = {
    "Attention": lambda node: len(node.input) > 6 and bool(node.input[6]),
}
#: rounds of expansion (a body using a function op is expanded in the next round)
MAX_ROUNDS = 4


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in _STANDARD), 1)


def _has_function(op_type: str, opset: int) -> bool:
    try:
        schema = onnx.defs.get_schema(op_type, opset, "")
    except onnx.defs.SchemaError:
        return False
    return bool(schema.has_function or schema.has_context_dependent_function)


def _op_types(graph: onnx.GraphProto) -> set[str]:
    found = set()
    for node in graph.node:
        if node.domain in _STANDARD:
            found.add(node.op_type)
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                found |= _op_types(sub)
    return found


def _nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield from _nodes(sub)


def _add_default_attributes(model: onnx.ModelProto, ops: set[str]) -> None:
    """Write the schema's default of every attribute a node of ``ops`` leaves out (in
    place): a body refers to attributes by name (``@periodic``), and the inliner drops
    a reference to an absent one rather than use the default."""
    opset = _opset(model)
    for node in _nodes(model.graph):
        if node.domain not in _STANDARD or node.op_type not in ops:
            continue
        schema = onnx.defs.get_schema(node.op_type, opset, "")
        present = {a.name for a in node.attribute}
        for name, attr in schema.attributes.items():
            default = attr.default_value
            if name not in present and default.name:
                node.attribute.append(default)


def _typed(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every value typed (shape inference, plus the initializers, which
    the inliner does not look up by themselves)."""
    typed = onnx.shape_inference.infer_shapes(model)
    graph = typed.graph
    known = {v.name for v in [*graph.input, *graph.value_info, *graph.output]}
    graph.value_info.extend(
        onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for t in graph.initializer if t.name not in known)
    return typed


def _function(node: onnx.NodeProto, opset: int,
              types: dict[str, onnx.TypeProto]) -> onnx.FunctionProto | None:
    """The body of ``node`` as its schema defines it at ``opset`` (None: none there)."""
    schema = onnx.defs.get_schema(node.op_type, opset, "")
    fixed = [v for v in schema.function_opset_versions if v <= opset]
    dependent = [v for v in schema.context_dependent_function_opset_versions if v <= opset]
    if dependent:
        # an absent optional input gets an empty type (onnx's own inliner stops there)
        text = schema.get_context_dependent_function_with_opset_version(
            max(dependent), node.SerializeToString(),
            [types.get(name, onnx.TypeProto()).SerializeToString() for name in node.input])
    elif fixed:
        text = schema.get_function_with_opset_version(max(fixed))
    else:
        return None
    return onnx.FunctionProto.FromString(text)


def _inline(model: onnx.ModelProto, ops: set[str], known: set[str]) -> onnx.ModelProto:
    """Every node of ``ops`` (of those with a converter in ``known``: only the forms it
    refuses) made a call of a model-local copy of its body, then inlined."""
    opset = _opset(model)
    graph = model.graph
    types = {v.name: v.type for v in [*graph.input, *graph.value_info, *graph.output]}
    ids = []
    for node in _nodes(graph):
        if node.domain not in _STANDARD or node.op_type not in ops or \
                node.op_type in known and not _converter_gap(node):
            continue
        body = _function(node, opset, types)
        if body is None:
            continue
        body.domain, body.name = _LOCAL_DOMAIN, f"{node.op_type}_{len(ids)}"
        node.domain, node.op_type = body.domain, body.name
        model.functions.append(body)
        ids.append((body.domain, body.name))
    model.opset_import.append(onnx.helper.make_opsetid(_LOCAL_DOMAIN, 1))
    model = onnx.inliner.inline_selected_functions(model, ids)
    kept = [o for o in model.opset_import if o.domain != _LOCAL_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return model


def _converter_gap(node: onnx.NodeProto) -> bool:
    """A node of an op that has a converter which refuses this form of it."""
    gap = _CONVERTER_GAPS.get(node.op_type)
    return node.domain in _STANDARD and gap is not None and gap(node)


def expandable_ops(model: onnx.ModelProto, supported: Iterable[str]) -> set[str]:
    """Standard op types in ``model`` without a converter (or with a node its converter
    refuses, :data:`_CONVERTER_GAPS`) whose schema has a function."""
    opset = _opset(model)
    known = set(supported)
    ops = _op_types(model.graph) - known
    ops |= {n.op_type for n in _nodes(model.graph) if _converter_gap(n)}
    return {op for op in ops if _has_function(op, opset)}


def expand_schema_functions(model: onnx.ModelProto,
                            supported: Iterable[str]) -> onnx.ModelProto:
    """``model`` with every node of an op lacking a converter (``supported`` are the ops
    that have one) replaced by its schema's function body; ``model`` itself when there
    is none, or when an expansion would leave an op without a converter."""
    known = set(supported)
    todo = expandable_ops(model, known)
    if not todo:
        return model
    original = model
    model = onnx.ModelProto.FromString(model.SerializeToString())
    fix_shape_operands(model)
    expanded: set[str] = set()
    for _ in range(MAX_ROUNDS):
        if not todo:
            break
        try:
            # context-dependent bodies (the losses, CenterCropPad) need the input types
            _add_default_attributes(model, todo)
            typed = _typed(model)
            model = _inline(typed, todo, known)
        except Exception as error:  # noqa: BLE001 - onnx raises its C++ errors as anything
            logger.info("could not expand %s by their ONNX functions: %s",
                        ", ".join(sorted(todo)), str(error).strip().splitlines()[-1:])
            return original
        expanded |= todo
        todo = expandable_ops(model, known)
    left = _op_types(model.graph) - known - _UNROLLED
    if left:
        logger.info("not expanding %s: the bodies use ops without a converter (%s)",
                    ", ".join(sorted(expanded)), ", ".join(sorted(left)))
        return original
    logger.info("expanded %s by their ONNX function bodies", ", ".join(sorted(expanded)))
    return model
