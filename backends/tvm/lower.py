"""Lower an ``onnx_ir.Model`` to a Relax ``IRModule`` with TVM's ONNX importer.

TVM's importer does the standard ops; kiln extends its converter table (a
module-level function, ``_get_convert_map``, swapped for the duration of one
import under a lock) with the forms kiln's passes produce: blocked
``DequantizeLinear``, 4-bit weights, kiln's model-local functions
``kiln.UnpackBits`` / ``kiln.DequantizeTable`` (converted as ops, so their
weights stay packed; their function bodies are dropped), and MatMul on a 4-bit
weight as a grouped GEMV on CPU targets (see :mod:`.dequantize`). Other local
functions are inlined. Small bit-packed masks feeding index computations are
evaluated before import so that the indices fold to constants.

Before importing, every node is checked and one :class:`LoweringError` lists
every unsupported op type with one node name each, so a user sees all the
work at once rather than one op per attempt.

Inputs must have static shapes (the frontend binds them from the spec and
folds constants with ``onnxscript.optimizer``); if shape computations are
still present (``Shape``/``Size`` nodes), folding is run again here on a copy,
since TVM's importer fails on Reshape/Resize fed by computed shapes.
Weights become constants in the module (one self-contained ``.so``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import warnings
from collections.abc import Iterator

import onnx
import onnx_ir as ir

from kiln.compiler.core.errors import LoweringError
from kiln.compiler.core.graph import graph_inputs

from .dequantize import (
    CODEBOOK_OP,
    KILN_DOMAIN,
    PACKED_DOMAIN,
    PACKED_OP,
    PACKED_TABLE_OP,
    CodebookDecode,
    DequantizeTable,
    PackedDequantizeLinear,
    PackedDequantizeTable,
    UnpackBits,
    blocked_dequantize_linear,
    codebook_weights,
    fold_index_unpacks,
    four_bit_misuse,
    kiln_matmul,
    reset_decodes,
    pack_four_bit_weights,
    scatter_rows_as_gather,
)

logger = logging.getLogger(__name__)

_STANDARD_DOMAINS = ("", "ai.onnx")
#: Ops TVM's importer handles outside its converter table.
_IMPORTER_BUILTINS = frozenset({"If", "Constant"})
_SHAPE_OPS = frozenset({"Shape", "Size"})

_convert_map_lock = threading.Lock()
_current_node = threading.local()


class _TracedConverter:
    """Wraps a converter class so a failure can name the node being converted."""

    def __init__(self, op_type: str, converter) -> None:
        self.op_type = op_type
        self.converter = converter

    def get_converter(self, opset: int):
        convert = self.converter.get_converter(opset)
        op_type = self.op_type

        def traced(bb, inputs, attr, params):
            _current_node.value = (op_type, attr.get("tvm_custom", {}).get("name", ""))
            return convert(bb, inputs, attr, params)

        return traced


def kiln_converters(base: dict) -> dict:
    """TVM's converter table plus kiln's forms (the table :func:`lower_to_relax` uses)."""
    table = dict(base)
    table["DequantizeLinear"] = blocked_dequantize_linear(base["DequantizeLinear"])
    table["MatMul"] = kiln_matmul(base["MatMul"])
    table["Sum"] = _SumAsAdds
    table["Clip"] = clip_as_min_max(base["Clip"])
    table["ConvTranspose"] = conv_transpose_as_conv(base["ConvTranspose"])
    table["ScatterND"] = scatter_rows_as_gather(base["ScatterND"])
    table[PACKED_OP] = PackedDequantizeLinear
    table[PACKED_TABLE_OP] = PackedDequantizeTable
    table[CODEBOOK_OP] = CodebookDecode
    # kiln's model-local functions, converted as ops so their weights stay packed
    table.update(KILN_OPS)
    return table


class _SumAsAdds:
    """ONNX ``Sum`` as a chain of broadcasting adds.

    TVM's importer stacks the inputs (broadcast_to + stack + sum over a new axis): a
    5-D intermediate that layout conversion cannot follow and the kernels must
    materialize. Elementwise adds fuse into the producing conv's epilogue instead.
    """

    @classmethod
    def get_converter(cls, opset: int):
        def convert(bb, inputs, attr, params):
            from tvm import relax

            total = inputs[0]
            for term in inputs[1:]:
                total = relax.op.add(total, term)
            return total

        return convert


def _constant_bound(expr) -> float | None:
    """A Clip bound as a float when it is a scalar constant (NaN: no bound), else raise."""
    import numpy as np
    import tvm

    if expr is None:
        return None
    if not isinstance(expr, tvm.ir.GenericConst) or expr.value.numpy().size != 1:
        raise TypeError("not a constant scalar")
    value = float(expr.value.numpy().reshape(()))
    return None if np.isnan(value) else value


def clip_as_min_max(base):
    """ONNX ``Clip`` with constant bounds as Relax ``maximum``/``minimum`` with scalars.

    TVM's importer emits prebuilt TensorIR kernels (and NaN checks of the bounds) that
    layout conversion cannot see through; Relax's elementwise ops it can. Clips with
    computed bounds keep the importer's conversion.
    """

    class _Clip:
        @classmethod
        def get_converter(cls, opset: int):
            fallback = base.get_converter(opset)

            def convert(bb, inputs, attr, params):
                from tvm import relax

                x = inputs[0]
                dtype = x.ty.dtype
                try:
                    if opset < 11:
                        lo = attr.get("min")
                        hi = attr.get("max")
                        lo = None if lo is None else float(lo)
                        hi = None if hi is None else float(hi)
                    else:
                        extra = list(inputs[1:]) + [None, None]
                        lo, hi = _constant_bound(extra[0]), _constant_bound(extra[1])
                except TypeError:
                    return fallback(bb, inputs, attr, params)
                if not str(dtype).startswith("float"):
                    return fallback(bb, inputs, attr, params)
                if lo is not None:
                    x = relax.op.maximum(x, relax.const(lo, dtype))
                if hi is not None:
                    x = relax.op.minimum(x, relax.const(hi, dtype))
                return x

            return convert

    return _Clip


def _as_ints(values, default: list[int]) -> list[int]:
    return [int(v) for v in values] if values is not None else default


def conv_transpose_as_conv(base):
    """ONNX ``ConvTranspose`` whose kernel equals its stride (no overlap: U-Net and
    DB-head upsamplers) as a 1x1 ``conv2d`` to ``C_out * kH * kW`` channels followed by
    a pixel shuffle. Each output pixel then takes exactly one kernel tap, so no
    multiply-by-zero of a dilated input is done, and the 1x1 conv is a GEMM for kiln's
    contraction rule. Other ConvTransposes keep the importer's conversion.
    """

    class _ConvTranspose:
        @classmethod
        def get_converter(cls, opset: int):
            fallback = base.get_converter(opset)

            def convert(bb, inputs, attr, params):
                import numpy as np
                import tvm
                from tvm import relax

                x, weight = inputs[0], inputs[1]
                bias = inputs[2] if len(inputs) > 2 else None
                if not (isinstance(weight, tvm.ir.GenericConst)
                        and getattr(x.ty, "ndim", -1) == 4
                        and (bias is None or isinstance(bias, tvm.ir.GenericConst))):
                    return fallback(bb, inputs, attr, params)
                w = weight.value.numpy()
                kernel = _as_ints(attr.get("kernel_shape"), list(w.shape[2:]))
                strides = _as_ints(attr.get("strides"), [1, 1])
                plain = (int(attr.get("group", 1)) == 1
                         and _as_ints(attr.get("dilations"), [1, 1]) == [1, 1]
                         and _as_ints(attr.get("pads"), [0] * 4) == [0] * 4
                         and _as_ints(attr.get("output_padding"), [0, 0]) == [0, 0]
                         and "output_shape" not in attr
                         and attr.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
                         and kernel == strides == list(w.shape[2:]))
                if not plain:
                    return fallback(bb, inputs, attr, params)
                c_in, c_out, kh, kw = w.shape
                # W1[co*kh*kw + a*kw + b, ci] = W[ci, co, a, b]
                w1 = np.ascontiguousarray(w.transpose(1, 2, 3, 0).reshape(c_out * kh * kw, c_in, 1, 1))
                n, _, h, wd = (int(d) for d in x.ty.shape.values)
                z = relax.op.nn.conv2d(x, relax.const(w1, str(w.dtype)))
                z = relax.op.reshape(z, (n, c_out, kh, kw, h, wd))
                z = relax.op.permute_dims(z, [0, 1, 4, 2, 5, 3])
                y = relax.op.reshape(z, (n, c_out, h * kh, wd * kw))
                if bias is not None:
                    b = bias.value.numpy().reshape(1, c_out, 1, 1)
                    y = relax.op.add(y, relax.const(b, str(b.dtype)))
                return y

            return convert

    return _ConvTranspose


#: ``kiln`` domain ops (model-local functions, ``kiln.passes.quant.kiln_ops``) with converters.
KILN_OPS = {"UnpackBits": UnpackBits, "DequantizeTable": DequantizeTable}


@contextlib.contextmanager
def _extended_convert_map() -> Iterator[dict]:
    """Swap the importer's converter table for kiln's during one import.

    The importer looks the table up through the module global
    ``_get_convert_map`` at each use, and exposes no other hook.
    """
    from tvm.relax.frontend.onnx import onnx_frontend

    with _convert_map_lock:
        original = onnx_frontend._get_convert_map
        table = kiln_converters(original())
        traced = {op: _TracedConverter(op, conv) for op, conv in table.items()}
        onnx_frontend._get_convert_map = lambda: traced
        try:
            yield table
        finally:
            onnx_frontend._get_convert_map = original


def supported_op_types() -> frozenset[str]:
    """Op types (standard domain) that :func:`lower_to_relax` can lower."""
    from tvm.relax.frontend.onnx import onnx_frontend

    return frozenset(kiln_converters(onnx_frontend._get_convert_map())) | _IMPORTER_BUILTINS


def _walk_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _walk_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _walk_nodes(sub)


def unsupported_ops(model: onnx.ModelProto) -> dict[str, str]:
    """``{op type: first node name}`` for every op TVM's importer (plus kiln's) cannot take.

    Ops from other domains are listed as ``domain::Op`` (the importer ignores
    domains, so a ``com.microsoft`` op would otherwise be mistaken for a
    standard one).
    """
    supported = supported_op_types()
    found: dict[str, str] = {}
    for index, node in enumerate(_walk_nodes(model.graph)):
        name = node.name or f"#{index} ({node.op_type})"
        if node.domain == PACKED_DOMAIN and node.op_type in (PACKED_OP, PACKED_TABLE_OP,
                                                       CODEBOOK_OP):
            continue
        if node.domain == KILN_DOMAIN and node.op_type in KILN_OPS:
            continue
        if node.domain not in _STANDARD_DOMAINS:
            found.setdefault(f"{node.domain}::{node.op_type}", name)
        elif node.op_type not in supported:
            found.setdefault(node.op_type, name)
    return found


def _format_ops(ops: dict[str, str]) -> str:
    return ", ".join(f"{op} (node {node!r})" for op, node in ops.items())


def check_static_inputs(model: ir.Model, target_name: str | None = None) -> None:
    """Raise LoweringError naming every input whose shape is not fully static."""
    dynamic = []
    for value in graph_inputs(model):
        if value.shape is None or not all(isinstance(d, int) for d in value.shape):
            dims = "?" if value.shape is None else list(value.shape)
            dynamic.append(f"{value.name!r} {dims}")
    if dynamic:
        raise LoweringError("inputs need static shapes (bind them in the spec's input_shapes): "
                            + ", ".join(dynamic), target=target_name)


def _refold(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Constant-fold a copy with onnxscript's folder (shape chains -> constants).

    Folding only: onnxscript's rewrite rules (BatchNorm fusion, ...) are kiln
    passes that a spec chooses, not something lowering does behind its back.
    """
    from onnx_ir.passes import common
    from onnxscript.optimizer import fold_constants

    copy = ir.serde.deserialize_model(proto)
    # kiln's functions are lowered as ops (packed weights stay packed): not inlined here
    kiln = {key: copy.functions.pop(key) for key in list(copy.functions)
            if key[0] == KILN_DOMAIN and key[1] in KILN_OPS}
    common.InlinePass()(copy)
    fold_constants(copy, onnx_shape_inference=True)
    common.RemoveUnusedNodesPass()(copy)
    copy.functions.update(kiln)
    return ir.serde.serialize_model(copy)


