"""The backend's own ONNX copy of a model, made ready for TVM's importer.

:func:`prepare_onnx` serializes the ``onnx_ir`` model and, on that copy:

1. rewrites other tools' quantized ops (QOperator, MatMulInteger/ConvInteger, MatMulNBits)
   into QDQ form (:mod:`.foreign_quant`), so they reach the same kernels as kiln's own;
2. fixes shape/axes/k operands fed by model inputs to the value the declared output
   shape implies (:mod:`.static_operands`);
3. evaluates small constant ``kiln.UnpackBits`` nodes that feed index computations
   (:func:`fold_index_unpacks`: a salient-rows mask -> NonZero), so the indices fold;
4. folds constants again when shape computations are left (``Shape``/``Size``): TVM's
   importer fails on Reshape/Resize fed by computed shapes (:func:`refold`; a constant
   node of several outputs, which onnxscript's folder skips, is evaluated too);
5. drops the bodies of kiln's model-local functions (their ops have converters, so
   packed weights stay packed) and inlines any other function;
6. rewrites ops whose TVM converters are wrong at their edges (:mod:`.edge_cases`:
   IsInf's detect flags, float Mod with fmod=0, out-of-range BitShift amounts);
7. keeps 4-bit and codebook weights compressed (:mod:`.packed_weights`).

Before all of these, ops without a converter that ONNX defines by a function (the
losses, Celu, Swish, CenterCropPad, the windows) become that function's body
(:mod:`.schema_functions`), and kiln's emitted top-k MoE dispatch becomes one internal
op (:mod:`.moe_dispatch`; its kernels: :mod:`.moe_kernels`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import onnx
import onnx_ir as ir
from onnx import numpy_helper

from kiln.compiler.core.errors import LoweringError
from kiln.compiler.core.kiln_domain import DEQUANTIZE_TABLE, UNPACK_BITS, is_kiln_op
from kiln.compiler.core.kiln_domain import DOMAIN as KILN_DOMAIN
from kiln.compiler.core.packing import unpack_bits

from .control_flow import should_fold
from .converters import supported_op_types
from .edge_cases import rewrite_edge_cases
from .foreign_quant import lower_foreign_quant
from .moe_dispatch import fuse_moe_dispatch
from .packed_weights import attributes, codebook_weights, initializers, pack_four_bit_weights
from .schema_functions import expand_schema_functions
from .static_operands import fix_shape_operands
from .unroll import fold_control_flow

logger = logging.getLogger(__name__)

#: (a small ConstantOfShape folds too: control_flow.should_fold)
_SHAPE_OPS = frozenset({"Shape", "Size", "ConstantOfShape"})
#: kiln.UnpackBits outputs up to this many codes that feed index computations (a
#: salient-rows mask -> NonZero) are evaluated before import, so the indices fold.
MAX_FOLDED_CODES = 1 << 16
#: Consumers that read unpacked codes as a weight (those stay packed in the kernel).
_DECODE_CONSUMERS = frozenset({"DequantizeLinear", DEQUANTIZE_TABLE})


def walk_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and of its subgraphs (If/Loop bodies), depth first."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from walk_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from walk_nodes(sub)


def fold_index_unpacks(model: onnx.ModelProto) -> int:
    """Evaluate small constant ``kiln.UnpackBits`` nodes that feed non-decode ops (in place).

    Their codes are an index computation (masks), not a weight: as initializers they
    let constant folding resolve what reads them (NonZero, Concat) to static indices.
    Returns how many nodes were replaced.
    """
    graph = model.graph
    inits = initializers(graph)
    readers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    keep, folded = [], 0
    for node in graph.node:
        attrs = attributes(node)
        if (node.domain == KILN_DOMAIN and node.op_type == UNPACK_BITS
                and node.input[0] in inits
                and math.prod(attrs.get("shape", [])) <= MAX_FOLDED_CODES
                and readers.get(node.output[0], set()) - _DECODE_CONSUMERS):
            codes = unpack_bits(numpy_helper.to_array(inits[node.input[0]]), int(attrs["bits"]),
                                attrs["shape"])
            graph.initializer.append(numpy_helper.from_array(codes, node.output[0]))
            folded += 1
            continue
        keep.append(node)
    if folded:
        del graph.node[:]
        graph.node.extend(keep)
        logger.debug("evaluated %d index kiln.UnpackBits node(s) before import", folded)
    return folded


def refold(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Constant-fold a copy with onnxscript's folder (shape chains -> constants).

    Folding only: onnxscript's rewrite rules (BatchNorm fusion, ...) are kiln
    passes that a spec chooses, not something lowering does behind its back.
    """
    from onnx_ir.passes import common
    from onnxscript.optimizer import fold_constants

    copy = ir.serde.deserialize_model(proto)
    # kiln's functions are lowered as ops (packed weights stay packed): not inlined here
    kiln = {key: copy.functions.pop(key) for key in list(copy.functions)
            if is_kiln_op(key[0], key[1])}
    common.InlinePass()(copy)
    fold_constants(copy, onnx_shape_inference=True, should_fold=should_fold)
    if fold_constant_multi_outputs(copy.graph):  # then what they fed folds too
        fold_constants(copy, onnx_shape_inference=True, should_fold=should_fold)
    common.RemoveUnusedNodesPass()(copy)
    copy.functions.update(kiln)
    return ir.serde.serialize_model(copy)


