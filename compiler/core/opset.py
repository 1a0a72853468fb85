"""The generic opset upgrader: raise a model's default ONNX opset (``ensure_opset``).

A pass that emits an op of a newer opset than the model's (blocked DequantizeLinear needs
21, per-axis QuantizeLinear 13) first raises the whole model. Every standard-domain node
whose operator changed between the two opsets goes through onnx's version converter, each
node on its own, and the model changes only once every node has converted (otherwise a
``PassError`` names the opset, the op and the node). Weights never leave the model.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from kiln.compiler.core import graph as kir
from kiln.compiler.core.errors import PassError

logger = logging.getLogger(__name__)

#: Opset of blocked DequantizeLinear, INT4/UINT4 and FLOAT8 (and of kiln's functions).
BLOCKED_OPSET = 21
#: Opset of per-axis QuantizeLinear/DequantizeLinear.
PER_AXIS_OPSET = 13
#: IR version that knows opset 21's 4-bit types and model-local functions.
BLOCKED_IR_VERSION = 10

#: Tensor attributes larger than this go through onnx's converter as a one-element stand-in
#: (only Constant/ConstantOfShape carry tensors; their upgrades never touch them).
_STAND_IN_ELEMENTS = 64
_TAG = re.compile(r"^[io](\d+)_(\d+)$")


def _default_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


def ensure_opset(model: ir.Model, needed: int, *, pass_name: str) -> None:
    """Raise the model's default opset to ``needed`` and its IR version to one that knows
    the opset (and, for ``BLOCKED_OPSET``, 4-bit types and local functions).

    Every standard-domain node whose operator changed between the two opsets (main graph,
    subgraphs, model-local functions) goes through onnx's version converter, all in one
    call but each node on its own, so only its own signature changes: a node whose upgrade
    is a version bump is left as it is; one whose inputs or attributes changed (ReduceMean's
    ``axes`` attribute -> input, Clip-6's ``min``/``max``...) is edited in place with the
    converter's new nodes (Constants) before it; one that becomes other nodes (Softmax-11's
    2-D coercion, Upsample -> Resize) is replaced, its outputs keeping their names and uses.
    Weights never leave the model. The converter's result is checked against the target
    opset's schemas, and the model changes only once every node has converted: otherwise
    ``PassError`` names the model's opset, the op and the node that block it. (onnxscript's
    converter, used before, starts at opset 18, inlines model-local functions and leaves a
    node it cannot convert as it was, under the new opset import.)
    """
    current = _default_opset(model)
    if current < needed:
        batches: dict[int, list[ir.Node]] = {}
        for container, opset in [(model.graph, current)] + [
                (f, f.opset_imports.get("", f.opset_imports.get("ai.onnx", current)))
                for f in model.functions.values()]:
            if opset >= needed:
                continue
            for node in ir.traversal.RecursiveGraphIterator(container):
                if node.domain in ("", "ai.onnx") and _op_changed(node, opset, needed,
                                                                  pass_name):
                    batches.setdefault(opset, []).append(node)
        # Some adapters need input ranks (Add-6 broadcast): infer what the model does not say.
        known = _inferred_types(model) if any(
            v is not None and (v.type is None or v.shape is None)
            for nodes in batches.values() for n in nodes for v in n.inputs) else {}
        names = _NameSource(model)
        upgrades: list[_Upgrade] = []
        retypes: list[_Retype] = []
        for opset, nodes in batches.items():
            planned, types = _plan_upgrades(nodes, opset, needed, pass_name, known)
            upgrades += planned
            retypes += types
        replaced: dict[ir.Value, ir.Value] = {}
        for upgrade in upgrades:                      # nothing has changed until here
            upgrade.apply(names, replaced)
        for value, dtype in retypes:                  # e.g. Dropout's mask: float -> bool
            replaced.get(value, value).dtype = dtype
        for opsets in [model.opset_imports] + [f.opset_imports for f in model.functions.values()]:
            for domain in ("", "ai.onnx"):
                if domain in opsets and opsets[domain] < needed:
                    opsets[domain] = needed
        model.opset_imports[""] = needed
        logger.info("raised the model's opset from %d to %d (%d nodes rewritten)", current,
                    needed, len(upgrades))
    min_ir = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", needed)])
    blocked_ir = BLOCKED_IR_VERSION if needed >= BLOCKED_OPSET else 0
    model.ir_version = max(model.ir_version or 0, min_ir, blocked_ir)


def _op_changed(node: ir.Node, opset: int, needed: int, pass_name: str) -> bool:
    try:
        old = onnx.defs.get_schema(node.op_type, opset, "").since_version
    except onnx.defs.SchemaError:
        raise PassError(f"cannot raise the model from opset {opset} to {needed}: "
                        f"{node.op_type} ({kir.node_label(node)}) is not a standard op at "
                        f"opset {opset}", pass_name=pass_name) from None
    return onnx.defs.get_schema(node.op_type, needed, "").since_version != old


class _NameSource:
    """Fresh value names, unique across the model, for the converter's new values."""

    def __init__(self, model: ir.Model) -> None:
        self.taken: set[str] = set()
        containers: list[ir.Graph | ir.Function] = [*model.graphs(), *model.functions.values()]
        for graph in containers:
            self.taken.update(v.name or "" for v in graph.inputs)
            if isinstance(graph, ir.Graph):
                self.taken.update(graph.initializers)
            for node in ir.traversal.RecursiveGraphIterator(graph):
                self.taken.update(v.name or "" for v in node.outputs)

    def __call__(self, base: str) -> str:
        name, i = base, 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name


