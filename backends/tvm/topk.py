"""TopK as a partial selection: a heap of the ``k`` best per row, not a sort of the row.

TVM dispatches Relax's ``topk`` (in ``DispatchSortScan``, before legalization) to TOPI's
CPU ``topk``, which calls the runtime's full sort of every row: ``n log n`` per row for
``k`` outputs (TopK k=100 over 4 rows of 8400: 0.14-0.20 ms, ONNX Runtime 0.07-0.09 ms;
``bench.cases_vision_ops``). This pass, placed before ``DispatchSortScan``, replaces a
``topk`` whose reduced axis is static and whose ``k`` is small (:func:`selects`) by one
kiln kernel. Each element is ranked by one int64, larger first: an int32 order key of its
value (float32's bits with the negative ones' magnitude bits flipped, -0.0 as 0.0, NaN
above +inf; inverted for ``smallest``) times 2^32, plus ``2^32 - 1 - index`` (the lower
index first on equal keys). Per row (every position of the other axes; rows in parallel
when there are several long ones):

1. the first ``k`` ranks make a min-heap (root: the one that would come last);
2. each later element is tested against the root's value (a compare of values, NaN-safe),
   and only one that passes is ranked and, when it ranks above the root, replaces it and
   is sifted down (``log k``); a later element never wins a tie, so the test is strict;
3. the heap is sorted in place (``k log k``), best first, and the indices and values
   (read back from the data: NaN payloads kept) written out.

Order (ONNX, and ONNX Runtime on NaN): ``largest``: larger first, ``smallest``: smaller
first, equal values by the lower index; NaN ranks above every number (first for
``largest``, last for ``smallest``). The kernel is IR-builder code (``schedules.ir_builder``
takes it as written). Measured (CPU time of the kernel's VM call, 1 thread, AMD EPYC
Zen 4, load ~3, min of 3 x 300): k=100 of 4 x 8400 0.043 ms (TVM's sort 0.114), k=256 of
100K 0.109 (0.178), k=2 of 256 x 8 0.0066 (0.025), k=1000 of 8400 0.047 (0.146).

Big ``k`` keeps TVM's sort (k=4200 of 8400: heap 0.47 ms, sort 0.38): see :func:`selects`.
Data types: those whose key fits an int32 (:data:`KEYED_DTYPES`); others keep the sort.
"""

from __future__ import annotations

import tvm
from tvm import relax, te
from tvm.relax.expr_functor import PyExprMutator, mutator

from kiln.backends.tvm.schedules.elementwise import PARALLEL_MIN_ELEMENTS

_TOPK = "relax.topk"
#: the data types whose order key is an int32 (float16 and bfloat16 widened exactly);
#: float64, int64 and uint32 keep TVM's sort
KEYED_DTYPES = ("float32", "float16", "bfloat16", "int32", "int16", "int8", "uint16", "uint8")
#: the shortest rows taken in parallel (with at least ``PARALLEL_MIN_ELEMENTS`` in all)
MIN_PARALLEL_ROW = 256
#: a ``k`` up to this is always selected by the heap ...
SMALL_K = 256
#: ... a larger one only when at most this fraction of the row
LARGE_K_FRACTION = 8


def selects(k: int, n: int) -> bool:
    """Whether the heap kernel takes ``k`` of ``n`` (else TVM's sort): ``0 < k <= n`` and
    ``k <= 256`` or ``8 k <= n``."""
    return 0 < k <= n and (k <= SMALL_K or LARGE_K_FRACTION * k <= n)