#: a node of several outputs is evaluated when its constant inputs hold at most this many
#: elements (onnxscript's folder skips such nodes: a Split of an AffineGrid's fixed size)
MAX_FOLDED_ELEMENTS = 1 << 16


def fold_constant_multi_outputs(graph: ir.Graph) -> int:
    """Evaluate each standard node of ``graph`` with several outputs and only constant
    inputs (onnx's reference evaluator), its outputs becoming initializers; returns how
    many (in place)."""
    from onnx.reference import ReferenceEvaluator

    folded = 0
    for node in list(graph):
        inputs = [v for v in node.inputs if v is not None]
        if node.domain not in ("", "ai.onnx") or len(node.outputs) < 2 or not inputs or \
                any(v.const_value is None for v in inputs) or \
                sum(v.const_value.size for v in inputs) > MAX_FOLDED_ELEMENTS:
            continue
        feeds = {v.name: v.const_value.numpy() for v in inputs}
        opsets = {"": graph.opset_imports.get("", 1)}
        try:
            results = ReferenceEvaluator(ir.serde.serialize_node(node), opsets=opsets).run(
                None, feeds)
        except Exception:  # noqa: BLE001 - left for TVM's converter
            continue
        for out, array in zip(node.outputs, results):
            value = ir.Value(name=out.name, const_value=ir.tensor(array, name=out.name))
            out.name = None
            graph.register_initializer(value)
            ir.convenience.replace_all_uses_with(out, value)
            if out.is_graph_output():
                graph.outputs[graph.outputs.index(out)] = value
        graph.remove(node, safe=True)
        folded += 1
    return folded


def drop_kiln_functions(proto: onnx.ModelProto, target_name: str | None) -> onnx.ModelProto:
    """Remove kiln's function bodies (their ops have converters); inline any other function.

    kiln's ops are converted directly so that packed weights stay packed; a model's
    other local functions are inlined with onnx_ir's InlinePass (kiln's own calls
    are kept: their functions are set aside while inlining).
    """
    kiln = [f for f in proto.functions if is_kiln_op(f.domain, f.name)]
    others = [f for f in proto.functions if not is_kiln_op(f.domain, f.name)]
    if others:
        from onnx_ir.passes import common

        proto = onnx.ModelProto.FromString(proto.SerializeToString())
        del proto.functions[:]
        proto.functions.extend(others)
        model = ir.serde.deserialize_model(proto)
        common.InlinePass()(model)
        proto = ir.serde.serialize_model(model)
        if proto.functions:
            raise LoweringError("model has local functions that could not be inlined: "
                                + ", ".join(f"{f.domain}::{f.name}" for f in proto.functions),
                                target=target_name)
    elif kiln:
        del proto.functions[:]
    return proto


def prepare_onnx(model: ir.Model, target_name: str | None = None) -> onnx.ModelProto:
    """The backend's own ONNX copy of ``model``, folded if needed, weights kept packed."""
    proto = ir.serde.serialize_model(model)
    proto = expand_schema_functions(proto, supported_op_types())
    fuse_moe_dispatch(proto)
    lower_foreign_quant(proto)
    fix_shape_operands(proto)
    if fold_index_unpacks(proto) or \
            any(n.op_type in _SHAPE_OPS for n in walk_nodes(proto.graph)):
        logger.info("model still computes shapes; folding constants before import")
        proto = refold(proto)
    proto = fold_control_flow(proto, refold)
    proto = drop_kiln_functions(proto, target_name)
    rewrite_edge_cases(proto)
    pack_four_bit_weights(proto)
    codebook_weights(proto)
    return proto