def _drop_kiln_functions(proto: onnx.ModelProto, target_name: str | None) -> onnx.ModelProto:
    """Remove kiln's function bodies (their ops have converters); inline any other function.

    kiln's ops are converted directly so that packed weights stay packed; a model's
    other local functions are inlined with onnx_ir's InlinePass (kiln's own calls
    are kept: their functions are set aside while inlining).
    """
    kiln = [f for f in proto.functions if f.domain == KILN_DOMAIN and f.name in KILN_OPS]
    others = [f for f in proto.functions if not (f.domain == KILN_DOMAIN and f.name in KILN_OPS)]
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


def _to_onnx(model: ir.Model, target_name: str | None) -> onnx.ModelProto:
    """The backend's own ONNX copy, folded if needed, with 4-bit weights packed."""
    proto = ir.serde.serialize_model(model)
    if fold_index_unpacks(proto) or \
            any(n.op_type in _SHAPE_OPS for n in _walk_nodes(proto.graph)):
        logger.info("model still computes shapes; folding constants before import")
        proto = _refold(proto)
    proto = _drop_kiln_functions(proto, target_name)
    pack_four_bit_weights(proto)
    codebook_weights(proto)
    return proto


def _grouped_gemv_for(target_name: str | None) -> bool:
    """kiln's grouped int4 GEMV kernel is scheduled by its CPU rule; GPUs use dlight."""
    if target_name is None:
        return True
    from .targets import resolve_target

    try:
        return resolve_target(target_name).family == "cpu"
    except Exception:  # noqa: BLE001 - an unknown name only labels errors here
        return True


