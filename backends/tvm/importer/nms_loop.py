"""NonMaxSuppression as one kiln kernel: score filter, a heap per class, the greedy loop
against the boxes kept so far, the rows collected in order.

TOPI's ``all_class_non_max_suppression`` sorts every class's scores in full (a runtime
argsort: 1.07 of its 1.49 ms on 1000 boxes x 20 classes, 1 thread, AMD EPYC Zen 4), then
filters by score, then runs its loop. Here each class is a task of a parallel loop that

1. keeps the boxes whose score passes the threshold (most fail it in a detector),
2. makes a max-heap of them (score, then the lower box index first on equal scores, as
   ONNX Runtime pops them) and pops only until the per-class limit is kept or the heap is
   empty (no full sort: a pop is ``log`` of the candidates),
3. checks each popped box against all the boxes kept so far (at most the limit), 16 at a
   time in one vector (no early exit: cheaper than a branch per kept box), with every
   box's corners and area computed once per batch, in ONNX Runtime's float32 arithmetic
   and order (so the same IoU at the threshold).

The rows ``[batch, class, box]`` are then written class after class. The semantics are
those of Relax's ``vision.all_class_non_max_suppression`` (TOPI's): a box is suppressed
when its IoU with a kept box is ``>= iou_threshold`` and it is a candidate when its score
is ``> score_threshold``; the importer moves ONNX's IoU threshold to the next float32 up
(ONNX suppresses when ``IoU > threshold``). A box whose area or intersection is not
positive never suppresses (ONNX Runtime's rule), whatever its score.

With ``python -m bench.cases_vision_ops``' harness (1 thread, AMD EPYC Zen 4, load 3-4):
1000 boxes x 20 classes, 100 per class: 1.53-1.64 ms (session 11's TOPI hook) -> 0.30 ms,
ONNX Runtime 0.69-0.75; 8400 x 80, 300 per class, score 0.25 (a detector's scores, ~1%
pass): 79-109 -> 0.61-0.87 ms, ONNX Runtime 1.48-1.70; the same with uniform scores (75%
pass): 144-156 -> 14.6-22.6 ms, ONNX Runtime 35-57.

:func:`nms_rows` is the TE kernel (also used for runtime operands, :mod:`.runtime_nms`);
:func:`greedy_legalize_map` legalizes Relax's op with it, in place of TVM's own
legalization. Nothing of TOPI's is swapped any more (session 11 replaced TOPI's private
``_nms_loop`` while TOPI built; that left the sort and TOPI's collect and was not
thread-safe).
"""

from __future__ import annotations

#: per box of a batch: x min, x max, y min, y max, area (ONNX Runtime's float32 values)
_BOX_FIELDS = 5
#: kept boxes compared with a candidate at a time (one AVX-512 float32 vector)
LANES = 16


def _scalar(value, buf):
    """A kernel operand: a Python number as is, a 0-d or ``[1]`` tensor read at run time."""
    if buf is None:
        return value
    return buf[()] if len(buf.shape) == 0 else buf[0]


def _better(s_a, i_a, s_b, i_b):
    """Whether candidate ``a`` pops before ``b``: a higher score, or on equal scores the
    lower box index."""
    import tvm

    return tvm.tirx.any(s_a > s_b, tvm.tirx.all(s_a == s_b, i_a < i_b))


def _sift_down(heap_s, heap_i, start, size, pos):
    """Restore the heap below ``start`` (its first ``size`` entries; ``pos``: int32 ``[3]``
    local scratch: position, child, whether to go on)."""
    import tvm
    from tvm.script.ir_builder import tirx as T

    item_s = T.buffer_proxy(T.alloc_buffer((1,), "float32", scope="local"))
    item_i = T.buffer_proxy(T.alloc_buffer((1,), "int32", scope="local"))
    item_s[0] = heap_s[start]
    item_i[0] = heap_i[start]
    pos[0] = start
    pos[2] = T.int32(1)
    with T.While(tvm.tirx.all(pos[2] == 1, pos[0] * 2 + 1 < size)):
        pos[1] = pos[0] * 2 + 1
        with T.If(pos[1] + 1 < size):
            with T.Then():
                with T.If(_better(heap_s[pos[1] + 1], heap_i[pos[1] + 1],
                                  heap_s[pos[1]], heap_i[pos[1]])):
                    with T.Then():
                        pos[1] = pos[1] + 1
        with T.If(_better(heap_s[pos[1]], heap_i[pos[1]], item_s[0], item_i[0])):
            with T.Then():
                heap_s[pos[0]] = heap_s[pos[1]]
                heap_i[pos[0]] = heap_i[pos[1]]
                pos[0] = pos[1]
            with T.Else():
                pos[2] = T.int32(0)
    heap_s[pos[0]] = item_s[0]
    heap_i[pos[0]] = item_i[0]