@dataclass
class _Upgrade:
    """How one node becomes its target-opset form. ``new_nodes`` (the converter's, still
    reading its stand-in values, which ``sent`` maps to the model's) go before it; then
    either the node itself takes ``main``'s inputs and attributes (same op, same outputs) or
    ``new_nodes`` replace it, ``outputs[k]`` standing for its output k."""

    node: ir.Node
    new_nodes: list[ir.Node]
    sent: dict[str, ir.Value]
    main: ir.Node | None = None
    outputs: dict[int, ir.Value] = field(default_factory=dict)

    def apply(self, names: _NameSource, replaced: dict[ir.Value, ir.Value]) -> None:
        """Make the change; ``replaced`` maps the outputs of nodes replaced so far to the
        values that stand for them (a later node may read one)."""
        node, container = self.node, self.node.graph
        assert container is not None, "the node was taken out of its graph"
        base = (node.outputs[0].name if node.outputs else None) or node.op_type.lower()
        keep = {id(v) for v in self.outputs.values()}
        for made in [*self.new_nodes, *([self.main] if self.main else [])]:
            for j, value in enumerate(made.inputs):
                if value is not None and value.name in self.sent and value.producer() is None:
                    made.replace_input_with(j, replaced.get(self.sent[value.name],
                                                            self.sent[value.name]))
        for i, made in enumerate(self.new_nodes):
            for key, prop in node.metadata_props.items():
                made.metadata_props.setdefault(key, prop)
            made.name = None if not node.name else node.name \
                if self.main is None and made is self.new_nodes[-1] else \
                f"{node.name}_{made.op_type}_{i}"
            for value in made.outputs:
                if id(value) not in keep:
                    value.name = names(f"{base}_{made.op_type.lower()}")
        container.insert_before(node, self.new_nodes)
        if self.main is not None:
            inputs = list(self.main.inputs)
            self.main.resize_inputs(0)
            node.resize_inputs(len(inputs))
            for j, value in enumerate(inputs):
                node.replace_input_with(j, value)
            node.attributes.clear()
            for attr in self.main.attributes.values():
                node.attributes[attr.name] = attr
            return
        for k, new in self.outputs.items():
            old = node.outputs[k]
            name = old.name
            old.replace_all_uses_with(new, replace_graph_outputs=True)
            new.type, new.shape = old.type or new.type, old.shape or new.shape
            old.name = None
            new.name = name
            replaced[old] = new
        container.remove(node, safe=True)


