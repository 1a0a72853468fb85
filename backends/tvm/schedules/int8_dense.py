"""The integer dense kernel (``importer.int8_dense``) on x86 dot-product instructions.

The weight arrives packed ``[N / L, K / G, L, G]`` (``importer.int8_chains``); one
instruction multiplies ``G`` consecutive activations (broadcast as one 32-bit lane
group) with an ``L x G`` weight tile and adds into ``L`` int32 accumulators::

    parallel for (n_o, m_o) in (N / (NV*L), M / MR):   # one register tile per task
      acc[MR, NV*L] = 0                                # MR * NV vector registers
      for i in K / G:
        for r in MR: for v in NV:                      # unrolled
          acc[r, v*L : +L] = dot(acc, a[r, i*G : +G], w[n_o*NV + v, i])
      y[m_o*MR : +MR, n_o*NV*L : +NV*L] = requantize(acc)   # vectorized epilogue

``dot`` by the weight layout's ISA (LLVM 22's intrinsic signatures; TVM's own
``dot_16x4_vnni`` passes i32 vectors where LLVM 22 wants i8):
``vnni512`` ``vpdpbusd zmm`` (u8 x s8, 64 products); ``avx2_u8s8`` ``vpmaddubsw`` +
``vpmaddwd(1)`` + ``vpaddd`` (32 products, int16 pair sums: used only on weights that
cannot saturate them); ``avx2_s16`` ``vpmaddwd`` on int16 weights and activations
(16 products, exact; the activations are widened to int16 once, by the importer, so a
row's pair is one broadcast load).
"""

from __future__ import annotations

import logging

from tvm import s_tir
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from kiln.backends.tvm.kernel_names import INT8_ACC, INT8_OUTPUT
from kiln.backends.tvm.schedules.rule import KilnRule, RuleContext

log = logging.getLogger(__name__)

#: Weight layout (lanes L, group G, weight dtype) -> tensor intrinsic name.
INTRINSICS = {(16, 4, "int8"): "kiln_dot_16x4_vnni512",
              (8, 4, "int8"): "kiln_dot_8x4_avx2_u8s8",
              (8, 2, "int16"): "kiln_dot_8x2_avx2_s16"}
#: Rows of the register tile at most (a broadcast load of activations per row and step).
MAX_ROWS = 8
#: Weight vectors per register tile, preferred first.
VECTORS = (4, 3, 2, 1)


def _desc(lanes: int, group: int, w_dtype: str, a_dtype: str):
    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((group,), a_dtype, offset_factor=1),
             b: T.Buffer((lanes, group), w_dtype, offset_factor=1),
             c: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:group], b[0:lanes, 0:group])
            T.writes(c[0:lanes])
            for i in T.serial(0, lanes):
                for g in T.serial(0, group):
                    with T.sblock("update"):
                        vi, vg = T.axis.remap("SR", [i, g])
                        c[vi] = c[vi] + T.cast(a[vg], "int32") * T.cast(b[vi, vg], "int32")

    return desc


def _word(a, dtype: str):
    """The activations' group as one int32 (an expression: a named value in an intrinsic
    is a 4-byte "local" buffer, which TVM allocates per register tile with a workspace
    call and a free in the parallel loop)."""
    return T.reinterpret(a.vload([0], dtype), dtype="int32")


@T.prim_func(s_tir=True)
def _vnni512(a: T.Buffer((4,), "uint8", offset_factor=1),
             b: T.Buffer((16, 4), "int8", offset_factor=1),
             c: T.Buffer((16,), "int32", offset_factor=1)) -> None:
    with T.sblock("root"):
        T.reads(c[0:16], a[0:4], b[0:16, 0:4])
        T.writes(c[0:16])
        c[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            c.vload([0], dtype="int32x16"), T.reinterpret(T.broadcast(_word(a, "uint8x4"), 16),
                                                          dtype="int8x64"),
            b.vload([0, 0], dtype="int8x64"), dtype="int32x16")


@T.prim_func(s_tir=True)
def _avx2_u8s8(a: T.Buffer((4,), "uint8", offset_factor=1),
               b: T.Buffer((8, 4), "int8", offset_factor=1),
               c: T.Buffer((8,), "int32", offset_factor=1)) -> None:
    with T.sblock("root"):
        T.reads(c[0:8], a[0:4], b[0:8, 0:4])
        T.writes(c[0:8])
        c[T.ramp(T.int32(0), 1, 8)] = c.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                T.reinterpret(T.broadcast(_word(a, "uint8x4"), 8), dtype="int8x32"),
                b.vload([0, 0], dtype="int8x32"), dtype="int16x16"),
            T.broadcast(T.int16(1), 16), dtype="int32x8")


@T.prim_func(s_tir=True)
def _avx2_s16(a: T.Buffer((2,), "int16", offset_factor=1),
              b: T.Buffer((8, 2), "int16", offset_factor=1),
              c: T.Buffer((8,), "int32", offset_factor=1)) -> None:
    with T.sblock("root"):
        T.reads(c[0:8], a[0:2], b[0:8, 0:2])
        T.writes(c[0:8])
        c[T.ramp(T.int32(0), 1, 8)] = c.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
            T.reinterpret(T.broadcast(_word(a, "int16x2"), 8), dtype="int16x16"),
            b.vload([0, 0], dtype="int16x16"),
            dtype="int32x8")


