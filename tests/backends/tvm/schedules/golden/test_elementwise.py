"""Golden TensorIR for the elementwise, reduction and fallback rules
(``schedules/elementwise.py``): an injective chain inlined and vectorized; a row
normalization as per-row vector partial sums (``rfactor``); a column sum only
parallelized by the fallback rule."""

from __future__ import annotations

from tvm.script import tirx as T

from .check import assert_rule_gives


@T.prim_func(private=True, s_tir=True)
def elementwise_before(A: T.Buffer((4, 16), "float32"), B: T.Buffer((4, 16), "float32"), half: T.Buffer((4, 16), "float32")):
    T.func_attr({"tirx.noalias": True})
    # with T.sblock("root"):
    add = T.sblock_alloc_buffer((4, 16))
    for i, j in T.grid(4, 16):
        with T.sblock("add"):
            v_i, v_j = T.axis.remap("SS", [i, j])
            T.reads(A[v_i, v_j], B[v_i, v_j])
            T.writes(add[v_i, v_j])
            add[v_i, v_j] = A[v_i, v_j] + B[v_i, v_j]
    for i, j in T.grid(4, 16):
        with T.sblock("half"):
            v_i, v_j = T.axis.remap("SS", [i, j])
            T.reads(add[v_i, v_j])
            T.writes(half[v_i, v_j])
            half[v_i, v_j] = add[v_i, v_j] * T.float32(0.5)


@T.prim_func(private=True, s_tir=True)
def elementwise_expected(A: T.Buffer((4, 16), "float32"), B: T.Buffer((4, 16), "float32"), half: T.Buffer((4, 16), "float32")):
    T.func_attr({"tirx.noalias": True})
    # with T.sblock("root"):
    for ax0, ax1_0 in T.grid(4, 4):
        for ax1_1 in T.vectorized(4):
            with T.sblock("half"):
                v0 = T.axis.spatial(4, ax0)
                v1 = T.axis.spatial(16, ax1_0 * 4 + ax1_1)
                T.reads(A[v0, v1], B[v0, v1])
                T.writes(half[v0, v1])
                half[v0, v1] = (A[v0, v1] + B[v0, v1]) * T.float32(0.5)


@T.prim_func(private=True, s_tir=True)
def reduction_before(X: T.Buffer((4, 16), "float32"), normalize: T.Buffer((4, 16), "float32")):
    T.func_attr({"tirx.noalias": True})
    # with T.sblock("root"):
    row_sum = T.sblock_alloc_buffer((4,))
    for i, k in T.grid(4, 16):
        with T.sblock("row_sum"):
            v_i, v_k = T.axis.remap("SR", [i, k])
            T.reads(X[v_i, v_k])
            T.writes(row_sum[v_i])
            with T.init():
                row_sum[v_i] = T.float32(0.0)
            row_sum[v_i] = row_sum[v_i] + X[v_i, v_k]
    for i, j in T.grid(4, 16):
        with T.sblock("normalize"):
            v_i, v_j = T.axis.remap("SS", [i, j])
            T.reads(X[v_i, v_j], row_sum[v_i])
            T.writes(normalize[v_i, v_j])
            normalize[v_i, v_j] = X[v_i, v_j] / row_sum[v_i]


@T.prim_func(private=True, s_tir=True)
def reduction_expected(X: T.Buffer((4, 16), "float32"), normalize: T.Buffer((4, 16), "float32")):
    T.func_attr({"tirx.noalias": True})
    # with T.sblock("root"):
    row_sum = T.sblock_alloc_buffer((4,))
    row_sum_rf_local = T.sblock_alloc_buffer((4, 4), scope="local")
    for ax0 in range(4):
        for ax1 in range(1):
            for ax0_init in T.vectorized(4):
                with T.sblock("row_sum_rf_init"):
                    vax1_1 = T.axis.spatial(4, ax0_init)
                    v0 = T.axis.spatial(4, ax0 + ax1)
                    T.reads()
                    T.writes(row_sum_rf_local[vax1_1, v0])
                    row_sum_rf_local[vax1_1, v0] = T.float32(0.0)
            for ax2 in range(4):
                for ax0_1 in T.vectorized(4):
                    with T.sblock("row_sum_rf_update"):
                        vax1_1 = T.axis.spatial(4, ax0_1)
                        v0 = T.axis.spatial(4, ax0 + ax1)
                        vax1_0 = T.axis.reduce(4, ax2)
                        T.reads(row_sum_rf_local[vax1_1, v0], X[v0, vax1_0 * 4 + vax1_1])
                        T.writes(row_sum_rf_local[vax1_1, v0])
                        row_sum_rf_local[vax1_1, v0] = row_sum_rf_local[vax1_1, v0] + X[v0, vax1_0 * 4 + vax1_1]
        for ax0_1, ax1 in T.grid(4, 1):
            with T.sblock("row_sum"):
                vax1_1 = T.axis.reduce(4, ax0_1)
                v0 = T.axis.spatial(4, ax0 + ax1)
                T.reads(row_sum_rf_local[vax1_1, v0])
                T.writes(row_sum[v0])
                with T.init():
                    row_sum[v0] = T.float32(0.0)
                row_sum[v0] = row_sum[v0] + row_sum_rf_local[vax1_1, v0]
        for ax1_0 in range(4):
            for ax1_1 in T.vectorized(4):
                with T.sblock("normalize"):
                    v0 = T.axis.spatial(4, ax0)
                    v1 = T.axis.spatial(16, ax1_0 * 4 + ax1_1)
                    T.reads(X[v0, v1], row_sum[v0])
                    T.writes(normalize[v0, v1])
                    normalize[v0, v1] = X[v0, v1] / row_sum[v0]


@T.prim_func(private=True, s_tir=True)
def fallback_before(X: T.Buffer((8, 16), "float32"), column_sum: T.Buffer((16,), "float32")):
    T.func_attr({"tirx.noalias": True})
    # with T.sblock("root"):
    for j, i in T.grid(16, 8):
        with T.sblock("column_sum"):
            v_j, v_i = T.axis.remap("SR", [j, i])
            T.reads(X[v_i, v_j])
            T.writes(column_sum[v_j])
            with T.init():
                column_sum[v_j] = T.float32(0.0)
            column_sum[v_j] = column_sum[v_j] + X[v_i, v_j]


@T.prim_func(private=True, s_tir=True)
def fallback_expected(X: T.Buffer((8, 16), "float32"), column_sum: T.Buffer((16,), "float32")):
    T.func_attr({"tirx.noalias": True})
    # with T.sblock("root"):
    for ax0 in T.parallel(16):
        for ax1 in range(8):
            with T.sblock("column_sum"):
                v0, v1 = T.axis.remap("SR", [ax0, ax1])
                T.reads(X[v1, v0])
                T.writes(column_sum[v0])
                with T.init():
                    column_sum[v0] = T.float32(0.0)
                column_sum[v0] = column_sum[v0] + X[v1, v0]



def test_elementwise_rule_gives_its_golden_schedule():
    assert_rule_gives("elementwise", elementwise_before, elementwise_expected)


def test_reduction_rule_gives_its_golden_schedule():
    assert_rule_gives("reduction", reduction_before, reduction_expected)


def test_fallback_rule_gives_its_golden_schedule():
    assert_rule_gives("fallback", fallback_before, fallback_expected)
