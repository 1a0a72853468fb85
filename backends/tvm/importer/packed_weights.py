"""ONNX-proto rewrites that keep low-bit weights compressed through TVM's importer.

TVM 0.27's importer rejects ``DequantizeLinear``'s ``block_size``, cannot read 4-bit
initializers, and evaluates Cast and Gather of constants while importing (a codebook
weight would be stored expanded to float32). So before import, on the backend's own
copy of the model:

- :func:`pack_four_bit_weights` rewrites every 4-bit weight feeding
  ``DequantizeLinear`` (or ``kiln.DequantizeTable``) into ``uint8`` nibbles
  (:mod:`.nibbles`) and the node into an internal op (:mod:`.internal_ops`);
- :func:`codebook_weights` rewrites ``Reshape(Gather(codebook, Cast(index)), shape)``
  into the internal codebook op, one table-lookup kernel on import;
- :func:`four_bit_misuse` reports 4-bit tensors left over (read by other ops).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kiln.compiler.core.kiln_domain import DEQUANTIZE_TABLE
from kiln.compiler.core.kiln_domain import DOMAIN as KILN_DOMAIN

from . import internal_ops
from .nibbles import column_axis, pack_codes

logger = logging.getLogger(__name__)

_STANDARD_DOMAINS = ("", "ai.onnx")
_FOUR_BIT = {
    TensorProto.INT4: "int4",
    TensorProto.UINT4: "uint4",
    TensorProto.FLOAT4E2M1: "float4e2m1",
}
#: Element types of codebook indices that stay compressed (``quantize``'s codebook form).
_CODEBOOK_INDEX = (TensorProto.UINT8, TensorProto.UINT16)
_INDEX_CASTS = (TensorProto.INT64, TensorProto.INT32)


def four_bit_kind(data_type: int) -> str | None:
    """'int4', 'uint4' or 'float4e2m1' for a 4-bit ONNX element type, else None."""
    return _FOUR_BIT.get(data_type)


def initializers(graph: onnx.GraphProto) -> dict[str, TensorProto]:
    """``graph``'s initializers by name."""
    return {t.name: t for t in graph.initializer}


def attributes(node: onnx.NodeProto) -> dict:
    """``node``'s attributes as Python values, by name."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _import_internal_domain(model: onnx.ModelProto) -> None:
    if not any(o.domain == internal_ops.DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(internal_ops.DOMAIN, 1))


def _add_packed(graph: onnx.GraphProto, x: TensorProto, col_axis: int) -> str:
    """Append ``x``'s codes packed (tiled along ``col_axis``, or flat when -1); its name."""
    codes = numpy_helper.to_array(x).view(np.uint8)
    tensor = numpy_helper.from_array(pack_codes(codes, col_axis),
                                     f"{x.name}__kiln_nibbles{col_axis}")
    graph.initializer.append(tensor)
    return tensor.name


def pack_four_bit_weights(model: onnx.ModelProto) -> int:
    """Rewrite 4-bit weights that feed DequantizeLinear into packed uint8 (in place).

    ``model`` must be the backend's own copy. Returns how many nodes were
    rewritten. 4-bit zero points become int8/uint8 (they are small). A 4-bit
    initializer that something other than DequantizeLinear reads is left
    alone; :func:`four_bit_misuse` reports it.
    """
    graph = model.graph
    inits = initializers(graph)
    rewritten = 0
    packed_names: dict[tuple[str, int], str] = {}
    widened_zp: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.domain not in _STANDARD_DOMAINS:
            continue
        x = inits.get(node.input[0])
        if x is None or four_bit_kind(x.data_type) is None:
            continue
        kind = four_bit_kind(x.data_type)
        attrs = attributes(node)
        scale = inits.get(node.input[1])
        col_axis = column_axis(list(x.dims), int(attrs.get("axis", 1)),
                               int(attrs.get("block_size", 0)),
                               scale_rank=len(scale.dims) if scale is not None else 0)
        key = (x.name, col_axis)
        if key not in packed_names:
            packed_names[key] = _add_packed(graph, x, col_axis)
        inputs = [packed_names[key], node.input[1]]
        if len(node.input) > 2 and node.input[2]:
            zp = inits.get(node.input[2])
            if zp is not None and four_bit_kind(zp.data_type) is not None:
                if zp.name not in widened_zp:
                    wide = np.int8 if kind == "int4" else np.uint8
                    values = numpy_helper.to_array(zp).astype(wide)
                    wide_name = zp.name + "__kiln_wide"
                    graph.initializer.append(numpy_helper.from_array(values, wide_name))
                    widened_zp[zp.name] = wide_name
                inputs.append(widened_zp[zp.name])
            else:
                inputs.append(node.input[2])
        new = helper.make_node(
            internal_ops.PACKED_DEQUANTIZE, inputs, list(node.output), name=node.name,
            domain=internal_ops.DOMAIN, element=kind, shape=list(x.dims),
            axis=int(attrs.get("axis", 1)), layout=col_axis,
            block_size=int(attrs.get("block_size", 0)),
            output_dtype=int(attrs.get("output_dtype", 0)))
        node.CopyFrom(new)
        rewritten += 1
    for node in graph.node:
        if node.domain != KILN_DOMAIN or node.op_type != DEQUANTIZE_TABLE:
            continue
        x = inits.get(node.input[0])
        if x is None or four_bit_kind(x.data_type) not in ("int4", "uint4"):
            continue
        attrs = attributes(node)
        shape = list(x.dims)
        axis = int(attrs.get("axis", 0))
        col_axis = column_axis(shape, axis, 1, scale_rank=len(shape))
        key = (x.name, col_axis)
        if key not in packed_names:
            packed_names[key] = _add_packed(graph, x, col_axis)
        new = helper.make_node(
            internal_ops.PACKED_TABLE, [packed_names[key], *node.input[1:]], list(node.output),
            name=node.name, domain=internal_ops.DOMAIN, element=four_bit_kind(x.data_type),
            shape=shape, axis=axis, block_size=int(attrs.get("block_size", 1)), layout=col_axis)
        node.CopyFrom(new)
        rewritten += 1
    if rewritten:
        still_read = {name for n in graph.node for name in n.input}
        keep = [t for t in graph.initializer
                if not (four_bit_kind(t.data_type) and t.name not in still_read)]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        _import_internal_domain(model)
        logger.debug("packed %d 4-bit DequantizeLinear weight(s)", rewritten)
    return rewritten