def _order_key(value, dtype: str, largest: bool):
    """An int32 that orders as the output does, best largest (module doc): float32's bits
    with the negative ones' magnitude flipped, -0.0 as 0.0, NaN above every number; for
    ``smallest`` the bits inverted."""
    from tvm import tirx

    if dtype.startswith(("float", "bfloat")):
        v = value.astype("float32") if dtype != "float32" else value
        bits = tirx.reinterpret("int32", v)
        key = tirx.Select(bits < 0, tirx.bitwise_xor(bits, tirx.const(0x7FFFFFFF, "int32")),
                          bits)
        key = tirx.Select(v == tirx.const(0, "float32"), tirx.const(0, "int32"), key)
        key = tirx.Select(tirx.isnan(v), tirx.const(0x7FFFFFFF, "int32"), key)
    else:
        key = value.astype("int32")
    return key if largest else tirx.bitwise_not(key)


def _rank(value, index, dtype: str, largest: bool):
    """One int64 per element, larger ranking first: the order key, then the lower index."""
    from tvm import tirx

    low = tirx.const(0xFFFFFFFF, "int64") - index.astype("int64")
    return _order_key(value, dtype, largest).astype("int64") * tirx.const(1 << 32, "int64") + low


def _may_beat(value, bar, dtype: str, largest: bool):
    """A cheap test that every later element beating the root's value ``bar`` passes (NaN
    ranks above numbers; written without ``not``, which TVM's simplifier would turn into
    the opposite compare, wrong on NaN)."""
    from tvm import tirx

    if not dtype.startswith(("float", "bfloat")):
        return value > bar if largest else value < bar
    if largest:
        return tirx.any(value > bar, tirx.isnan(value))
    return tirx.any(value < bar, tirx.isnan(bar))


def _index(rank):
    """The element index in a :func:`_rank`."""
    from tvm import tirx

    mask = tirx.const(0xFFFFFFFF, "int64")
    return mask - tirx.bitwise_and(rank, mask)


