"""Reading TensorIR blocks: what a kernel computes, as far as the schedule rules need to know.

A rule asks one question of a block ("is this C[b, i, j] += A[b, i, k] * B[b, k, j]?",
"is this a convolution?") and gets back the roles of its iterators, or None.
"""

from __future__ import annotations

import dataclasses

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import SBlockInfo, normalize_prim_func

# tirx.BufferLoad is a constructor function in TVM 0.27; the node class is ir.TensorLoad.
BufferLoad = tvm.ir.TensorLoad

__all__ = [
    "MatmulMatch",
    "RuleContext",
    "SBlockInfo",
    "const_extent",
    "inline_epilogue",
    "match_matmul",
    "normalize_prim_func",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RuleContext:
    """What a rule may know besides the PrimFunc: the target and which params are constants."""

    target: tvm.target.Target
    vector_lanes_f32: int  # fp32 lanes in one SIMD register (16 for AVX-512)
    num_cores: int
    const_params: frozenset[int]  # indices of params bound to relax.Constant at every call site


def const_extent(sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _loads(expr) -> list:
    found: list = []

    def visit(node):
        if isinstance(node, BufferLoad):
            found.append(node)

    tirx.stmt_functor.post_order_visit(expr, visit)
    return found


def _strip_cast(expr):
    while isinstance(expr, tirx.Cast):
        expr = expr.value
    return expr


@dataclasses.dataclass(frozen=True, kw_only=True)
class MatmulMatch:
    """Roles of a ``C[..] += A[..] * B[..]`` block's iterators (indices into its iter_vars)."""

    batch: tuple[int, ...]  # index A, B and C
    rows: tuple[int, ...]  # index A and C only (M, possibly several dims)
    col: int  # indexes B and C only (N)
    red: int  # the reduction (K), indexes A and B
    a: tirx.Buffer
    b: tirx.Buffer
    c: tirx.Buffer
    b_dims: tuple[str, ...]  # per dim of B: "k", "j", "batch" or "unit"
    b_read_index: int  # position of B in the block's reads


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


def match_matmul(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> MatmulMatch | None:
    """Match ``C[s...] = C[s...] + A[...] * B[...]`` with one reduction iter and plain indices."""
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
    a_load, b_load = _strip_cast(rhs.a), _strip_cast(rhs.b)
    if not (isinstance(a_load, BufferLoad) and isinstance(b_load, BufferLoad)):
        return None
    iters = list(stmt.iter_vars)
    red = [n for n, iv in enumerate(iters) if iv.iter_type == tirx.IterVar.CommReduce]
    if len(red) != 1 or any(iv.iter_type not in (tirx.IterVar.DataPar, tirx.IterVar.CommReduce)
                            for iv in iters):
        return None
    k = red[0]
    c_roles = _index_roles(store.indices, iters)
    a_roles = _index_roles(a_load.indices, iters)
    b_roles = _index_roles(b_load.indices, iters)
    if c_roles is None or a_roles is None or b_roles is None:
        return None
    if k not in a_roles or k not in b_roles:
        # the operand holding the reduction iter in both is required; swap if A is B
        return None
    # A is the operand that shares a spatial iter with C other than batch dims and B is the
    # one holding the single column iter; swap when the multiplication is written B * A.
    def spatial_only(roles):
        return {r for r in roles if r is not None and r != k}

    c_set = spatial_only(c_roles)
    a_set, b_set = spatial_only(a_roles), spatial_only(b_roles)
    if not (a_set <= c_set and b_set <= c_set):
        return None
    cols = b_set - a_set
    if len(cols) != 1:
        a_load, b_load = b_load, a_load
        a_roles, b_roles = b_roles, a_roles
        a_set, b_set = b_set, a_set
        cols = b_set - a_set
        if len(cols) != 1:
            return None
    col = next(iter(cols))
    batch = tuple(sorted(a_set & b_set))
    rows = tuple(sorted(c_set - b_set - {col}))
    # spatial iters of C that are in neither operand (extent 1 only)
    stray = c_set - a_set - b_set
    if any(int(iters[n].dom.extent) != 1 for n in stray if isinstance(iters[n].dom.extent, tirx.IntImm)):
        return None
    rows = tuple(sorted(set(rows) | stray))
    if len(set(r for r in b_roles if r is not None)) != len([r for r in b_roles if r is not None]):
        return None
    b_dims = tuple("unit" if r is None else "k" if r == k else "j" if r == col else "batch"
                   for r in b_roles)
    reads = [region.source for region in stmt.reads]
    b_read_index = next((n for n, buf in enumerate(reads) if buf.same_as(b_load.source)), None)
    if b_read_index is None or a_load.source.same_as(b_load.source):
        return None
    return MatmulMatch(batch=batch, rows=rows, col=col, red=k, a=a_load.source, b=b_load.source,
                       c=store.buffer, b_dims=b_dims, b_read_index=b_read_index)


def inline_epilogue(sch: s_tir.Schedule, main: str) -> list[str]:
    """compute_inline the injective blocks after ``main`` into their consumers.

    Returns the names of the blocks after ``main`` that remain (the last one, which
    writes the function's output, always does).  Blocks before ``main`` are left alone
    so that the main block's operands keep their plain indices.
    """
    changed = True
    while changed:
        changed = False
        infos = normalize_prim_func(sch)
        if infos is None:
            return []
        names = [info.name for info in infos]
        for info in infos[names.index(main) + 1:]:
            if not info.is_injective():
                continue
            try:
                sch.compute_inline(info.block_rv)
            except Exception:  # noqa: BLE001 - TVM signals "cannot inline" with several kinds
                continue
            changed = True
            break
    names = [info.name for info in normalize_prim_func(sch)]
    return names[names.index(main) + 1:]