def codebook_weights(model: onnx.ModelProto) -> int:
    """Rewrite codebook weights into :data:`.internal_ops.CODEBOOK` nodes (in place).

    kiln's codebook form is ``Reshape(Gather(codebook[k, d], Cast(index, int64)), shape)``
    with the index (uint8/uint16, one per length-d run of the weight) and the codebook
    initializers. TVM's importer evaluates Cast and Gather of constants while importing,
    so the library would store the expanded float32 weight; the internal op's converter
    is instead one TE kernel reading the index and the table, fused into the contraction
    that consumes the weight (``fuse_decode``). The Cast and Gather are dropped when
    nothing else reads them. Returns how many were rewritten.
    """
    graph = model.graph
    inits = initializers(graph)
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    for out in graph.output:
        readers[out.name] = readers.get(out.name, 0) + 1
    rewritten, dropped = 0, set()
    for node in graph.node:
        if node.op_type != "Reshape" or node.domain not in _STANDARD_DOMAINS \
                or len(node.input) < 2 or node.input[1] not in inits:
            continue
        gather = producer.get(node.input[0])
        if gather is None or gather.op_type != "Gather" or gather.domain not in _STANDARD_DOMAINS:
            continue
        table = inits.get(gather.input[0])
        cast = producer.get(gather.input[1])
        if int(attributes(gather).get("axis", 0)) != 0 or table is None \
                or len(table.dims) != 2 or cast is None or cast.op_type != "Cast":
            continue
        index = inits.get(cast.input[0])
        if index is None or index.data_type not in _CODEBOOK_INDEX or len(index.dims) != 1 \
                or int(attributes(cast).get("to", 0)) not in _INDEX_CASTS:
            continue
        shape = [int(d) for d in numpy_helper.to_array(inits[node.input[1]])]
        if any(d <= 0 for d in shape) or math.prod(shape) != index.dims[0] * table.dims[1]:
            continue
        new = helper.make_node(internal_ops.CODEBOOK, [index.name, table.name],
                               list(node.output), name=node.name, domain=internal_ops.DOMAIN,
                               shape=shape)
        node.CopyFrom(new)
        rewritten += 1
        for name in (gather.output[0], cast.output[0]):
            readers[name] -= 1
            if readers[name] == 0:
                dropped.add(name)
    if rewritten:
        keep = [n for n in graph.node if not (set(n.output) & dropped)]
        del graph.node[:]
        graph.node.extend(keep)
        _import_internal_domain(model)
        logger.debug("kept %d codebook weight(s) as index + codebook", rewritten)
    return rewritten


def four_bit_misuse(model: onnx.ModelProto) -> dict[str, str]:
    """4-bit tensors that TVM cannot take: ``{"<op> reads 4-bit <name>": node}``.

    Run after :func:`pack_four_bit_weights`; anything 4-bit left over is read by
    an op other than DequantizeLinear, or is a graph input.
    """
    graph = model.graph
    four_bit = {t.name for t in graph.initializer if four_bit_kind(t.data_type)}
    four_bit |= {v.name for v in graph.input if four_bit_kind(v.type.tensor_type.elem_type)}
    found: dict[str, str] = {}
    for node in graph.node:
        for name in node.input:
            if name in four_bit:
                found.setdefault(f"{node.op_type} reading 4-bit tensor {name!r}", node.name)
    return found
