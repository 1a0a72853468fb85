"""TOPI's hand-written CPU kernels (IR-builder code in opaque blocks): ScatterND's and
ScatterElements' copy-then-update loops, NonMaxSuppression's per-class loops.

These are not TVM's default loop nest: TOPI wrote their loops by hand and marked parallel
the ones it knows are independent (ScatterElements' rows, NMS's per-class search and
collection). What it left serial that is safe to run in parallel is the plain copy or fill
loop (ScatterND copies its data into the output, NMS zero-fills its index rows): a nest of
serial loops around one store whose indices are a bijection of the loop variables and
whose value reads nothing the nest writes. Here:

- such a nest, when it is the top level of an opaque block (not under a TOPI loop) and
  moves at least ``PARALLEL_MIN_ELEMENTS`` elements, gets its outer loop parallel;
- the ordinary (TensorIR) blocks of the kernel get the element-wise schedule;
- everything else (the data-dependent update loops, a sort called in the runtime) is
  kept as TOPI wrote it.

TVM 0.27's Python API has no statement mutator, so the loops are rebuilt along the path
to each changed loop (the rest of the tree is shared).
"""

from __future__ import annotations

import math

import tvm
from tvm import s_tir, tirx
from tvm import sym as arith
from tvm.s_tir.stmt import SBlock, SBlockRealize

from kiln.backends.tvm.schedules.analysis import BufferLoad
from kiln.backends.tvm.schedules.elementwise import PARALLEL_MIN_ELEMENTS, parallel_vectorize
from kiln.backends.tvm.schedules.rule import KilnRule, RuleContext


class IRBuilderKernels(KilnRule):
    """Kernels with TOPI's IR-builder code: its plain copy loops parallel (see module doc)."""

    name = "ir_builder"

    def schedule(self, sch: s_tir.Schedule, ctx: RuleContext) -> s_tir.Schedule | None:
        return schedule_ir_builder(sch, ctx)


def is_opaque(block: SBlock) -> bool:
    """An IR-builder block: no iteration variables, no declared reads or writes."""
    return block.name_hint != "root" and not block.iter_vars and not block.reads \
        and not block.writes


def _blocks(stmt):
    """Every SBlock under ``stmt``."""
    found = []

    def visit(node):
        if isinstance(node, SBlock):
            found.append(node)

    _walk(stmt, visit)
    return found


def _walk(stmt, visit) -> None:
    visit(stmt)
    for name in ("body", "then_case", "else_case", "block", "init"):
        child = getattr(stmt, name, None)
        if isinstance(child, tirx.Stmt):
            _walk(child, visit)
    for child in getattr(stmt, "seq", None) or ():
        _walk(child, visit)


def schedule_ir_builder(sch: s_tir.Schedule, ctx: RuleContext) -> s_tir.Schedule | None:
    """``sch`` with its IR-builder copy loops parallel and its TensorIR blocks scheduled
    as element-wise ones; None when the kernel has no IR-builder block."""
    blocks = _blocks(sch.mod["main"].body)
    if not any(is_opaque(b) for b in blocks):
        return None
    for block in blocks:
        if block.name_hint == "root" or is_opaque(block) or block.init is not None:
            continue
        try:
            parallel_vectorize(sch, sch.get_sblock(block.name_hint), ctx.vector_lanes_f32)
        except Exception:  # noqa: BLE001 - a block the element-wise schedule cannot take
            continue
    func = sch.mod["main"]
    body = _rebuild(func.body, in_opaque=False, free=True)
    return sch if body.same_as(func.body) else s_tir.Schedule(func.with_body(body))


def _rebuild(stmt, *, in_opaque: bool, free: bool):
    """``stmt`` with each top-level plain copy nest of an opaque block made parallel
    (``free``: no enclosing loop is parallel already)."""
    if isinstance(stmt, tirx.For):
        if in_opaque:
            return (_parallel_copy(stmt) if free else None) or stmt
        body = _rebuild(stmt.body, in_opaque=False,
                        free=free and stmt.kind != tirx.ForKind.PARALLEL)
        return stmt if body.same_as(stmt.body) else tirx.For(
            stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body, stmt.thread_binding,
            stmt.annotations)
    if isinstance(stmt, tirx.SeqStmt):
        seq = [_rebuild(s, in_opaque=in_opaque, free=free) for s in stmt.seq]
        return stmt if all(a.same_as(b) for a, b in zip(seq, stmt.seq, strict=True)) \
            else tirx.SeqStmt(seq)
    if isinstance(stmt, tirx.AttrStmt):
        body = _rebuild(stmt.body, in_opaque=in_opaque, free=free)
        return stmt if body.same_as(stmt.body) else tirx.AttrStmt(
            stmt.node, stmt.attr_key, stmt.value, body)
    if isinstance(stmt, SBlockRealize):
        block = _rebuild(stmt.block, in_opaque=in_opaque, free=free)
        return stmt if block.same_as(stmt.block) else SBlockRealize(
            stmt.iter_values, stmt.predicate, block)
    if isinstance(stmt, SBlock):
        body = _rebuild(stmt.body, in_opaque=is_opaque(stmt), free=free)
        return stmt if body.same_as(stmt.body) else SBlock(
            stmt.iter_vars, stmt.reads, stmt.writes, stmt.name_hint, body, stmt.init,
            stmt.alloc_buffers, stmt.match_buffers, stmt.annotations)
    return stmt  # an If / While of TOPI's (data-dependent): kept as written


def _loads(expr) -> list:
    found = []
    todo = [expr]
    while todo:
        node = todo.pop()
        if isinstance(node, BufferLoad):
            found.append(node)
            todo.extend(node.indices)
        for name in ("a", "b", "value", "condition", "true_value", "false_value"):
            child = getattr(node, name, None)
            if isinstance(child, tvm.ir.Expr):
                todo.append(child)
        todo.extend(c for c in getattr(node, "args", ()) or () if isinstance(c, tvm.ir.Expr))
    return found


def _parallel_copy(loop: tirx.For) -> tirx.For | None:
    """``loop`` with its kind PARALLEL when it heads a plain copy / fill nest of at least
    ``PARALLEL_MIN_ELEMENTS`` stores (see module doc); None otherwise."""
    nest = []
    stmt = loop
    while isinstance(stmt, tirx.For):
        if stmt.kind != tirx.ForKind.SERIAL or not isinstance(stmt.extent, tirx.IntImm) \
                or not isinstance(stmt.min, tirx.IntImm):
            return None
        nest.append(stmt)
        stmt = stmt.body
    if not isinstance(stmt, tirx.BufferStore):
        return None
    if math.prod(int(f.extent) for f in nest) < PARALLEL_MIN_ELEMENTS:
        return None
    if any(load.source.same_as(stmt.buffer) for load in _loads(stmt.value)) or any(
            _loads(index) for index in stmt.indices):
        return None  # reads what it writes, or a data-dependent index (a scatter)
    iters = {f.loop_var: tvm.ir.Range.from_min_extent(f.min, f.extent) for f in nest}
    found = arith.detect_iter_map(list(stmt.indices), iters, check_level="bijective")
    if not found.indices:
        return None
    return tirx.For(loop.loop_var, loop.min, loop.extent, tirx.ForKind.PARALLEL, loop.body,
                    loop.thread_binding, loop.annotations)
