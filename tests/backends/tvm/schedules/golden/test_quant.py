"""Golden TensorIR for the decode rules (``schedules/quant_gemv.py``,
``quant_conv.py``): an int8 GEMV with its per-column scale decodes inside the K loop;
an int8 conv decodes one output-channel panel of its weight per task into a small
buffer (the int8 weight re-laid out at compile time), then runs the register tile."""

from __future__ import annotations

from tvm.script import tirx as T

from .check import assert_rule_gives


@T.prim_func(private=True, s_tir=True)
def decode_contraction_before(A: T.Buffer((1, 16), "float32"), Wq: T.Buffer((16, 8), "int8"), scale: T.Buffer((8,), "float32"), matmul: T.Buffer((1, 8), "float32")):
    T.func_attr({"tirx.noalias": True})
    # with T.sblock("root"):
    decode = T.sblock_alloc_buffer((16, 8))
    for k, n in T.grid(16, 8):
        with T.sblock("decode"):
            v_k, v_n = T.axis.remap("SS", [k, n])
            T.reads(Wq[v_k, v_n], scale[v_n])
            T.writes(decode[v_k, v_n])
            decode[v_k, v_n] = T.Cast("float32", Wq[v_k, v_n]) * scale[v_n]
    for m, n, k in T.grid(1, 8, 16):
        with T.sblock("matmul"):
            v_m, v_n, v_k = T.axis.remap("SSR", [m, n, k])
            T.reads(A[v_m, v_k], decode[v_k, v_n])
            T.writes(matmul[v_m, v_n])
            with T.init():
                matmul[v_m, v_n] = T.float32(0.0)
            matmul[v_m, v_n] = matmul[v_m, v_n] + A[v_m, v_k] * decode[v_k, v_n]


@T.prim_func(private=True, s_tir=True)
def decode_contraction_expected(A: T.Buffer((1, 16), "float32"), Wq: T.Buffer((16, 8), "int8"), scale: T.Buffer((8,), "float32"), matmul: T.Buffer((1, 8), "float32")):
    T.func_attr({"tirx.noalias": True})
    # with T.sblock("root"):
    matmul_local = T.sblock_alloc_buffer((1, 8), scope="local")
    for ax0_0 in T.parallel(1):
        for ax0_1_init in T.unroll(2):
            for ax0_2_init in T.vectorized(4):
                with T.sblock("matmul_init"):
                    v0 = T.axis.spatial(8, ax0_0 * 8 + ax0_1_init * 4 + ax0_2_init)
                    T.reads()
                    T.writes(matmul_local[0, v0])
                    matmul_local[0, v0] = T.float32(0.0)
        for ax1_0 in range(4):
            for ax1_1 in T.unroll(4):
                for ax0_1 in T.unroll(2):
                    for ax0_2 in T.vectorized(4):
                        with T.sblock("matmul_update"):
                            v0 = T.axis.spatial(8, ax0_0 * 8 + ax0_1 * 4 + ax0_2)
                            v1 = T.axis.reduce(16, ax1_0 * 4 + ax1_1)
                            T.reads(matmul_local[0, v0], A[0, v1], Wq[v1, v0], scale[v0])
                            T.writes(matmul_local[0, v0])
                            matmul_local[0, v0] = matmul_local[0, v0] + A[0, v1] * (T.Cast("float32", Wq[v1, v0]) * scale[v0])
        for ax0, ax1_0 in T.grid(1, 2):
            for ax1_1 in T.vectorized(4):
                with T.sblock("matmul_local"):
                    v0 = T.axis.spatial(1, ax0)
                    v1 = T.axis.spatial(8, ax1_0 * 4 + ax1_1)
                    T.reads(matmul_local[v0, v1])
                    T.writes(matmul[v0, v1])
                    matmul[v0, v1] = matmul_local[v0, v1]


@T.prim_func(private=True, s_tir=True)
def decode_conv_before(X: T.Buffer((1, 4, 6, 6), "float32"), Wq: T.Buffer((8, 4, 3, 3), "int8"), scale: T.Buffer((8,), "float32"), conv: T.Buffer((1, 8, 4, 4), "float32")):
    T.func_attr({"tirx.noalias": True})
    # with T.sblock("root"):
    decode = T.sblock_alloc_buffer((8, 4, 3, 3))
    for o, i, y, z in T.grid(8, 4, 3, 3):
        with T.sblock("decode"):
            v_o, v_i, v_y, v_z = T.axis.remap("SSSS", [o, i, y, z])
            T.reads(Wq[v_o, v_i, v_y, v_z], scale[v_o])
            T.writes(decode[v_o, v_i, v_y, v_z])
            decode[v_o, v_i, v_y, v_z] = T.Cast("float32", Wq[v_o, v_i, v_y, v_z]) * scale[v_o]
    for n, o, h, w, ci, ry, rx in T.grid(1, 8, 4, 4, 4, 3, 3):
        with T.sblock("conv"):
            v_n, v_o, v_h, v_w, v_ci, v_ry, v_rx = T.axis.remap("SSSSRRR", [n, o, h, w, ci, ry, rx])
            T.reads(X[v_n, v_ci, v_h + v_ry, v_w + v_rx], decode[v_o, v_ci, v_ry, v_rx])
            T.writes(conv[v_n, v_o, v_h, v_w])
            with T.init():
                conv[v_n, v_o, v_h, v_w] = T.float32(0.0)
            conv[v_n, v_o, v_h, v_w] = conv[v_n, v_o, v_h, v_w] + X[v_n, v_ci, v_h + v_ry, v_w + v_rx] * decode[v_o, v_ci, v_ry, v_rx]


