"""Golden TensorIR for the window rule (``schedules/window.py``): a 3-tap window
reduction vectorized along the output row (4 vectors of 4 lanes per tile), the window
loop unrolled."""

from __future__ import annotations

from tvm.script import tirx as T

from .check import assert_rule_gives


@T.prim_func(private=True, s_tir=True)
def window_before(X: T.Buffer((4, 18), "float32"), W: T.Buffer((4, 3), "float32"), window: T.Buffer((4, 16), "float32")):
    T.func_attr({"tirx.noalias": True})
    # with T.sblock("root"):
    for h, v, r in T.grid(4, 16, 3):
        with T.sblock("window"):
            v_h, v_v, v_r = T.axis.remap("SSR", [h, v, r])
            T.reads(X[v_h, v_v + v_r], W[v_h, v_r])
            T.writes(window[v_h, v_v])
            with T.init():
                window[v_h, v_v] = T.float32(0.0)
            window[v_h, v_v] = window[v_h, v_v] + X[v_h, v_v + v_r] * W[v_h, v_r]


@T.prim_func(private=True, s_tir=True)
def window_expected(X: T.Buffer((4, 18), "float32"), W: T.Buffer((4, 3), "float32"), window: T.Buffer((4, 16), "float32")):
    T.func_attr({"tirx.noalias": True})
    # with T.sblock("root"):
    window_local = T.sblock_alloc_buffer((4, 16), scope="local")
    for ax0 in T.parallel(4):
        for ax1_0 in range(1):
            for ax1_1_init in T.unroll(4):
                for ax1_2_init_0 in range(1):
                    for ax1_2_init_1 in T.vectorized(4):
                        with T.sblock("window_init"):
                            v0 = T.axis.spatial(4, ax0)
                            v1 = T.axis.spatial(16, ax1_0 * 16 + ax1_1_init * 4 + ax1_2_init_0 * 4 + ax1_2_init_1)
                            T.reads()
                            T.writes(window_local[v0, v1])
                            window_local[v0, v1] = T.float32(0.0)
            for ax2 in T.unroll(3):
                for ax1_1 in T.unroll(4):
                    for ax1_2 in T.vectorized(4):
                        with T.sblock("window_update"):
                            v0 = T.axis.spatial(4, ax0)
                            v1 = T.axis.spatial(16, ax1_0 * 16 + ax1_1 * 4 + ax1_2)
                            v2 = T.axis.reduce(3, ax2)
                            T.reads(window_local[v0, v1], X[v0, v1 + v2], W[v0, v2])
                            T.writes(window_local[v0, v1])
                            window_local[v0, v1] = window_local[v0, v1] + X[v0, v1 + v2] * W[v0, v2]
            for ax0_1, ax1_0_1 in T.grid(1, 4):
                for ax1_1 in T.vectorized(4):
                    with T.sblock("window_local"):
                        v0 = T.axis.spatial(4, ax0 + ax0_1)
                        v1 = T.axis.spatial(16, ax1_0_1 * 4 + ax1_1)
                        T.reads(window_local[v0, v1])
                        T.writes(window[v0, v1])
                        window[v0, v1] = window_local[v0, v1]



def test_window_rule_gives_its_golden_schedule():
    assert_rule_gives("window", window_before, window_expected, const_params=(1,))