def topk_rows(data: te.Tensor, k: int, axis: int, largest: bool, index_dtype: str):
    """TE tensors ``(values, indices)``: the ``k`` first of ``data`` along ``axis`` (static
    length ``>= k``), in ONNX's order (module doc)."""
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    shape = list(data.shape)
    axis = axis % len(shape)
    n = int(shape[axis])
    inner = _product(shape[axis + 1:])
    rows = _product(shape[:axis]) * inner
    out_shape = [*shape[:axis], k, *shape[axis + 1:]]
    dtype = str(data.dtype)
    static_rows = isinstance(rows, int) or isinstance(rows, tirx.IntImm)
    # rows in parallel when there are several, long ones (a parallel loop over thousands
    # of 8-wide router rows ran slower than a serial one)
    parallel = static_rows and int(rows) > 1 and n >= MIN_PARALLEL_ROW \
        and int(rows) * n >= PARALLEL_MIN_ELEMENTS
    loop = T.parallel if parallel else T.serial

    def ir(ins, outs):
        with IRBuilder() as ib:
            with T.seq_scope():
                x = T.buffer_proxy(T.decl_buffer((rows * n,), dtype, data=ins[0].data))
                val = T.buffer_proxy(T.decl_buffer((rows * k,), dtype, data=outs[0].data))
                idx = T.buffer_proxy(T.decl_buffer((rows * k,), index_dtype,
                                                   data=outs[1].data))
                heaps = T.buffer_proxy(T.alloc_buffer((rows * k,), "int64"))
                with loop(0, rows) as row:
                    src = (row // inner) * (n * inner) + row % inner
                    heap = row * k
                    pos = T.buffer_proxy(T.alloc_buffer((4,), "int64", scope="local"))

                    def sift(start, size):
                        _sift_down(heaps, heap, start, size, pos)

                    with T.serial(0, k) as j:
                        heaps[heap + j] = _rank(x[src + j * inner], j, dtype, largest)
                    with T.serial(0, k // 2) as j:
                        sift(k // 2 - 1 - j, k)
                    # the root's value: what a later element must beat (prefilter)
                    bar = T.buffer_proxy(T.alloc_buffer((1,), dtype, scope="local"))
                    bar[0] = x[src + _index(heaps[heap]) * inner]
                    with T.serial(k, n) as j:
                        v = x[src + j * inner]
                        with T.If(_may_beat(v, bar[0], dtype, largest)):
                            with T.Then():
                                with T.If(_rank(v, j, dtype, largest) > heaps[heap]):
                                    with T.Then():
                                        heaps[heap] = _rank(v, j, dtype, largest)
                                        sift(0, k)
                                        bar[0] = x[src + _index(heaps[heap]) * inner]
                    with T.serial(0, k - 1) as j:
                        last = heap + k - 1 - j
                        pos[0] = heaps[heap]
                        heaps[heap] = heaps[last]
                        heaps[last] = pos[0]
                        sift(0, k - 1 - j)
                    with T.serial(0, k) as j:
                        at = _index(heaps[heap + j])
                        dst = (row // inner) * (k * inner) + row % inner + j * inner
                        idx[dst] = at.astype(index_dtype)
                        val[dst] = x[src + at * inner]
        return ib.get()

    return te.extern([out_shape, out_shape], [data], ir, dtype=[dtype, index_dtype],
                     name="kiln_topk", tag="kiln_topk")


def _product(dims):
    total = 1
    for d in dims:
        total = total * d
    return total


def _sift_down(heaps, base, start, size, pos):
    """Move entry ``start`` of the min-heap ``heaps[base:base + size]`` down to its place
    (a hole moved down, the entry stored once). ``pos``: int64 ``[4]`` scratch (the entry,
    the hole, its smaller child, whether to go on)."""
    from tvm import tirx
    from tvm.script.ir_builder import tirx as T

    pos[0] = heaps[base + start]
    pos[1] = tirx.Cast("int64", start)
    pos[3] = tirx.const(1, "int64")
    with T.While(tirx.all(pos[3] == 1, pos[1] * 2 + 1 < size)):
        pos[2] = pos[1] * 2 + 1
        with T.If(tirx.all(pos[2] + 1 < size, heaps[base + pos[2] + 1] < heaps[base + pos[2]])):
            with T.Then():
                pos[2] = pos[2] + 1
        with T.If(heaps[base + pos[2]] < pos[0]):
            with T.Then():
                heaps[base + pos[1]] = heaps[base + pos[2]]
                pos[1] = pos[2]
            with T.Else():
                pos[3] = tirx.const(0, "int64")
    heaps[base + pos[1]] = pos[0]


def _static_axis(call: relax.Call) -> tuple[int, int] | None:
    """``(axis, length)`` of the reduced axis when the data's shape and that length are
    known, else None."""
    shape = getattr(call.args[0].ty, "shape", None)
    values = getattr(shape, "values", None)
    if values is None or not len(values):
        return None
    axis = int(call.attrs.axis) % len(values)
    if not isinstance(values[axis], tvm.tirx.IntImm):
        return None
    return axis, int(values[axis])


@mutator
class _SelectTopK(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == _TOPK):
            return call
        static = _static_axis(call)
        k = int(call.attrs.k)
        if static is None or not selects(k, static[1]):
            return call
        dtype = str(call.args[0].ty.dtype)
        if dtype not in KEYED_DTYPES or static[1] >= 1 << 31:
            return call
        both = self.builder_.call_te(topk_rows, call.args[0], k=k, axis=static[0],
                                     largest=bool(call.attrs.largest),
                                     index_dtype=str(call.attrs.dtype),
                                     primfunc_name_hint="kiln_topk")
        ret = str(call.attrs.ret_type)
        if ret == "both":
            return both
        return relax.TupleGetItem(self.builder_.emit(both), 0 if ret == "values" else 1)


@tvm.transform.module_pass(opt_level=0, name="kiln.SelectTopK")
def select_topk(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Every small-``k`` ``topk`` of ``mod`` as kiln's heap kernel (module doc)."""
    rewriter = _SelectTopK(mod)
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
    return rewriter.builder_.finalize()
