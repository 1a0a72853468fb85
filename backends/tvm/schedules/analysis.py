"""Reading TensorIR blocks: what a kernel computes, as far as the schedule rules need to know.

A rule asks one question of a block ("is this C[b, i, j] += A[b, i, k] * B[b, k, j]?",
"is this a convolution?") and gets back the roles of its iterators, or None.
"""

from __future__ import annotations

import dataclasses

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import SBlockInfo, normalize_prim_func
from tvm.s_tir.dlight.analysis.common_analysis import collect_vars_used_in_prim_expr

# tirx.BufferLoad is a constructor function in TVM 0.27; the node class is ir.TensorLoad.
BufferLoad = tvm.ir.TensorLoad

__all__ = [
    "ContractionMatch",
    "SBlockInfo",
    "const_extent",
    "inline_epilogue",
    "inline_injective",
    "match_contraction",
    "normalize_prim_func",
    "single_reduction",
]


def const_extent(sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _strip_cast(expr):
    while isinstance(expr, tirx.Cast):
        expr = expr.value
    return expr


@dataclasses.dataclass(frozen=True, kw_only=True)
class ContractionMatch:
    """Roles of a ``C[..] += A[..] * B[..]`` block's iterators (positions in its iter_vars).

    Covers matmul, batch matmul, dense and direct convolution (NCHW or NHWC):
    ``B`` is the operand whose columns are vectorized (a weight when one is constant),
    ``A`` is broadcast one element at a time.
    """

    batch: tuple[int, ...]  # spatial iters used by A, B and C
    rows: tuple[int, ...]  # spatial iters used by A and C only (M; conv: n, h, w)
    col: int  # the spatial iter used by B and C only (N; conv: output channel)
    reds: tuple[int, ...]  # reduction iters (K; conv: ci, ry, rx)
    a: tirx.Buffer
    b: tirx.Buffer
    c: tirx.Buffer
    b_dims: tuple[int | None, ...]  # per dim of B: the iter it is indexed by (None: const 0)
    b_read_index: int  # position of B in the block's reads
    b_is_param: int | None  # B's position among the PrimFunc's params, if it is one


def _index_roles(indices, iter_vars) -> list[int | None] | None:
    """Per index: which iter var it is (by position), None for a constant 0; None if complex."""
    positions = {iv.var: n for n, iv in enumerate(iter_vars)}
    roles: list[int | None] = []
    for index in indices:
        if isinstance(index, tirx.Var) and index in positions:
            roles.append(positions[index])
        elif isinstance(index, tirx.IntImm) and int(index) == 0:
            roles.append(None)
        else:
            return None
    return roles


def _vars_in(expr, iter_vars) -> set[int]:
    positions = {iv.var: n for n, iv in enumerate(iter_vars)}
    return {positions[v] for v in collect_vars_used_in_prim_expr(expr) if v in positions}


def match_contraction(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV,
                      const_params: frozenset[int] = frozenset(), *, all_candidates: bool = False):
    """Match ``C[s...] = C[s...] + A[f(s, r)] * B[g(s, r)]``: one column iter, any reductions.

    C must be indexed by plain iters; B must be indexed by plain iters (a weight or a
    row-major operand); A may use affine indices (a convolution's ``h * stride + ry``).
    When both operands fit as B, a constant one (``const_params``) is preferred;
    ``all_candidates`` returns every fit, preferred first (a list), or None.
    """
    stmt = sch.get(block)
    if not isinstance(stmt.body, tirx.BufferStore) or stmt.init is None:
        return None
    store = stmt.body
    value = store.value
    if not isinstance(value, tirx.Add):
        return None
    lhs, rhs = _strip_cast(value.a), _strip_cast(value.b)
    if isinstance(rhs, BufferLoad) and rhs.source.same_as(store.buffer):
        lhs, rhs = rhs, lhs
    if not (isinstance(lhs, BufferLoad) and lhs.source.same_as(store.buffer)):
        return None
    if not isinstance(rhs, tirx.Mul):
        return None
    x_load, y_load = _strip_cast(rhs.a), _strip_cast(rhs.b)
    if not (isinstance(x_load, BufferLoad) and isinstance(y_load, BufferLoad)):
        return None
    if x_load.source.same_as(y_load.source):
        return None
    iters = list(stmt.iter_vars)
    if any(iv.iter_type not in (tirx.IterVar.DataPar, tirx.IterVar.CommReduce) for iv in iters):
        return None
    reds = tuple(n for n, iv in enumerate(iters) if iv.iter_type == tirx.IterVar.CommReduce)
    if not reds:
        return None
    c_roles = _index_roles(store.indices, iters)
    if c_roles is None:
        return None
    c_set = {r for r in c_roles if r is not None}
    params = list(sch.mod["main"].params)

    def param_index(buf):
        return next((n for n, p in enumerate(params) if p.same_as(buf)), None)

    def attempt(a_load, b_load):
        b_roles = _index_roles(b_load.indices, iters)
        if b_roles is None:
            return None
        a_set = set().union(*(_vars_in(i, iters) for i in a_load.indices))
        b_set = {r for r in b_roles if r is not None}
        if not set(reds) <= (a_set | b_set) or not all(r in b_set for r in reds):
            return None
        if not (a_set - set(reds)) <= c_set or not (b_set - set(reds)) <= c_set:
            return None
        cols = (b_set - a_set) - set(reds)
        if len(cols) != 1:
            return None
        col = next(iter(cols))
        batch = tuple(sorted((a_set & b_set) - set(reds)))
        rows = tuple(n for n in c_roles if n is not None and n not in b_set)
        if len([r for r in b_roles if r is not None]) != len(b_set):  # an iter used twice in B
            return None
        reads = [region.source for region in stmt.reads]
        b_read_index = next((n for n, buf in enumerate(reads) if buf.same_as(b_load.source)), None)
        if b_read_index is None:
            return None
        return ContractionMatch(batch=batch, rows=rows, col=col, reds=reds, a=a_load.source,
                                b=b_load.source, c=store.buffer, b_dims=tuple(b_roles),
                                b_read_index=b_read_index, b_is_param=param_index(b_load.source))

    candidates = [m for m in (attempt(x_load, y_load), attempt(y_load, x_load)) if m is not None]
    if not candidates:
        return None
    candidates.sort(key=lambda m: 0 if m.b_is_param is not None and m.b_is_param in const_params else 1)
    return candidates[0] if not all_candidates else candidates


def single_reduction(sch: s_tir.Schedule):
    """``(infos, info)`` of a kernel with exactly one reduction block (its ``SBlockInfo``
    list and that block's), or None when the kernel has no block analysis or another
    number of reductions: the common first question of the contraction and window rules."""
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    reductions = [info for info in infos if not info.is_injective()]
    if len(reductions) != 1:
        return None
    return infos, reductions[0]


def inline_injective(sch: s_tir.Schedule, main: str, *, side: str) -> bool:
    """compute_inline, one at a time until none is left, the injective blocks on one
    ``side`` ("before" or "after") of the block named ``main``; False if the function
    has no block analysis."""
    changed = True
    while changed:
        changed = False
        infos = normalize_prim_func(sch)
        if infos is None:
            return False
        names = [info.name for info in infos]
        at = names.index(main)
        for info in (infos[:at] if side == "before" else infos[at + 1:]):
            if not info.is_injective():
                continue
            try:
                sch.compute_inline(info.block_rv)
            except Exception:  # noqa: BLE001 - TVM signals "cannot inline" with several kinds
                continue
            changed = True
            break
    return True


def inline_epilogue(sch: s_tir.Schedule, main: str) -> list[str]:
    """compute_inline the injective blocks after ``main`` into their consumers.

    Returns the names of the blocks after ``main`` that remain (the last one, which
    writes the function's output, always does).  Blocks before ``main`` are left alone
    so that the main block's operands keep their plain indices.
    """
    if not inline_injective(sch, main, side="after"):
        return []
    names = [info.name for info in normalize_prim_func(sch)]
    return names[names.index(main) + 1:]