def _register() -> None:
    impls = {"kiln_dot_16x4_vnni512": _vnni512, "kiln_dot_8x4_avx2_u8s8": _avx2_u8s8,
             "kiln_dot_8x2_avx2_s16": _avx2_s16}
    for (lanes, group, dtype), name in INTRINSICS.items():
        a_dtype = "int16" if dtype == "int16" else "uint8"  # s16: activations widened once
        TensorIntrin.register(name, _desc(lanes, group, dtype, a_dtype), impls[name],
                              override=True)


_register()


def register_tile(rows: int, vectors: int, registers: int) -> tuple[int, int]:
    """(MR, NV): MR rows (a divisor of ``rows``) x NV weight vectors (a divisor of
    ``vectors``) of accumulators, as many as fit in ``registers`` minus the weight
    vectors, the broadcast activation and a temporary."""
    best = (1, 1)
    for nv in VECTORS:
        if vectors % nv:
            continue
        budget = registers - nv - 3
        mr = max(d for d in range(1, min(rows, MAX_ROWS, budget // nv) + 1) if rows % d == 0)
        if mr * nv > best[0] * best[1]:
            best = (mr, nv)
    return best


def registers_of(lanes: int) -> int:
    """Vector registers of the ISA whose int32 vectors have ``lanes`` lanes."""
    return 32 if lanes == 16 else 16


def padded_rows(rows: int, vectors: int, registers: int) -> int:
    """``rows``, or up to ``rows / 16`` more, whichever gives :func:`register_tile` the most
    accumulators (the first such). The tile's rows must divide the row count: 169 rows
    (13 x 13 pixels) otherwise get one row per tile, each tile reading the whole weight
    panel for a single row (the importer computes the extra rows and slices them off)."""
    best, chosen = 0, rows
    for extra in range(MAX_ROWS):
        if extra * 16 > rows:
            break
        mr, nv = register_tile(rows + extra, vectors, registers)
        if mr * nv > best:
            best, chosen = mr * nv, rows + extra
    return chosen


def integer_kernel(sch: s_tir.Schedule, acc_name: str):
    """(acc, output) blocks of an integer kernel whose sums are block ``acc_name``, the
    epilogue's helper blocks (Gelu's erf, Sigmoid's exp, ...) inlined; None if it is not
    one."""
    try:
        acc = sch.get_sblock(acc_name)
        out = sch.get_sblock(INT8_OUTPUT)
    except Exception:  # noqa: BLE001 - not this kind of kernel
        return None
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(block).name_hint not in (acc_name, INT8_OUTPUT):
            sch.compute_inline(block)
    return acc, out


class Int8Dense(KilnRule):
    """kiln's integer dense kernel: register-tiled, dot products tensorized."""

    name = "int8_dense"

    def schedule(self, sch: s_tir.Schedule, ctx: RuleContext) -> s_tir.Schedule | None:
        found = integer_kernel(sch, INT8_ACC)
        if found is None:
            return None
        acc, out = found
        w = sch.get(acc).reads[1].source
        _, _, lanes, group = (int(d) for d in w.shape)
        intrin = INTRINSICS.get((lanes, group, str(w.dtype)))
        if intrin is None:
            return None
        rows, n = (int(d) for d in sch.get(out).writes[0].source.shape)
        mr, nv = register_tile(rows, n // lanes, registers_of(lanes))
        ym, yn = sch.get_loops(out)
        m_o, m_i = sch.split(ym, [None, mr])
        n_o, n_i = sch.split(yn, [None, nv * lanes])
        sch.reorder(n_o, m_o, m_i, n_i)
        task = sch.fuse(n_o, m_o)
        sch.parallel(task)
        sch.compute_at(acc, task)
        loops = sch.get_loops(acc)
        at = [sch.get(loop).same_as(sch.get(task)) for loop in loops].index(True)
        below = loops[at + 1:]  # (m, n, i, g); compute_at leaves out a row loop of extent 1
        a_m, (a_n, a_i, a_g) = (below[0] if len(below) == 4 else None), below[-3:]
        a_v, a_l = sch.split(a_n, [None, lanes])
        a_tap = None
        x = sch.get(acc).reads[0].source
        if len(x.shape) == 4 and int(x.shape[3]) // group < sch.get(a_i).extent:
            # an implicit-GEMM conv: step i reads tap i // per_tap, channel i % per_tap;
            # a tap loop outside turns that div/mod per step into plain index arithmetic
            a_tap, a_i = sch.split(a_i, [None, int(x.shape[3]) // group])
        sch.reorder(*(loop for loop in (a_tap, a_i, a_m, a_v, a_l, a_g) if loop is not None))
        init = sch.decompose_reduction(acc, a_tap if a_tap is not None else a_i)
        sch.tensorize(a_l, intrin)
        if a_m is not None:
            sch.unroll(a_m)
        sch.unroll(a_v)
        sch.vectorize(sch.get_loops(init)[-1])
        sch.vectorize(sch.split(n_i, [None, lanes])[-1])
        return sch
