"""Lower an ``onnx_ir.Model`` to a Relax ``IRModule`` with TVM's ONNX importer.

TVM's importer does the standard ops; kiln extends its converter table
(:mod:`.converters`; the table is a module-level function of TVM's,
``_get_convert_map``, swapped for the duration of one import under a lock) with the
forms kiln's passes produce: blocked ``DequantizeLinear``, 4-bit and codebook weights,
kiln's model-local functions ``kiln.UnpackBits`` / ``kiln.DequantizeTable`` (converted
as ops, so their weights stay packed), and MatMul on a 4-bit weight as a grouped GEMV
on CPU targets. The model is first made ready for the importer (:mod:`.prepare`).

Before importing, every node is checked and one :class:`LoweringError` lists
every unsupported op type with one node name each, so a user sees all the
work at once rather than one op per attempt.

Inputs must have static shapes (the frontend binds them from the spec and
folds constants with ``onnxscript.optimizer``); weights become constants in the
module (one self-contained ``.so``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import threading
import warnings
from collections.abc import Iterator

import onnx
import onnx_ir as ir

from kiln.compiler.core.errors import LoweringError
from kiln.compiler.core.graph import graph_inputs
from kiln.compiler.core.kiln_domain import is_kiln_op

from . import internal_ops
from .context import ImportContext
from .converters import supported_op_types, traced_converters
from .int8_chains import rewrite_int8_chains
from .packed_weights import four_bit_misuse
from .prepare import prepare_onnx, walk_nodes
from .sparse_weights import pack_sparse_weights

logger = logging.getLogger(__name__)

_STANDARD_DOMAINS = ("", "ai.onnx")
#: The lowered module's attribute with the sparse-kernel choices (JSON list of
#: ``sparse_weights.SparseChoice`` dicts; read by the build for its report).
SPARSE_KERNELS_ATTR = "kiln.sparse_kernels"
#: Held while TVM's (process-wide) converter table is swapped for kiln's.
_convert_map_lock = threading.Lock()


@contextlib.contextmanager
def _extended_convert_map(context: ImportContext) -> Iterator[None]:
    """Swap the importer's converter table for kiln's (bound to ``context``) during one
    import. The importer looks the table up through the module global
    ``_get_convert_map`` at each use, and exposes no other hook."""
    from tvm.relax.frontend.onnx import onnx_frontend

    with _convert_map_lock:
        original = onnx_frontend._get_convert_map
        traced = traced_converters(original(), context)
        onnx_frontend._get_convert_map = lambda: traced
        try:
            yield
        finally:
            onnx_frontend._get_convert_map = original


def unsupported_ops(model: onnx.ModelProto) -> dict[str, str]:
    """``{op type: first node name}`` for every op TVM's importer (plus kiln's) cannot take.

    Ops from other domains are listed as ``domain::Op`` (the importer ignores
    domains, so a ``com.microsoft`` op would otherwise be mistaken for a
    standard one).
    """
    supported = supported_op_types()
    found: dict[str, str] = {}
    for index, node in enumerate(walk_nodes(model.graph)):
        name = node.name or f"#{index} ({node.op_type})"
        if node.domain == internal_ops.DOMAIN and node.op_type in internal_ops.OPS:
            continue
        if is_kiln_op(node.domain, node.op_type):
            continue
        if node.domain not in _STANDARD_DOMAINS:
            found.setdefault(f"{node.domain}::{node.op_type}", name)
        elif node.op_type not in supported:
            found.setdefault(node.op_type, name)
    return found


def _format_ops(ops: dict[str, str]) -> str:
    return ", ".join(f"{op} (node {node!r})" for op, node in ops.items())


#: The model metadata key with the symbolic dims' ranges (JSON ``{"W": [16, 1024]}``),
#: written by kiln.compiler.driver.symbolic (DIMS_KEY there; backends cannot import it).
SYMBOLIC_DIMS_KEY = "kiln.dims"


def symbolic_ranges(model: ir.Model) -> dict[str, tuple[int, int]]:
    """The symbolic input dims the model declares, with their ranges (empty: static)."""
    text = model.metadata_props.get(SYMBOLIC_DIMS_KEY)
    if not text:
        return {}
    return {k: (int(v[0]), int(v[1])) for k, v in json.loads(text).items()}


def input_shape_dict(model: ir.Model) -> dict[str, list]:
    """Input name -> shape for TVM's importer: ints, and one ``tir.Var`` per symbol
    (shared by every input that names it)."""
    from tvm import tirx

    variables: dict[str, object] = {}
    shapes = {}
    for value in graph_inputs(model):
        dims = []
        for dim in value.shape:
            if isinstance(dim, int):
                dims.append(dim)
            else:
                dims.append(variables.setdefault(str(dim), tirx.Var(str(dim), "int64")))
        shapes[value.name] = dims
    return shapes


def check_static_inputs(model: ir.Model, target_name: str | None = None) -> None:
    """Raise LoweringError naming every input whose shape is not fully static."""
    dynamic = []
    symbols = symbolic_ranges(model)
    for value in graph_inputs(model):
        if value.shape is None or not all(isinstance(d, int) or str(d) in symbols
                                          for d in value.shape):
            dims = "?" if value.shape is None else list(value.shape)
            dynamic.append(f"{value.name!r} {dims}")
    if dynamic:
        raise LoweringError("inputs need static shapes (bind them in the spec's input_shapes): "
                            + ", ".join(dynamic), target=target_name)


def _grouped_gemv_for(target_name: str | None) -> bool:
    """kiln's grouped int4 GEMV kernel is scheduled by its CPU rule; GPUs use dlight."""
    if target_name is None:
        return True
    from kiln.backends.tvm.targets import resolve_target

    try:
        return resolve_target(target_name).family == "cpu"
    except Exception:  # noqa: BLE001 - an unknown name only labels errors here
        return True


