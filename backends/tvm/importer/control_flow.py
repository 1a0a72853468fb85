"""``If`` nodes made ready for TVM's importer (on the backend's ONNX copy, in place).

Exported models branch on shapes and on configuration inputs (silero-vad: on the sample
rate, then on the input's rank). Once the input shapes are bound and constants folded,
most conditions are constants: :func:`inline_constant_ifs` replaces such an ``If`` by the
nodes of the branch it takes (names prefixed with the If's, so they cannot collide; the
branch's outputs renamed to the If's). onnxscript's folder leaves control flow alone
("not supported yet"), and the inlined branch often holds more foldable shape chains, so
:mod:`.prepare` folds again afterwards (:func:`.unroll.fold_control_flow`).

An ``If`` on a value known only at run time is left to TVM's importer, which converts
both branches into a Relax ``If``.

:func:`should_fold` lets the folder evaluate a small ``ConstantOfShape`` (onnxscript
preserves every one by default): PyTorch's ``F.pad`` export builds its pads with one.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

logger = logging.getLogger(__name__)

#: A ConstantOfShape of up to this many elements is folded (pads, small masks).
MAX_FOLDED_ELEMENTS = 1 << 16


def should_fold(node) -> bool | None:
    """onnxscript ``should_fold``: True for a small constant ``ConstantOfShape``, else the
    folder's default rules (None)."""
    if node.op_type != "ConstantOfShape" or node.domain not in ("", "ai.onnx"):
        return None
    shape = node.inputs[0].const_value if node.inputs and node.inputs[0] is not None else None
    if shape is None:
        return None
    return int(np.prod(shape.numpy())) <= MAX_FOLDED_ELEMENTS


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node values of ``graph``, by name (not outer scopes)."""
    found = {init.name: init for init in graph.initializer}
    values = {name: numpy_helper.to_array(init) for name, init in found.items()
              if int(np.prod(init.dims)) == 1}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value" and int(np.prod(attr.t.dims)) == 1:
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _branch(node: onnx.NodeProto, name: str) -> onnx.GraphProto:
    return next(attr.g for attr in node.attribute if attr.name == name)


def inline_graph(branch: onnx.GraphProto, outputs: list[str], prefix: str,
                 inputs: list[str] | None = None
                 ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The subgraph's nodes and initializers with its own names prefixed, its outputs
    renamed to ``outputs`` and its formal inputs to ``inputs`` (a Scan/Loop body).
    Names from outer scopes are kept."""
    local = {init.name for init in branch.initializer}
    for node in branch.node:
        local.update(o for o in node.output if o)
    rename = {name: f"{prefix}/{name}" for name in local}
    rename.update({out.name: new for out, new in zip(branch.output, outputs) if out.name in local})
    rename.update({formal.name: actual for formal, actual in zip(branch.input, inputs or [])})

    def fix(name: str) -> str:
        return rename.get(name, name)

    passthrough = [(fix(out.name), new) for out, new in zip(branch.output, outputs)
                   if out.name not in local]

    nodes = []
    for node in branch.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"{prefix}/{node.name}" if node.name else ""
        copy.input[:] = [fix(i) if i else i for i in node.input]
        copy.output[:] = [fix(o) if o else o for o in node.output]
        _rename_captures(copy, rename)
        nodes.append(copy)
    # a branch output that is an outer value (or a branch input) needs a node to carry it
    nodes += [onnx.helper.make_node("Identity", [source], [target], name=f"{prefix}/{target}")
              for source, target in passthrough]
    inits = []
    for init in branch.initializer:
        copy = onnx.TensorProto()
        copy.CopyFrom(init)
        copy.name = fix(init.name)
        inits.append(copy)
    return nodes, inits


def _rename_captures(node: onnx.NodeProto, rename: dict[str, str]) -> None:
    """Rename, inside ``node``'s own subgraphs, the values they capture from the branch."""
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for graph in graphs:
            inner = {i.name for i in graph.input} | {i.name for i in graph.initializer}
            for sub in graph.node:
                inner.update(sub.output)
            for sub in graph.node:
                sub.input[:] = [rename.get(i, i) if i and i not in inner else i
                                for i in sub.input]
                _rename_captures(sub, rename)
            for out in graph.output:
                if out.name not in inner and out.name in rename:
                    out.name = rename[out.name]


def inline_constant_ifs(graph: onnx.GraphProto) -> int:
    """Replace every ``If`` of ``graph`` (and of its subgraphs) whose condition is a
    constant by the branch it takes, in place. Returns how many were replaced."""
    replaced = 0
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs):
                replaced += inline_constant_ifs(sub)
    constants = _constants(graph)
    kept: list[onnx.NodeProto] = []
    for index, node in enumerate(graph.node):
        cond = node.input[0] if node.op_type == "If" and node.input else None
        if cond is None or cond not in constants or node.domain not in ("", "ai.onnx"):
            kept.append(node)
            continue
        taken = "then_branch" if bool(constants[cond].reshape(())) else "else_branch"
        prefix = node.name or f"If_{index}"
        nodes, inits = inline_graph(_branch(node, taken), list(node.output), prefix)
        kept.extend(nodes)
        graph.initializer.extend(inits)
        replaced += 1
        logger.debug("If %r: condition is constant, inlined its %s", node.name, taken)
    if replaced:
        del graph.node[:]
        graph.node.extend(kept)
    return replaced

