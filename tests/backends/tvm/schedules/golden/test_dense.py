"""Golden TensorIR for kiln's contraction rule (``schedules/dense.py``): a matmul on a
constant weight with a ReLU epilogue becomes the register-tiled micro-kernel (4 x 8 tile
of 4-lane vectors, K unrolled by 4), the weight packed by a layout-rewrite block (run at
compile time), the epilogue applied in the tile write-back; the 32-float accumulator in
"global" scope (under 1 KiB: TVM puts it on the stack, ``dense.stack_accumulator``)."""

from __future__ import annotations

from tvm.script import tirx as T

from .check import assert_rule_gives


@T.prim_func(private=True, s_tir=True)
def contraction_before(A: T.Buffer((4, 8), "float32"), B: T.Buffer((8, 8), "float32"), relu: T.Buffer((4, 8), "float32")):
    T.func_attr({"tirx.noalias": True})
    # with T.sblock("root"):
    matmul = T.sblock_alloc_buffer((4, 8))
    for i, j, k in T.grid(4, 8, 8):
        with T.sblock("matmul"):
            v_i, v_j, v_k = T.axis.remap("SSR", [i, j, k])
            T.reads(A[v_i, v_k], B[v_k, v_j])
            T.writes(matmul[v_i, v_j])
            with T.init():
                matmul[v_i, v_j] = T.float32(0.0)
            matmul[v_i, v_j] = matmul[v_i, v_j] + A[v_i, v_k] * B[v_k, v_j]
    for i, j in T.grid(4, 8):
        with T.sblock("relu"):
            v_i, v_j = T.axis.remap("SS", [i, j])
            T.reads(matmul[v_i, v_j])
            T.writes(relu[v_i, v_j])
            relu[v_i, v_j] = T.max(matmul[v_i, v_j], T.float32(0.0))


@T.prim_func(private=True, s_tir=True)
def contraction_expected(A: T.Buffer((4, 8), "float32"), B: T.Buffer((8, 8), "float32"), relu: T.Buffer((4, 8), "float32")):
    T.func_attr({"tirx.noalias": True})
    # with T.sblock("root"):
    B_global = T.sblock_alloc_buffer((1, 8, 8))
    matmul_global = T.sblock_alloc_buffer((4, 8))
    for ax0, ax1 in T.grid(8, 8):
        with T.sblock("B_global"):
            v0, v1 = T.axis.remap("SS", [ax0, ax1])
            T.reads(B[v0, v1])
            T.writes(B_global[0, v0, v1])
            T.sblock_attr({"meta_schedule.layout_rewrite_preproc": True})
            B_global[0, v0, v1] = B[v0, v1]
    for ax1_0_ax0_0_fused in T.parallel(1):
        for ax0_1_init in T.unroll(4):
            for ax1_1_0_init in T.unroll(2):
                for ax1_1_1_init in T.vectorized(4):
                    with T.sblock("matmul_init"):
                        v0 = T.axis.spatial(4, ax0_1_init)
                        v1 = T.axis.spatial(8, ax1_1_0_init * 4 + ax1_1_1_init)
                        T.reads()
                        T.writes(matmul_global[v0, v1])
                        matmul_global[v0, v1] = T.float32(0.0)
        for ax2_0 in range(2):
            for ax2_1 in T.unroll(4):
                for ax0_1 in T.unroll(4):
                    for ax1_1_0 in T.unroll(2):
                        for ax1_1_1 in T.vectorized(4):
                            with T.sblock("matmul_update"):
                                v0 = T.axis.spatial(4, ax0_1)
                                v1 = T.axis.spatial(8, ax1_1_0 * 4 + ax1_1_1)
                                v2 = T.axis.reduce(8, ax2_0 * 4 + ax2_1)
                                T.reads(matmul_global[v0, v1], A[v0, v2], B_global[0, v2, v1])
                                T.writes(matmul_global[v0, v1])
                                matmul_global[v0, v1] = matmul_global[v0, v1] + A[v0, v2] * B_global[0, v2, v1]
        for ax0, ax1_0 in T.grid(4, 2):
            for ax1_1 in T.vectorized(4):
                with T.sblock("matmul_global"):
                    v0 = T.axis.spatial(4, ax0)
                    v1 = T.axis.spatial(8, ax1_0 * 4 + ax1_1)
                    T.reads(matmul_global[v0, v1])
                    T.writes(relu[v0, v1])
                    relu[v0, v1] = T.max(matmul_global[v0, v1], T.float32(0.0))



def test_contraction_rule_gives_its_golden_schedule():
    assert_rule_gives("contraction", contraction_before, contraction_expected, const_params=(1,))