def lower_to_relax(model: ir.Model, *, target_name: str | None = None):
    """Import ``model`` (static input shapes, constants folded) into a Relax IRModule.

    The module's ``main`` takes the graph inputs in order and returns the
    output (a tuple when there are several). ``target_name`` only labels errors
    and chooses whether the grouped GEMV is used (CPU targets).
    Raises LoweringError listing every unsupported op, or naming the node
    TVM's importer failed on.
    """
    check_static_inputs(model, target_name)
    proto = prepare_onnx(model, target_name)
    rewrite_int8_chains(proto, target_name)
    sparse = pack_sparse_weights(proto) if _grouped_gemv_for(target_name) else []
    if symbolic_ranges(model):
        from .symbolic_shapes import drop_shape_round_trips

        if drop_shape_round_trips(proto.graph):
            logger.info("symbolic shapes: int32 round trips of Shape outputs removed")

    problems = unsupported_ops(proto)
    problems.update(four_bit_misuse(proto))
    if problems:
        raise LoweringError(f"{len(problems)} unsupported op type(s): {_format_ops(problems)}",
                            target=target_name, ops=problems)

    from tvm.relax.frontend.onnx import from_onnx

    shapes = input_shape_dict(model)
    dtypes = {v.name: str(v.dtype.numpy()) for v in graph_inputs(model)}
    captured = io.StringIO()
    context = ImportContext(grouped_gemv=_grouped_gemv_for(target_name))
    with _extended_convert_map(context), warnings.catch_warnings(record=True) as caught, \
            contextlib.redirect_stdout(captured):
        warnings.simplefilter("always")
        try:
            mod = from_onnx(proto, shape_dict=shapes, dtype_dict=dtypes)
        except Exception as err:  # the importer raises anything from ValueError to TVMError
            op, node = context.node or ("?", "?")
            detail = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise LoweringError(f"TVM's ONNX importer failed on {op} (node {node!r}): {detail}",
                                target=target_name, ops={op: node}) from err
    # a weight decode taken over by a grouped GEMV (grouped_gemv.emit_grouped_gemv) is unused
    from tvm import relax

    mod = relax.transform.DeadCodeElimination(["main"])(mod)
    if sparse:
        mod = mod.with_attr(SPARSE_KERNELS_ATTR, json.dumps([c.to_dict() for c in sparse]))
    for warning in caught:
        logger.debug("importer: %s", warning.message)
    if captured.getvalue():
        logger.debug("importer output: %s", captured.getvalue().strip())
    logger.info("imported %d ONNX nodes into Relax", len(proto.graph.node))
    return mod
