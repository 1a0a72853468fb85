"""Constant MatMul/Gemm weights with structured zeros, packed for kiln's sparse kernel.

``prune`` leaves its zeros in dense fp32 initializers; here, on the backend's own ONNX
copy, each constant weight is viewed as its reduction matrix R [N, K] (row n: output n)
and, when the cost model (:mod:`.sparse_cost`) expects the sparse kernel
(:mod:`.sparse_kernel`) to beat the dense one, the node becomes the internal op
:data:`.internal_ops.SPARSE_DENSE` reading only the non-zeros. Rows go in groups of
:data:`GROUP` (one AVX-512 fp32 vector of outputs), in one of two layouts:

- ``shared``: the group's rows keep the same columns (``prune``'s blocks of 16+ rows x 1
  column, or taller): ``values[G, J, 16]``, ``columns[G, J]`` (int32). The kernel
  broadcasts ``x[m, columns[g, j]]`` and does one vector FMA per stored column.
- ``gather``: each row has its own columns (2:4, unstructured): ``values[G, J, 16]``,
  ``columns[G, J, 16]`` (int16 while K fits); the kernel gathers 16 ``x`` values per FMA.

J is the most columns a group stores; shorter rows are padded with value 0, column 0,
so the stored fraction (``stored_density``) can exceed the non-zero fraction. A weight
read by anything else, an ``x`` without a static shape, Gemm with alpha/beta != 1 or transA,
and N not a multiple of :data:`GROUP` stay dense (an x of rank > 2 is seen as its
rows, ``prod(shape[:-1])``); every layer looked at gets a
:class:`SparseChoice` (kernel chosen, densities, the reason), which the build reports.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import internal_ops
from .packed_weights import attributes, initializers
from .sparse_cost import Layout, estimate

logger = logging.getLogger(__name__)

#: Output rows per group: one fp32 vector of AVX-512 (two of AVX2).
GROUP = 16
#: ``KILN_SPARSE_KERNELS``: ``auto`` (the cost model decides), ``always`` (every packable
#: weight with zeros, e.g. to measure), ``never`` (the dense kernel everywhere).
POLICY_ENV = "KILN_SPARSE_KERNELS"
POLICIES = ("auto", "always", "never")
#: Weights with fewer zeros than this fraction are not even considered.
MIN_ZERO_FRACTION = 0.25
#: A layout that stores more than this fraction of R is not considered.
MAX_STORED_DENSITY = 0.9
_STANDARD_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class PackedRows:
    """R [N, K] packed in row groups (see the module docstring)."""

    layout: Layout
    values: np.ndarray      # [G, J, GROUP] float32
    columns: np.ndarray     # [G, J] int32 (shared) or [G, J, GROUP] int16/int32 (gather)
    n: int
    k: int

    @property
    def stored_density(self) -> float:
        return self.values.size / (self.n * self.k)

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + self.columns.nbytes)

    def to_dense(self) -> np.ndarray:
        """R [N, K] back (for tests)."""
        groups, width, _ = self.values.shape
        r = np.zeros((self.n, self.k), np.float32)
        for g in range(groups):
            for j in range(width):
                for lane in range(GROUP):
                    col = (self.columns[g, j] if self.layout == "shared"
                           else self.columns[g, j, lane])
                    r[g * GROUP + lane, int(col)] += self.values[g, j, lane]
        return r


@dataclass(frozen=True)
class SparseChoice:
    """What the build chose for one layer (a row of report.json's ``sparse_kernels``)."""

    node: str
    op: str
    shape: tuple[int, int]      # [K, N]
    zero_fraction: float
    kernel: str                 # "sparse" or "dense"
    layout: str | None = None   # "shared" / "gather" when a sparse layout was costed
    stored_density: float | None = None
    expected_speedup: float | None = None   # dense time / sparse time, by the cost model
    reason: str = ""

    def to_dict(self) -> dict:
        data = asdict(self)
        data["shape"] = list(self.shape)
        for key in ("zero_fraction", "stored_density", "expected_speedup"):
            if data[key] is not None:
                data[key] = round(float(data[key]), 4)
        return data


def pack_shared(r: np.ndarray) -> PackedRows:
    """Pack R [N, K] with one column list per group of :data:`GROUP` rows (a column is
    stored when any row of the group has a non-zero there)."""
    n, k = r.shape
    groups = r.reshape(n // GROUP, GROUP, k)
    used = (groups != 0).any(axis=1)                                   # [G, K]
    width = max(int(used.sum(axis=1).max()), 1)
    values = np.zeros((n // GROUP, width, GROUP), np.float32)
    columns = np.zeros((n // GROUP, width), np.int32)
    for g in range(n // GROUP):
        cols = np.flatnonzero(used[g])
        columns[g, :len(cols)] = cols
        values[g, :len(cols), :] = groups[g][:, cols].T
    return PackedRows("shared", values, columns, n, k)


def pack_gather(r: np.ndarray) -> PackedRows:
    """Pack R [N, K] with each row's own non-zero columns (in order), groups padded to
    the group's longest row."""
    n, k = r.shape
    nonzero = r != 0
    width = max(int(nonzero.sum(axis=1).max()), 1)
    index_type = np.int16 if k <= np.iinfo(np.int16).max else np.int32
    values = np.zeros((n // GROUP, width, GROUP), np.float32)
    columns = np.zeros((n // GROUP, width, GROUP), index_type)
    for row in range(n):
        cols = np.flatnonzero(nonzero[row])
        g, lane = divmod(row, GROUP)
        columns[g, :len(cols), lane] = cols
        values[g, :len(cols), lane] = r[row, cols]
    # groups shorter than ``width`` keep zero padding; trim to the longest group
    return PackedRows("gather", values, columns, n, k)


def _shared_width(r: np.ndarray) -> int:
    n, k = r.shape
    return int((r.reshape(n // GROUP, GROUP, k) != 0).any(axis=1).sum(axis=1).max())


def _gather_width(r: np.ndarray) -> int:
    return int((r != 0).sum(axis=1).max())


def policy() -> str:
    """The sparse-kernel policy from :data:`POLICY_ENV` (default ``auto``)."""
    value = os.environ.get(POLICY_ENV, "auto").strip().lower() or "auto"
    if value not in POLICIES:
        from kiln.compiler.core.errors import KilnError

        raise KilnError(f"{POLICY_ENV}={value!r}: expected one of {', '.join(POLICIES)}")
    return value


def choose_layout(r: np.ndarray, rows: int, model_weight_bytes: int
                  ) -> tuple[Layout, float, float]:
    """(the sparse layout the cost model expects to be fastest, its stored density, the
    expected dense/sparse speedup) for R [N, K] and ``rows`` rows of x, in a model whose
    MatMul/Gemm weights take ``model_weight_bytes``."""
    n, k = r.shape
    costed = [(layout, max(width, 1) / k) for layout, width in
              (("shared", _shared_width(r)), ("gather", _gather_width(r)))]
    # a layout storing (nearly) every column saves nothing, whatever the estimate
    costed = [c for c in costed if c[1] <= MAX_STORED_DENSITY] or costed
    return max(((layout, density, estimate(layout, density, rows=rows,
                                               model_weight_bytes=model_weight_bytes))
                for layout, density in costed), key=lambda c: c[2])


def _readers(graph: onnx.GraphProto) -> dict[str, int]:
    count: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            count[name] = count.get(name, 0) + 1
    for out in graph.output:
        count[out.name] = count.get(out.name, 0) + 1
    return count


def _value_ranks(graph: onnx.GraphProto) -> dict[str, list[int | None]]:
    shapes = {}
    for info in (*graph.input, *graph.value_info, *graph.output):
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return shapes


def _reduction_matrix(node: onnx.NodeProto, w: np.ndarray) -> tuple[np.ndarray | None, str]:
    """(R [N, K] of ``node``'s weight, "") or (None, why it stays dense)."""
    if w.ndim != 2 or w.dtype != np.float32:
        return None, "weight is not a 2-D float32 matrix"
    if node.op_type == "MatMul":
        return np.ascontiguousarray(w.T), ""
    attrs = attributes(node)
    if float(attrs.get("alpha", 1.0)) != 1.0 or float(attrs.get("beta", 1.0)) != 1.0 \
            or int(attrs.get("transA", 0)):
        return None, "Gemm with alpha/beta != 1 or transA"
    return (np.ascontiguousarray(w) if int(attrs.get("transB", 0))
            else np.ascontiguousarray(w.T)), ""


def pack_sparse_weights(model: onnx.ModelProto, mode: str | None = None) -> list[SparseChoice]:
    """Rewrite MatMul/Gemm nodes whose constant weight is sparse enough into
    :data:`.internal_ops.SPARSE_DENSE` (in place, on the backend's copy); the choice for
    every float weight with at least :data:`MIN_ZERO_FRACTION` zeros, in graph order."""
    mode = mode or policy()
    graph = model.graph
    inits = initializers(graph)
    readers = _readers(graph)
    choices: list[SparseChoice] = []
    if mode == "never":
        return choices
    weights = [inits[n.input[1]] for n in graph.node if n.op_type in ("MatMul", "Gemm")
               and len(n.input) > 1 and n.input[1] in inits]
    sparse_enough = {t.name for t in weights if t.data_type == onnx.TensorProto.FLOAT
                     and float((numpy_helper.to_array(t) == 0).mean()) >= MIN_ZERO_FRACTION}
    if not sparse_enough:
        return choices
    shapes = _value_ranks(graph)
    if any(n.op_type in ("MatMul", "Gemm") and n.input[1] in sparse_enough
           and n.input[0] not in shapes for n in graph.node):
        try:  # the backend's copy: the weights are copied too, but only for sparse models
            shapes.update(_value_ranks(onnx.shape_inference.infer_shapes(model).graph))
        except Exception:  # noqa: BLE001 - ops inference does not know: their x stays unknown
            logger.debug("shape inference failed; sparse weights only where x has a shape")
    total = sum(4 * int(np.prod(t.dims)) for t in weights if t.data_type == onnx.TensorProto.FLOAT)
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in _STANDARD_DOMAINS \
                or len(node.input) < 2 or node.input[1] not in inits:
            continue
        if node.input[1] not in sparse_enough:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        choice, packed = _consider(node, w, inits, readers, shapes.get(node.input[0]), mode,
                                   total)
        if packed is not None:
            _rewrite(graph, node, packed, inits)
        choices.append(choice)
    if any(c.kernel == "sparse" for c in choices):
        still_read = {name for node in graph.node for name in node.input}
        keep = [t for t in graph.initializer if t.name in still_read]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        if not any(o.domain == internal_ops.DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(internal_ops.DOMAIN, 1))
        logger.info("sparse kernels for %d of %d sparse layer(s)",
                    sum(c.kernel == "sparse" for c in choices), len(choices))
    return choices


def _consider(node: onnx.NodeProto, w: np.ndarray, inits: dict, readers: dict[str, int],
              x_shape: list[int | None] | None, mode: str, model_weight_bytes: int
              ) -> tuple[SparseChoice, PackedRows | None]:
    """The choice for one MatMul/Gemm on the float weight ``w``, and its packed weight
    when the sparse kernel is taken."""
    zeros = float((w == 0).mean())
    r, why = _reduction_matrix(node, w)
    n, k = r.shape if r is not None else (w.shape[-1], w.shape[0])
    name = node.name or node.output[0]
    shape = (int(k), int(n))
    bias = _bias(node)
    if r is None:
        pass
    elif readers.get(node.input[1], 0) != 1:
        why = "weight is read by another node too"
    elif x_shape is None or len(x_shape) < 2 or any(d is None or d <= 0 for d in x_shape) \
            or x_shape[-1] != k:
        why = "input is not a static [..., K] tensor"
    elif n % GROUP:
        why = f"N={n} is not a multiple of {GROUP}"
    elif bias and (bias not in inits or list(inits[bias].dims) not in ([n], [1, n])):
        why = "Gemm bias is not a constant [N] vector"
    else:
        rows = int(np.prod(x_shape[:-1]))
        layout, density, speedup = choose_layout(r, rows, model_weight_bytes)
        if speedup <= 1.0 and mode != "always":
            return SparseChoice(name, node.op_type, shape, zeros, "dense", layout=layout,
                                stored_density=density, expected_speedup=speedup,
                                reason="cost model expects no gain over the dense kernel "
                                       f"({speedup:.2f}x)"), None
        packed = pack_shared(r) if layout == "shared" else pack_gather(r)
        forced = mode == "always" and speedup <= 1.0
        return SparseChoice(name, node.op_type, shape, zeros, "sparse", layout=layout,
                            stored_density=packed.stored_density, expected_speedup=speedup,
                            reason="forced" if forced else "cost model"), packed
    return SparseChoice(name, node.op_type, shape, zeros, "dense", reason=why), None


def _bias(node: onnx.NodeProto) -> str:
    return node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else ""


def _rewrite(graph: onnx.GraphProto, node: onnx.NodeProto, packed: PackedRows,
             inits: dict) -> None:
    base, bias = node.input[1], _bias(node)
    values = numpy_helper.from_array(packed.values, f"{base}__kiln_sparse_values")
    columns = numpy_helper.from_array(packed.columns, f"{base}__kiln_sparse_columns")
    graph.initializer.extend([values, columns])
    inputs = [node.input[0], values.name, columns.name]
    if bias:
        b = numpy_helper.to_array(inits[bias]).reshape(-1).astype(np.float32)
        flat = numpy_helper.from_array(b, f"{bias}__kiln_sparse_bias")
        graph.initializer.append(flat)
        inputs.append(flat.name)
    new = helper.make_node(internal_ops.SPARSE_DENSE, inputs, list(node.output),
                           name=node.name, domain=internal_ops.DOMAIN, layout=packed.layout,
                           n=packed.n, k=packed.k)
    node.CopyFrom(new)