def _box_table(boxes, table, batch: int, num_boxes: int):
    """``table[b, j]``: box ``j``'s x/y min and max (its corners in either order) and area."""
    import tvm
    from tvm.script.ir_builder import tirx as T

    with T.serial(0, batch) as b:
        with T.serial(0, num_boxes) as j:
            y_a, x_a, y_b, x_b = (boxes[b, j, k] for k in range(4))
            x_min, x_max = tvm.tirx.Select(x_a >= x_b, x_b, x_a), tvm.tirx.Select(x_a >= x_b, x_a, x_b)
            y_min, y_max = tvm.tirx.Select(y_a >= y_b, y_b, y_a), tvm.tirx.Select(y_a >= y_b, y_a, y_b)
            table[b, j, 0] = x_min
            table[b, j, 1] = x_max
            table[b, j, 2] = y_min
            table[b, j, 3] = y_max
            table[b, j, 4] = (x_max - x_min) * (y_max - y_min)


def _suppresses(kept, m, cand, iou):
    """Whether kept box ``m`` (fields in ``kept[:, m]``) suppresses ``cand`` (its fields)."""
    import tvm

    x_lo = tvm.tirx.max(kept[0, m], cand[0])
    x_hi = tvm.tirx.min(kept[1, m], cand[1])
    y_lo = tvm.tirx.max(kept[2, m], cand[2])
    y_hi = tvm.tirx.min(kept[3, m], cand[3])
    inter = (x_hi - x_lo) * (y_hi - y_lo)
    union = kept[4, m] + cand[4] - inter
    return tvm.tirx.all(x_hi > x_lo, y_hi > y_lo, inter > 0.0, kept[4, m] > 0.0,
                        cand[4] > 0.0, union > 0.0, inter / union >= iou)


def _any(hits):
    """The OR of a ``[LANES]`` int32 buffer."""
    hit = hits[0]
    for lane in range(1, LANES):
        hit = hit | hits[lane]
    return hit


def _push(heap_s, heap_i, state, size, scores, b, c, j, score):
    """Box ``j`` appended to the candidates when its score passes (no branch: written
    always, counted when it passes; every box passes when ``score`` is None)."""
    heap_s[state[size]] = scores[b, c, j]
    heap_i[state[size]] = j
    passes = 1 if score is None else (scores[b, c, j] > score).astype("int32")
    state[size] = state[size] + passes