def lower_to_relax(model: ir.Model, *, target_name: str | None = None):
    """Import ``model`` (static input shapes, constants folded) into a Relax IRModule.

    The module's ``main`` takes the graph inputs in order and returns the
    output (a tuple when there are several). ``target_name`` only labels errors.
    Raises LoweringError listing every unsupported op, or naming the node
    TVM's importer failed on.
    """
    check_static_inputs(model, target_name)
    proto = _to_onnx(model, target_name)

    problems = unsupported_ops(proto)
    problems.update(four_bit_misuse(proto))
    if problems:
        raise LoweringError(f"{len(problems)} unsupported op type(s): {_format_ops(problems)}",
                            target=target_name, ops=problems)

    from tvm.relax.frontend.onnx import from_onnx

    shapes = {v.name: list(v.shape) for v in graph_inputs(model)}
    dtypes = {v.name: str(v.dtype.numpy()) for v in graph_inputs(model)}
    captured = io.StringIO()
    _current_node.value = None
    reset_decodes(grouped_gemv=_grouped_gemv_for(target_name))
    with _extended_convert_map(), warnings.catch_warnings(record=True) as caught, \
            contextlib.redirect_stdout(captured):
        warnings.simplefilter("always")
        try:
            mod = from_onnx(proto, shape_dict=shapes, dtype_dict=dtypes)
        except Exception as err:  # the importer raises anything from ValueError to TVMError
            op, node = _current_node.value or ("?", "?")
            detail = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise LoweringError(f"TVM's ONNX importer failed on {op} (node {node!r}): {detail}",
                                target=target_name, ops={op: node}) from err
    # a weight decode taken over by a grouped GEMV (dequantize.emit_grouped_gemv) is unused
    from tvm import relax

    mod = relax.transform.DeadCodeElimination(["main"])(mod)
    for warning in caught:
        logger.debug("importer: %s", warning.message)
    if captured.getvalue():
        logger.debug("importer output: %s", captured.getvalue().strip())
    logger.info("imported %d ONNX nodes into Relax", len(proto.graph.node))
    return mod
