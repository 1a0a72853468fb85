"""The value of a shape-like model input that the declared output shapes imply.

kiln builds static shapes. Where a small integer input (a window's size, a crop's
target shape) decides an output's shape through a computation (an op's ONNX function
body: ``Range(0, Cast(size))``, ``Pad(x, Max(shape, Shape(x)) - Shape(x))``), no single
op's operand tells its value. When the model is small and every output declares a
static shape, :func:`probe_shape_inputs` tries the values that could give those shapes
(a scalar: ``0 .. max dim + 2``; a 1-D input of length k: each k of an output's dims, in
order, then each k - 1 of them with one more dim or 1 put in: AffineGrid's
``[N, C, H, W]`` for an ``[N, H, W, 2]`` grid) with onnx's reference evaluator on seeded
random other inputs. A value is implied when some candidate gives every declared shape
and every value found to give them (the other candidates, and each one-element step of
+-1, +-2 from the first) also gives the same output values: ``Slice(x, s, s + 3)``
(any ``s`` gives 3 elements, each another 3) implies nothing, ``Slice(x, 0, e)`` clamped
at the end (``e`` of 10, 11, 12 give the same 10 elements) implies the first.

The importer fixes the input to that value (the compiled module takes it and ignores
it, as :mod:`kiln.backends.tvm.importer.static_operands` does for operands), and
verification draws it.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import onnx
from onnx import helper

logger = logging.getLogger(__name__)

#: models larger than this are not probed (the reference evaluator is slow)
MAX_NODES = 300
#: at most this many elements over the initializers, and over the inputs
MAX_ELEMENTS = 1 << 16
MAX_CANDIDATES = 160
#: the probed input has at most this many elements
MAX_PROBED_ELEMENTS = 8
#: steps from the first hit tried on each element (another value giving the same shapes
#: but other outputs means the shapes do not pin the input)
_STEPS = (-2, -1, 1, 2)
#: ops whose output shape a computed operand decides (what makes probing worth it)
_SHAPE_CONSUMERS = frozenset({"Range", "Pad", "ConstantOfShape", "Slice", "Expand",
                              "Reshape", "Tile"})
_INTS = (onnx.TensorProto.INT32, onnx.TensorProto.INT64)


def _static(value: onnx.ValueInfoProto) -> list[int] | None:
    tensor = value.type.tensor_type
    if not value.type.HasField("tensor_type") or not tensor.HasField("shape") or \
            not all(d.HasField("dim_value") for d in tensor.shape.dim):
        return None
    return [d.dim_value for d in tensor.shape.dim]


def _reaches_consumer(graph: onnx.GraphProto, name: str) -> bool:
    """``name`` reaches a shape-consuming op through at least one other node."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for value in node.input:
            readers.setdefault(value, []).append(node)
    frontier = [o for n in readers.get(name, []) for o in n.output]
    seen: set[str] = set()
    while frontier:
        nxt = []
        for value in frontier:
            if value in seen:
                continue
            seen.add(value)
            for node in readers.get(value, []):
                if node.op_type in _SHAPE_CONSUMERS:
                    return True
                nxt.extend(node.output)
        frontier = nxt
    return False


def _candidates(shape: list[int], outputs: list[list[int]]) -> list[list[int]]:
    if not shape:
        top = max((d for out in outputs for d in out), default=0)
        return [[v] for v in range(top + 3)][:MAX_CANDIDATES]
    if len(shape) != 1:
        return []
    k = shape[0]
    fill = sorted({1, *(d for out in outputs for d in out)})
    found: list[list[int]] = []
    for out in outputs:  # an output's dims in order; then with one more dim put in
        found += [list(dims) for dims in itertools.combinations(out, k)]
    for out in outputs:  # (AffineGrid's size [N, C, H, W] for a [N, H, W, 2] grid)
        for dims in itertools.combinations(out, k - 1) if k else ():
            found += [[*dims[:i], d, *dims[i:]] for i in range(k) for d in fill]
    unique = list(dict.fromkeys(tuple(c) for c in found))
    return [list(c) for c in unique[:MAX_CANDIDATES]]


def _steps(value: np.ndarray) -> list[np.ndarray]:
    """``value`` with one element moved by each of :data:`_STEPS`."""
    moved = []
    for i, step in itertools.product(range(value.size), _STEPS):
        other = value.copy().reshape(-1)
        other[i] += step
        moved.append(other.reshape(value.shape))
    return moved


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(
        np.asarray(x).dtype == np.asarray(y).dtype and
        np.array_equal(x, y, equal_nan=np.asarray(x).dtype.kind in "fc") for x, y in zip(a, b))


def _probed_input(model: onnx.ModelProto) -> onnx.ValueInfoProto | None:
    """The one small integer input of a small, statically shaped model that reaches a
    shape-consuming op (None when there is not exactly one, or probing does not apply)."""
    graph = model.graph
    if len(graph.node) > MAX_NODES or \
            sum(int(np.prod(t.dims)) for t in graph.initializer) > MAX_ELEMENTS:
        return None
    inits = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in inits]
    shapes = [_static(v) for v in inputs]
    known = [s for s in shapes if s is not None]
    if len(known) < len(shapes) or any(_static(v) is None for v in graph.output) or \
            sum(int(np.prod(s)) for s in known) > MAX_ELEMENTS:
        return None
    ints = [v for v in inputs if v.type.tensor_type.elem_type in _INTS]
    probed = _static(ints[0]) if len(ints) == 1 else None
    if probed is None or len(probed) > 1 or int(np.prod(probed)) > MAX_PROBED_ELEMENTS:
        return None
    return ints[0] if _reaches_consumer(graph, ints[0].name) else None


def probe_shape_inputs(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """{input name: its implied value} for the one shape-like integer input of a small
    model whose outputs all declare static shapes (empty when none is implied)."""
    probed = _probed_input(model)
    if probed is None:
        return {}
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    rng = np.random.default_rng(0)
    feeds = {}
    for v in graph.input:
        if v.name not in inits and v is not probed:
            dtype = helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
            feeds[v.name] = rng.standard_normal(_static(v)).astype(dtype)
    shape = _static(probed)
    outputs = [o for v in graph.output if (o := _static(v)) is not None]
    assert shape is not None and len(outputs) == len(graph.output)  # _probed_input checked
    dtype = helper.tensor_dtype_to_np_dtype(probed.type.tensor_type.elem_type)
    try:
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(model)
    except Exception:  # noqa: BLE001 - an op the reference lacks: nothing implied
        return {}

    def outputs_for(value: np.ndarray) -> list[np.ndarray] | None:
        """The model's outputs with ``value``, or None unless they have the declared shapes."""
        try:
            got = evaluator.run(None, {**feeds, probed.name: value})
        except Exception:  # noqa: BLE001 - an impossible value
            return None
        got = list(got)
        return got if [list(np.shape(g)) for g in got] == outputs else None

    values = [np.asarray(v, dtype).reshape(shape) for v in _candidates(shape, outputs)]
    hits = [(v, got) for v in values if (got := outputs_for(v)) is not None]
    if not hits:
        return {}
    implied, expected = hits[0]
    others = [got for _, got in hits[1:]] + [outputs_for(v) for v in _steps(implied)]
    if any(got is not None and not _same(got, expected) for got in others):
        logger.info("input %r: several values give the declared output shapes %s with other "
                    "outputs; none is implied", probed.name, outputs)
        return {}
    logger.info("input %r: the declared output shapes %s imply the value %s", probed.name,
                outputs, implied.tolist())
    return {probed.name: implied}
