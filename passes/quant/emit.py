"""The mechanism of ``quantize``: the ONNX nodes and initializers a plan becomes.

``emit_weight`` builds the decode graph of a weight (W^, see ``quantize``'s forms);
``emit_activation_qdq`` puts a Q/DQ pair in front of a weight op's activation. Every
node made here carries the metadata key ``kiln.quant``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from kiln.compiler.core import kiln_domain
from kiln.compiler.core.pass_api import add_initializer, remove_unused_initializers, unique_name
from kiln.passes.quant import kiln_ops
from kiln.passes.quant.config import ActivationQuant
from kiln.passes.quant.plan import WeightPlan
from kiln.passes.quant.weights import QUANT_KEY


def drop_constant(graph: ir.Graph, value: ir.Value) -> None:
    """Remove the replaced weight (initializer or Constant) once nothing reads it."""
    if value.uses() or value.is_graph_output():
        return
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant":
        graph.remove(producer, safe=True)
    elif value.name:
        remove_unused_initializers(graph, [value.name])


def emit_weight(model: ir.Model, old: ir.Value, plan: WeightPlan) -> tuple[list[ir.Node], ir.Value]:
    """Initializers and nodes computing W^ for ``plan``; returns (nodes, W^)."""
    graph = model.graph
    base = old.name or "weight"
    tag = {QUANT_KEY: plan.description}
    a = plan.arrays

    def init(suffix: str, array: np.ndarray) -> ir.Value:
        return add_initializer(graph, f"{base}_{suffix}", array)

    def node(domain: str, op: str, inputs: list[ir.Value | None], suffix: str,
             attributes: dict[str, Any] | None = None) -> ir.Node:
        attrs = [int_attribute(k, v) for k, v in (attributes or {}).items()]
        made = ir.Node(domain, op, inputs, attrs, num_outputs=1,
                       name=unique_name(graph, f"{base}_{suffix}"), metadata_props=dict(tag))
        made.outputs[0].name = unique_name(graph, f"{base}_{suffix}")
        return made

    nodes: list[ir.Node] = []
    if plan.form in ("dq", "power"):
        inputs = [init("quantized", a["q"]), init("scale", a["scale"])]
        if "zero_point" in a:
            inputs.append(init("zero_point", a["zero_point"]))
        nodes.append(node("", "DequantizeLinear", inputs, "dequantized", plan.attributes))
        if plan.form == "power":
            y = nodes[-1].outputs[0]
            nodes.append(node("", "Abs", [y], "abs"))
            nodes.append(node("", "Pow", [nodes[-1].outputs[0],
                                          init("inverse_exponent", a["inverse_exponent"])], "pow"))
            nodes.append(node("", "Sign", [y], "sign"))
            nodes.append(node("", "Mul", [nodes[-1].outputs[0], nodes[-2].outputs[0]],
                              "power_dequantized"))
    elif plan.form == "unpack_dq":
        kiln_ops.ensure_function(model, kiln_domain.UNPACK_BITS)
        unpack = node(kiln_domain.DOMAIN, kiln_domain.UNPACK_BITS, [init("packed", a["packed"])],
                      "codes", {"bits": plan.attributes["bits"],
                                "shape": plan.attributes["shape"]})
        attrs = {k: v for k, v in plan.attributes.items() if k in ("axis", "block_size")}
        nodes += [unpack, node("", "DequantizeLinear",
                               [unpack.outputs[0], init("scale", a["scale"]),
                                init("zero_point", a["zero_point"])], "dequantized", attrs)]
    elif plan.form == "table":
        kiln_ops.ensure_function(model, kiln_domain.DEQUANTIZE_TABLE)
        nodes.append(node(kiln_domain.DOMAIN, kiln_domain.DEQUANTIZE_TABLE,
                          [init("codes", a["codes"]), init("table", a["table"]),
                           init("scale", a["scale"])], "dequantized", plan.attributes))
    else:  # codebook
        cast = node("", "Cast", [init("index", a["index"])], "index64",
                    {"to": ir.DataType.INT64})
        gather = node("", "Gather", [init("codebook", a["codebook"]), cast.outputs[0]],
                      "vectors", {"axis": 0})
        nodes += [cast, gather, node("", "Reshape", [gather.outputs[0], init("shape", a["shape"])],
                                     "dequantized")]
    out = nodes[-1].outputs[0]
    out.shape, out.type = old.shape, old.type
    return nodes, out


def int_attribute(name: str, value: Any) -> ir.Attr:
    """An INT or INTS attribute (a DataType is written as its enum value)."""
    if isinstance(value, ir.DataType):
        return ir.AttrInt64(name, int(value))
    if isinstance(value, (list, tuple)):
        return ir.AttrInt64s(name, [int(v) for v in value])
    return ir.AttrInt64(name, int(value))


def emit_activation_qdq(graph: ir.Graph, node: ir.Node, cfg: ActivationQuant,
                        plan: WeightPlan, cache: dict[str, ir.Value]) -> None:
    """Quantize-dequantize ``node``'s first input: QuantizeLinear -> DequantizeLinear with the
    plan's calibrated (scale, zero point), or DynamicQuantizeLinear -> DequantizeLinear. One
    pair per activation and dtype: ``cache`` maps one already done to its dequantized value;
    ``plan.activation_dtype`` (int16: the fallback's higher precision) overrides the config's."""
    x = node.inputs[0]
    dtype = plan.activation_dtype or cfg.dtype
    key = f"{x.name}|{dtype}"
    if key in cache:
        node.replace_input_with(0, cache[key])
        return
    base = x.name or "x"
    tag = {QUANT_KEY: f"activation {'dynamic uint8' if cfg.dynamic else dtype}"}
    if cfg.dynamic:
        dql = ir.Node("", "DynamicQuantizeLinear", [x], num_outputs=3,
                      name=unique_name(graph, f"{base}_dynamic_quantize"), metadata_props=tag)
        q, s, z = dql.outputs
        q.name, s.name, z.name = (unique_name(graph, f"{base}_{p}")
                                  for p in ("quantized", "scale", "zero_point"))
        dq = ir.Node("", "DequantizeLinear", [q, s, z], num_outputs=1,
                     name=unique_name(graph, f"{base}_dequantize"), metadata_props=tag)
        new = [dql, dq]
    else:
        scale, zp = plan.activation
        zdtype = {"uint8": np.uint8, "int8": np.int8, "int16": np.int16}[dtype]
        s = add_initializer(graph, f"{base}_scale", np.array(scale, dtype=np.float32))
        z = add_initializer(graph, f"{base}_zero_point", np.array(zp, dtype=zdtype))
        ql = ir.Node("", "QuantizeLinear", [x, s, z], num_outputs=1,
                     name=unique_name(graph, f"{base}_quantize"), metadata_props=tag)
        ql.outputs[0].name = unique_name(graph, f"{base}_quantized")
        dq = ir.Node("", "DequantizeLinear", [ql.outputs[0], s, z], num_outputs=1,
                     name=unique_name(graph, f"{base}_dequantize"), metadata_props=tag)
        new = [ql, dq]
    out = dq.outputs[0]
    out.name = unique_name(graph, f"{base}_dequantized")
    out.shape, out.type = x.shape, x.type
    graph.insert_before(node, new)
    node.replace_input_with(0, out)
    cache[key] = out