def _stand_in(node: ir.Node, i: int) -> tuple[onnx.NodeProto, bool]:
    """``node`` as a NodeProto with tagged input/output names (i{i}_{j} / o{i}_{k}), its
    subgraphs emptied and large tensors shrunk, never serialized (then the second item is
    True: the conversion must leave the node as it is)."""
    proto = onnx.NodeProto(op_type=node.op_type, name=node.name or "")
    proto.input.extend("" if v is None else f"i{i}_{j}" for j, v in enumerate(node.inputs))
    proto.output.extend("" if v.name == "" else f"o{i}_{k}" for k, v in enumerate(node.outputs))
    shrunk = False
    for attr in node.attributes.values():
        if attr.is_ref():
            proto.attribute.append(ir.serde.serialize_reference_attribute(attr))
        elif attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            proto.attribute.append(onnx.helper.make_attribute(
                attr.name, onnx.GraphProto(), attr_type=onnx.AttributeProto.GRAPH))
            shrunk = True
        elif attr.type == ir.AttributeType.TENSOR and \
                attr.as_tensor().size > _STAND_IN_ELEMENTS:
            stand_in = np.zeros(1, attr.as_tensor().dtype.numpy())
            proto.attribute.append(onnx.helper.make_attribute(
                attr.name, ir.serde.serialize_tensor(ir.tensor(stand_in))))
            shrunk = True
        else:
            proto.attribute.append(ir.serde.serialize_attribute(attr))
    return proto, shrunk


def _inferred_types(model: ir.Model) -> dict[str, onnx.TypeProto]:
    """onnx's shape inference over the main graph, initializers sent as typed inputs (no
    data), the model left untouched."""
    graph = model.graph
    inputs = [ir.serde.serialize_value(v) for v in graph.inputs]
    taken = {v.name for v in graph.inputs}
    for name, value in graph.initializers.items():
        if name not in taken and value.const_value is not None:
            inputs.append(onnx.helper.make_tensor_value_info(
                name, int(value.const_value.dtype), [int(d) for d in value.const_value.shape.numpy()]))
    proto = onnx.helper.make_model(
        onnx.helper.make_graph([ir.serde.serialize_node(n) for n in graph], "infer", inputs,
                               [ir.serde.serialize_value(v) for v in graph.outputs]),
        opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()],
        functions=[ir.serde.serialize_function(f) for f in model.functions.values()])
    proto.ir_version = max(model.ir_version or 0, 8 if model.functions else 3)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception:  # inference is best effort here
        return {}
    return {v.name: v.type for v in [*proto.graph.value_info, *proto.graph.output]}


def _value_info(value: ir.Value, name: str, known: dict[str, onnx.TypeProto]
                ) -> onnx.ValueInfoProto:
    info = ir.serde.serialize_value(value, name=name)
    if (value.type is None or value.shape is None) and value.name in known:
        info.type.CopyFrom(known[value.name])
    if not info.HasField("type"):
        info.type.tensor_type.elem_type = onnx.TensorProto.UNDEFINED
    return info


def _convert(protos: list[onnx.NodeProto], infos: list[onnx.ValueInfoProto], opset: int,
             needed: int) -> onnx.ModelProto:
    inputs = {name for p in protos for name in p.input if name}
    graph = onnx.helper.make_graph(
        protos, "upgrade", [i for i in infos if i.name in inputs],
        [onnx.helper.make_value_info(name, onnx.TypeProto()) for p in protos
         for name in p.output if name])
    mini = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    return onnx.version_converter.convert_version(mini, needed)


_Retype = tuple[ir.Value, ir.DataType]