def _class_task(i, ins, sel, counts, table, shape, limit, iou, score):
    """Class task ``i`` (batch ``i // classes``): its kept boxes into ``sel[i]`` and their
    count into ``counts[i]``."""
    import tvm
    from tvm.script.ir_builder import tirx as T

    _, classes, num_boxes, cap = shape
    scores = ins[1]
    b, c = i // classes, i % classes
    padded = -(-cap // LANES) * LANES
    heap_s = T.buffer_proxy(T.alloc_buffer((num_boxes,), "float32"))
    heap_i = T.buffer_proxy(T.alloc_buffer((num_boxes,), "int32"))
    kept = T.buffer_proxy(T.alloc_buffer((_BOX_FIELDS, padded), "float32"))
    cand = T.buffer_proxy(T.alloc_buffer((_BOX_FIELDS,), "float32", scope="local"))
    hits = T.buffer_proxy(T.alloc_buffer((LANES,), "int32", scope="local"))
    state = T.buffer_proxy(T.alloc_buffer((3,), "int32", scope="local"))
    pos = T.buffer_proxy(T.alloc_buffer((3,), "int32", scope="local"))
    size, count, box = 0, 1, 2  # state slots
    state[size] = T.int32(0)
    full = 0 if score is None else num_boxes // LANES
    if full:
        with T.serial(0, full) as chunk:  # LANES scores at a time: most fail in a detector
            with T.vectorized(0, LANES) as lane:
                hits[lane] = (scores[b, c, chunk * LANES + lane] > score).astype("int32")
            with T.If(_any(hits) != 0):
                with T.Then():
                    with T.serial(0, LANES) as lane:
                        _push(heap_s, heap_i, state, size, scores, b, c, chunk * LANES + lane,
                              score)
    with T.serial(full * LANES, num_boxes) as j:
        _push(heap_s, heap_i, state, size, scores, b, c, j, score)
    with T.serial(0, state[size] // 2) as r:  # heapify: parents from the last one up
        _sift_down(heap_s, heap_i, state[size] // 2 - 1 - r, state[size], pos)
    state[count] = T.int32(0)
    with T.While(tvm.tirx.all(state[size] > 0, state[count] < limit)):
        state[box] = heap_i[0]
        state[size] = state[size] - 1
        heap_s[0] = heap_s[state[size]]
        heap_i[0] = heap_i[state[size]]
        _sift_down(heap_s, heap_i, 0, state[size], pos)
        for k in range(_BOX_FIELDS):
            cand[k] = table[b, state[box], k]
        # against every kept box, LANES at a time (the empty slots suppress nothing)
        with T.vectorized(0, LANES) as lane:
            hits[lane] = T.int32(0)
        with T.serial(0, (state[count] + LANES - 1) // LANES) as chunk:
            with T.vectorized(0, LANES) as lane:
                hits[lane] = hits[lane] | tvm.tirx.Select(
                    _suppresses(kept, chunk * LANES + lane, cand, iou), T.int32(1), T.int32(0))
        with T.If(_any(hits) == 0):
            with T.Then():
                with T.If(state[count] % LANES == 0):  # a new vector of slots: empty
                    with T.Then():          # ones have area 0 and suppress nothing
                        with T.serial(0, _BOX_FIELDS) as k:
                            with T.vectorized(0, LANES) as lane:
                                kept[k, state[count] + lane] = T.float32(0.0)
                for k in range(_BOX_FIELDS):
                    kept[k, state[count]] = cand[k]
                # clamped: a write the race check can bound to row i
                sel[i, tvm.tirx.min(tvm.tirx.max(state[count], 0), cap - 1)] = state[box]
                state[count] = state[count] + 1
    counts[i] = state[count]


def nms_rows(boxes, scores, limit, iou, score):
    """TE tensors ``(rows [batch * classes * cap, 3] int64, total [1] int64)``: the first
    ``total`` rows are the selected ``[batch, class, box]`` (class after class, each in pop
    order). ``boxes`` ``[batch, n, 4]`` corners, ``scores`` ``[batch, classes, n]``;
    ``limit`` (per class), ``iou`` and ``score`` are Python numbers or 0-d / ``[1]``
    tensors (a ``limit`` tensor: int32 within ``[0, n]``; ``cap`` is then ``n``); ``score``
    None: no score filter, every box a candidate (-inf scores too, as ONNX Runtime does
    without the operand)."""
    import tvm
    from tvm import te
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    batch, num_boxes, _ = (int(d) for d in boxes.shape)
    classes = int(scores.shape[1])
    tensors = [t for t in (limit, iou, score) if isinstance(t, te.Tensor)]
    cap = num_boxes if isinstance(limit, te.Tensor) else max(0, min(int(limit), num_boxes))
    tasks = batch * classes
    shape = (batch, classes, num_boxes, max(cap, 1))

    def ir(ins, outs):
        ops = iter(ins[2:])
        given = [T.buffer_proxy(next(ops)) if isinstance(t, te.Tensor) else None
                 for t in (limit, iou, score)]
        ins = [T.buffer_proxy(b) for b in ins[:2]]
        rows, total = (T.buffer_proxy(b) for b in outs)
        with IRBuilder() as ib:
            with T.seq_scope():
                table = T.buffer_proxy(T.alloc_buffer((batch, num_boxes, _BOX_FIELDS), "float32"))
                sel = T.buffer_proxy(T.alloc_buffer((tasks, max(cap, 1)), "int32"))
                counts = T.buffer_proxy(T.alloc_buffer((tasks,), "int32"))
                _box_table(ins[0], table, batch, num_boxes)
                lim, thr_iou, thr_score = (
                    _scalar(v, g) for v, g in zip((cap, iou, score), given, strict=True))
                lim = tvm.tirx.const(lim, "int32") if isinstance(lim, int) else lim
                thr_iou = tvm.tirx.const(thr_iou, "float32") if isinstance(thr_iou, float) \
                    else thr_iou
                thr_score = tvm.tirx.const(thr_score, "float32") \
                    if isinstance(thr_score, float) else thr_score
                with T.parallel(0, tasks) as i:
                    _class_task(i, ins, sel, counts, table, shape, lim, thr_iou, thr_score)
                offset = T.buffer_proxy(T.alloc_buffer((1,), "int64", scope="local"))
                offset[0] = T.int64(0)
                with T.serial(0, tasks) as i:  # ~ a few thousand rows: serial
                    with T.serial(0, counts[i]) as j:
                        rows[offset[0] + j, 0] = (i // classes).astype("int64")
                        rows[offset[0] + j, 1] = (i % classes).astype("int64")
                        rows[offset[0] + j, 2] = sel[i, j].astype("int64")
                    offset[0] = offset[0] + counts[i].astype("int64")
                total[0] = offset[0]
        return ib.get()

    return te.extern([(max(tasks * cap, 1), 3), (1,)], [boxes, scores, *tensors], ir,
                     dtype=["int64", "int64"], name="kiln_nms", tag="kiln_nms")


def trimmed(bb, result):
    """``rows[:total]`` of :func:`nms_rows`'s ``(rows, total)`` (emitted Relax tuple)."""
    from tvm import relax, te, tirx

    rows = bb.emit(relax.TupleGetItem(result, 0))
    total = bb.emit(relax.TupleGetItem(result, 1))

    def bounds(count):
        begin = te.compute((2,), lambda i: tirx.const(0, "int64"), name="begin")
        end = te.compute((2,), lambda i: tirx.if_then_else(
            i == 0, count[0].astype("int64"), tirx.const(3, "int64")), name="end")
        strides = te.compute((2,), lambda i: tirx.const(1, "int64"), name="strides")
        return [begin, end, strides]

    parts = bb.emit_te(bounds, total, primfunc_name_hint="kiln_nms_rows")
    begin, end, strides = (bb.emit(relax.TupleGetItem(parts, i)) for i in range(3))
    return bb.emit(relax.op.dynamic_strided_slice(rows, begin, end, strides)), total


def _constant(expr, kind):
    """``expr`` as a Python ``kind`` when it is a Relax constant, else ``expr``."""
    import tvm

    if isinstance(expr, tvm.ir.GenericConst):
        return kind(expr.value.numpy().reshape(-1)[0])
    return expr


def greedy_legalize_map() -> dict:
    """A ``LegalizeOps`` entry: Relax's NonMaxSuppression op (ONNX output format) as
    :func:`nms_rows`; the TensorFlow format keeps TVM's legalization."""
    import tvm
    from tvm import relax

    name = "relax.vision.all_class_non_max_suppression"
    default = tvm.ir.Op.get(name).get_attr("FLegalize")

    def legalize(bb, call):
        boxes, scores, limit, iou, score = call.args
        if call.attrs.output_format != "onnx" or len(scores.ty.shape) != 3:
            return default(bb, call)
        num_boxes = int(scores.ty.shape[2])
        limit = _constant(limit, int)
        limit = max(0, min(limit, num_boxes)) if isinstance(limit, int) else num_boxes
        iou, score = _constant(iou, float), _constant(score, float)
        if score == float("-inf"):  # the importer's "no score_threshold operand"
            score = None
        args = [a for a in (iou, score) if not isinstance(a, (float, type(None)))]

        def kernel(b, s, *rest):
            rest = iter(rest)
            return nms_rows(b, s, limit, *(v if isinstance(v, (float, type(None)))
                                           else next(rest) for v in (iou, score)))

        result = bb.emit_te(kernel, boxes, scores, *args, primfunc_name_hint="kiln_nms")
        selected, total = trimmed(bb, result)
        return relax.Tuple([selected, total])

    return {name: legalize}