@T.prim_func(private=True, s_tir=True)
def decode_conv_expected(X: T.Buffer((1, 4, 6, 6), "float32"), Wq: T.Buffer((8, 4, 3, 3), "int8"), scale: T.Buffer((8,), "float32"), conv: T.Buffer((1, 8, 4, 4), "float32")):
    T.func_attr({"tirx.noalias": True})
    # with T.sblock("root"):
    decode = T.sblock_alloc_buffer((1, 4, 3, 3, 8))
    Wq_global = T.sblock_alloc_buffer((1, 4, 3, 3, 8), "int8")
    conv_local = T.sblock_alloc_buffer((1, 4, 4, 8), scope="local")
    for ax0, ax1, ax2, ax3 in T.grid(8, 4, 3, 3):
        with T.sblock("Wq_global"):
            v0, v1, v2, v3 = T.axis.remap("SSSS", [ax0, ax1, ax2, ax3])
            T.reads(Wq[v0, v1, v2, v3])
            T.writes(Wq_global[0, v1, v2, v3, v0])
            T.sblock_attr({"meta_schedule.layout_rewrite_preproc": True})
            Wq_global[0, v1, v2, v3, v0] = Wq[v0, v1, v2, v3]
    for ax0_0 in T.parallel(1):
        for ax1, ax2, ax3 in T.grid(4, 3, 3):
            for ax0_0_1 in T.unroll(2):
                for ax0_1 in T.vectorized(4):
                    with T.sblock("decode"):
                        v0 = T.axis.spatial(8, ax0_0_1 * 4 + ax0_1)
                        v1, v2, v3 = T.axis.remap("SSS", [ax1, ax2, ax3])
                        T.reads(Wq_global[0, v1, v2, v3, v0], scale[v0])
                        T.writes(decode[0, v1, v2, v3, v0])
                        decode[0, v1, v2, v3, v0] = T.Cast("float32", Wq_global[0, v1, v2, v3, v0]) * scale[v0]
        for ax1_ax2_0_fused in range(4):
            for ax2_1_init in T.unroll(4):
                for ax0_1_0_init in T.unroll(2):
                    for ax0_1_1_init in T.vectorized(4):
                        with T.sblock("conv_init"):
                            v0 = T.axis.spatial(8, ax0_0 * 8 + ax0_1_0_init * 4 + ax0_1_1_init)
                            v1, v2 = T.axis.remap("SS", [ax1_ax2_0_fused, ax2_1_init])
                            T.reads()
                            T.writes(conv_local[0, v1, v2, v0])
                            conv_local[0, v1, v2, v0] = T.float32(0.0)
            for ax3, ax4 in T.grid(4, 3):
                for ax5 in T.unroll(3):
                    for ax2_1 in T.unroll(4):
                        for ax0_1_0 in T.unroll(2):
                            for ax0_1_1 in T.vectorized(4):
                                with T.sblock("conv_update"):
                                    v0 = T.axis.spatial(8, ax0_0 * 8 + ax0_1_0 * 4 + ax0_1_1)
                                    v1, v2, v3, v4, v5 = T.axis.remap("SSRRR", [ax1_ax2_0_fused, ax2_1, ax3, ax4, ax5])
                                    T.reads(conv_local[0, v1, v2, v0], X[0, v3, v1 + v4, v2 + v5], decode[0, v3, v4, v5, v0])
                                    T.writes(conv_local[0, v1, v2, v0])
                                    conv_local[0, v1, v2, v0] = conv_local[0, v1, v2, v0] + X[0, v3, v1 + v4, v2 + v5] * decode[0, v3, v4, v5, v0]
            for ax0, ax1, ax2, ax3 in T.grid(1, 8, 1, 4):
                with T.sblock("conv_local"):
                    v0, v1 = T.axis.remap("SS", [ax0, ax1])
                    v2 = T.axis.spatial(4, ax1_ax2_0_fused + ax2)
                    v3 = T.axis.spatial(4, ax3)
                    T.reads(conv_local[v0, v2, v3, v1])
                    T.writes(conv[v0, v1, v2, v3])
                    conv[v0, v1, v2, v3] = conv_local[v0, v2, v3, v1]



def test_decode_contraction_rule_gives_its_golden_schedule():
    assert_rule_gives("decode_contraction", decode_contraction_before, decode_contraction_expected, const_params=(1, 2))


def test_decode_conv_rule_gives_its_golden_schedule():
    assert_rule_gives("decode_conv", decode_conv_before, decode_conv_expected, const_params=(1, 2))