def _plan_upgrades(nodes: list[ir.Node], opset: int, needed: int, pass_name: str,
                   known: dict[str, onnx.TypeProto]) -> tuple[list[_Upgrade], list[_Retype]]:
    """One onnx version-converter call for ``nodes`` (each its own island of the graph it is
    sent in), checked: ``_Upgrade``s for the nodes that do not just change version, and the
    outputs whose element type the target opset's type inference changes."""
    def fail(node: ir.Node, why: str) -> PassError:
        return PassError(f"cannot raise the model from opset {opset} to {needed}: "
                         f"{node.op_type} ({kir.node_label(node)}) {why}", pass_name=pass_name)

    stand_ins = [_stand_in(node, i) for i, node in enumerate(nodes)]
    infos = [_value_info(v, f"i{i}_{j}", known) for i, node in enumerate(nodes)
             for j, v in enumerate(node.inputs) if v is not None]
    try:
        converted = _convert([p for p, _ in stand_ins], infos, opset, needed)
    except Exception:  # find the op that blocks, for the message
        for op in dict.fromkeys(node.op_type for node in nodes):
            some = [i for i, node in enumerate(nodes) if node.op_type == op]
            try:
                _convert([stand_ins[i][0] for i in some], infos, opset, needed)
            except Exception as error:
                detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
                detail = detail.rsplit("failed: ", 1)[-1]     # the C++ assertion's message
                raise fail(nodes[some[0]], f"does not convert ({detail})") from error
        raise
    if opset < 21 <= needed:
        _group_norm_21(converted.graph)
    ctx = onnx.checker.C.CheckerContext()
    ctx.ir_version = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", needed)])
    ctx.opset_imports = {"": needed}
    owner = _owners(converted.graph)
    for made in converted.graph.node:
        try:
            onnx.checker.check_node(made, ctx)
        except Exception as error:  # the converter left an invalid node
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                   for a in made.attribute) and "graph" in str(error).lower():
                continue        # an emptied subgraph stand-in; the node is kept as it is
            node = nodes[owner[made.output[0] if made.output else made.name]]
            raise fail(node, f"converts to an invalid {made.op_type} "
                       f"({str(error).strip().splitlines()[0]})") from error
    types = _output_types(converted)
    retypes = [(v, types[f"o{i}_{k}"]) for i, node in enumerate(nodes)
               for k, v in enumerate(node.outputs)
               if v.dtype is not None and types.get(f"o{i}_{k}", v.dtype) != v.dtype]
    protos: dict[int, list[onnx.NodeProto]] = {}
    for made in converted.graph.node:
        if made.output[0] not in owner:
            raise PassError(f"cannot raise the model from opset {opset} to {needed}: onnx's "
                            f"converter made a {made.op_type} that adapts no node",
                            pass_name=pass_name)
        protos.setdefault(owner[made.output[0]], []).append(made)
    todo = [i for i, (proto, _) in enumerate(stand_ins)
            if not (len(protos.get(i, [])) == 1 and _same_node(protos[i][0], proto))]
    for i in todo:
        if stand_ins[i][1]:
            raise fail(nodes[i], "needs a rewrite of a graph or large tensor attribute")
    if not todo:
        return [], retypes
    graph = ir.serde.deserialize_model(converted).graph
    graph.outputs.clear()
    groups: dict[int, list[ir.Node]] = {}
    for made in graph:
        groups.setdefault(owner[made.outputs[0].name or ""], []).append(made)
    upgrades = []
    for i in todo:
        node, group = nodes[i], groups.get(i, [])
        graph.remove(group)
        sent = {f"i{i}_{j}": v for j, v in enumerate(node.inputs) if v is not None}
        new_nodes: list[ir.Node] = []
        for made in group:              # the converter's initializers become Constants
            for j, value in enumerate(made.inputs):
                if value is not None and value.name not in sent and value.producer() is None:
                    if value.const_value is None:
                        raise fail(node, f"reads {value.name!r}, which the converter left "
                                   "undefined")
                    constant = ir.Node("", "Constant", [], [ir.AttrTensor(
                        "value", value.const_value)], num_outputs=1)
                    new_nodes.append(constant)
                    made.replace_input_with(j, constant.outputs[0])
        tagged = {int(m.group(2)): v for made in group for v in made.outputs
                  if (m := _TAG.match(v.name or "")) and (v.name or "").startswith("o")}
        for k, value in enumerate(node.outputs):
            if k not in tagged and (value.uses() or value.is_graph_output()):
                raise fail(node, f"loses its output {value.name!r} in the conversion")
        main = group[-1] if group else None
        if main is not None and main.op_type == node.op_type and \
                len(main.outputs) == len(node.outputs) and \
                all(main.outputs[k] is v for k, v in tagged.items()):
            upgrades.append(_Upgrade(node, new_nodes + group[:-1], sent, main=main))
        else:
            upgrades.append(_Upgrade(node, new_nodes + group, sent, outputs=tagged))
    return upgrades, retypes


def _output_types(converted: onnx.ModelProto) -> dict[str, ir.DataType]:
    """Element types of the converted graph's outputs under the target opset's inference
    (the converter keeps those inferred at the source opset)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(converted)
    del probe.graph.value_info[:]
    for out in probe.graph.output:
        out.ClearField("type")
    try:
        probe = onnx.shape_inference.infer_shapes(probe)
    except Exception:  # inference is best effort here
        return {}
    return {out.name: ir.DataType(out.type.tensor_type.elem_type) for out in probe.graph.output
            if out.type.tensor_type.elem_type}


def _owners(graph: onnx.GraphProto) -> dict[str, int]:
    """For each value (and node) name of the converted graph, which sent node it belongs to:
    the converter only adds nodes connected to the node they adapt."""
    owner: dict[str, int] = {}
    for name in [n for node in graph.node for n in (*node.input, *node.output)]:
        if (m := _TAG.match(name)):
            owner[name] = int(m.group(1))
    changed = True
    while changed:
        changed = False
        for node in graph.node:
            names = [n for n in (*node.input, *node.output) if n]
            found = next((owner[n] for n in names if n in owner), None)
            if found is None:
                continue
            for n in names:
                if n not in owner:
                    owner[n] = found
                    changed = True
    return owner


def _same_node(a: onnx.NodeProto, b: onnx.NodeProto) -> bool:
    def key(p: onnx.NodeProto) -> tuple:
        return (p.op_type, p.domain or "", list(p.input), list(p.output),
                sorted(x.SerializeToString() for x in p.attribute))

    return key(a) == key(b)


def _group_norm_21(graph: onnx.GraphProto) -> None:
    """GroupNormalization-18's scale/bias are per group, 21's per channel: repeat them (onnx's
    own GroupNormalization_20_21 adapter is registered, then replaced by a compatible one)."""
    h = onnx.helper
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type == "GroupNormalization" and _TAG.match(node.input[1]):
            groups = next(a.i for a in node.attribute if a.name == "num_groups")
            p = f"{node.output[0]}_repeat"

            def const(name: str, values: list[int]) -> onnx.NodeProto:
                return h.make_node("Constant", [], [f"{p}_{name}"], value=h.make_tensor(  # noqa: B023
                    "", onnx.TensorProto.INT64, [len(values)], values))

            nodes += [h.make_node("Shape", [node.input[0]], [f"{p}_c"], start=1, end=2),
                      const("g", [groups]), h.make_node("Div", [f"{p}_c", f"{p}_g"],
                                                        [f"{p}_per"]),
                      const("one", [1]), h.make_node("Concat", [f"{p}_one", f"{p}_per"],
                                                     [f"{p}_expand"], axis=0),
                      const("column", [-1, 1]), const("flat", [-1])]
            for j in (1, 2):
                nodes += [h.make_node("Reshape", [node.input[j], f"{p}_column"], [f"{p}{j}_a"]),
                          h.make_node("Expand", [f"{p}{j}_a", f"{p}_expand"], [f"{p}{j}_b"]),
                          h.make_node("Reshape", [f"{p}{j}_b", f"{p}_flat"], [f"{p}{j}"])]
                node.input[j] = f"{p}{j}"
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
