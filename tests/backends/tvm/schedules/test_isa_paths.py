"""Every CPU schedule rule on each x86 vector path this host can run: ``host`` (whatever
it is), ``x86-64-v3`` (AVX2 + FMA, 8 fp32 lanes: the path of an AVX2-only machine,
forced on an AVX-512 developer machine too) and ``x86-64-v4`` (AVX-512, 16 lanes).

Each case is built with the production CPU pipeline, the rule it is for must schedule
its kernel, and the result must match numpy (fp32 kernels) or ONNX Runtime (quantized
weights decoded in the kernel). A path whose ISA the host lacks is skipped, naming the
missing feature.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.target.codegen import target_has_features

from kiln.backends.tvm.importer import lower_to_relax
from kiln.backends.tvm.pipeline import relax_pipeline
from kiln.backends.tvm.schedules import RULES, schedule_rules_used
from kiln.backends.tvm.targets import host_arch, resolve_target
from kiln.compiler.core.metrics import relative_error
from kiln.compiler.testing import quant_models as models
from kiln.compiler.testing.reference import DECODE_REL_TOL, exact_reference
from kiln.passes.quant.quantize import Quantize, QuantizeConfig

from .relax_models import relax_module

# fp32 results may differ from numpy only by summation order.
RTOL = 1e-5
#: Target preset -> the CPU features its code needs.
PATHS = {"host": (), "x86-64-v3": ("avx2", "fma"), "x86-64-v4": ("avx512f", "avx512bw")}
INT4_G32 = {"dtype": "int4", "granularity": {"group": 32}}


def path_target(name: str):
    if name != "host" and host_arch() != "x86_64":
        pytest.skip(f"{name} is an x86-64 target; this host is {host_arch()}")
    host = resolve_target("host").tvm_target()
    missing = [f for f in PATHS[name] if not target_has_features(f, host)]
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(missing)} (needed to run {name} code)")
    return resolve_target(name)


def _rng():
    return np.random.default_rng(0)


def _compile(target, mod: tvm.IRModule):
    scheduled: list[tvm.IRModule] = []
    executable = tvm.compile(mod, target=target.tvm_target(),
                             relax_pipeline=relax_pipeline(target, None, scheduled.append))
    return relax.VirtualMachine(executable, tvm.cpu()), schedule_rules_used(scheduled[-1])


def _dense(rows: int = 8):
    x = _rng().standard_normal((rows, 64)).astype("float32")
    w = (_rng().standard_normal((64, 48)) / 8).astype("float32")
    b = _rng().standard_normal(48).astype("float32")

    def fn(bb, xv):
        y = bb.emit(relax.op.add(relax.op.matmul(xv, relax.const(w)), relax.const(b)))
        return bb.emit(relax.op.nn.relu(y))

    return fn, [x], np.maximum(x @ w + b, 0)


def _elementwise():
    x = _rng().standard_normal((4, 24, 32)).astype("float32")

    def fn(bb, xv):
        return bb.emit(relax.op.sigmoid(relax.op.permute_dims(xv, [0, 2, 1])))

    return fn, [x], 1 / (1 + np.exp(-x.transpose(0, 2, 1)))


def _window():
    """A depthwise 3x3 conv (NHWC after the CPU build's layout rewrite)."""
    x = _rng().standard_normal((1, 32, 10, 10)).astype("float32")
    w = _rng().standard_normal((32, 1, 3, 3)).astype("float32")
    pad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    want = np.zeros_like(x)
    for ry in range(3):
        for rx in range(3):
            want += pad[:, :, ry:ry + 10, rx:rx + 10] * w[None, :, 0, ry, rx, None, None]

    def fn(bb, xv):
        return bb.emit(relax.op.nn.conv2d(xv, relax.const(w), padding=1, groups=32))

    return fn, [x], want


def _reduction():
    x = _rng().standard_normal((16, 96)).astype("float32")
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return (lambda bb, xv: bb.emit(relax.op.nn.softmax(xv, axis=-1))), [x], \
        e / e.sum(axis=-1, keepdims=True)


def _inner_reduction():
    """A sum over every element: one row of vector partial sums."""
    x = _rng().standard_normal((8, 16)).astype("float32")
    return (lambda bb, xv: bb.emit(relax.op.sum(xv))), [x], np.array(x.sum(), "float32")


def _whole_reduction():
    """The variance of every element (two reductions over all axes)."""
    x = _rng().standard_normal((8, 16)).astype("float32")
    return (lambda bb, xv: bb.emit(relax.op.variance(xv, axis=None))), [x], \
        np.array(x.var(), "float32")


def _row_tables():
    """Per-row tap weights normalized by their sum, beside an index table (a runtime-scale
    Resize's kiln_resize_taps)."""
    from .test_row_tables import tap_tables

    fn, want = tap_tables(8, 10)
    return fn, [np.array([2.0], "float32")], want


def _ir_builder():
    """TOPI's ScatterND (IR-builder code) over a [64, 32, 16] tensor: the data copied in
    parallel, the updates added in order."""
    from .test_ir_builder import scatter_nd_add

    x = _rng().standard_normal((64, 32, 16)).astype("float32")
    fn, ref = scatter_nd_add(x.shape)
    return fn, [x], ref(x)


def _fallback():
    """A row sum computed beside a second, transposed output in one kernel: no rule but
    the fallback takes it."""
    from tvm import te

    x = _rng().standard_normal((8, 16)).astype("float32")

    def two_outputs(a):
        k = te.reduce_axis((0, 16), "k")
        sums = te.compute((8,), lambda i: te.sum(a[i, k], axis=k), name="sums")
        return [te.compute((16, 8), lambda j, i: a[i, j] * 2, name="twice"),
                te.compute((8,), lambda i: sums[i] + 1, name="plus_one")]

    def fn(bb, xv):
        return bb.emit(relax.TupleGetItem(bb.emit_te(two_outputs, xv), 1))

    return fn, [x], x.sum(axis=1) + 1


def _symbolic_dense():
    """A matmul + bias + ReLU whose row count is symbolic (``n``), run at 13 rows: no row
    tile divides them, so the last tile is guarded."""
    fn, inputs, want = _dense(rows=13)
    return fn, inputs, want, [tvm.tirx.Var("n", "int64"), 64]


FP32_CASES = {"contraction": _dense, "elementwise": _elementwise, "window": _window,
              "reduction": _reduction, "inner_reduction": _inner_reduction,
              "whole_reduction": _whole_reduction, "row_tables": _row_tables,
              "ir_builder": _ir_builder, "fallback": _fallback,
              "symbolic_contraction": _symbolic_dense}
#: Rules whose every-path check lives next to their kernel's own tests (named here).
ELSEWHERE = {"int8_pool": "test_int8_pool.py: the SPP pool on host, x86-64-v3, x86-64-v4",
             "int8_window": "test_int8_conv.py: depthwise cases on host, x86-64-v3, "
                            "x86-64-v4 against ORT"}


def _decode_contraction():
    model = models.mlp(d_in=128, hidden=128, d_out=64, batch=1)
    Quantize(QuantizeConfig(weights=INT4_G32))(model)
    return model


def _decode_conv():
    model = models.conv()
    Quantize(QuantizeConfig(weights={"dtype": "int8"}))(model)
    return model


def _sparse_dense():
    """90% of the 16x1 blocks zero: the build packs the weights for kiln's sparse kernel."""
    from kiln.compiler.testing.sparse_models import sparse_mlp

    return sparse_mlp((128, 128, 64), pattern="block", block=(16, 1), density=0.1)


def _int8_dense():
    """A QDQ MatMul+bias+Relu layer with a float output: integer dot products (exact) and a
    float epilogue, so it matches ORT as closely as a decoded weight does."""
    import onnx_ir as ir

    from .test_int8_dense import chain_model

    return ir.serde.deserialize_model(chain_model(m=8, out_q=False))


def _grouped_gemm():
    """A top-2 MoE layer (4 ReLU experts, 8 tokens) written by kiln's moe_dense_to_sparse:
    its dispatch's per-expert GEMMs (grouped_gemm) and per-expert counts (moe_sort)."""
    import tempfile
    from pathlib import Path

    import onnx
    import onnx_ir as ir

    from kiln.compiler.core.frontend import bind_inputs, fold_constants
    from kiln.compiler.testing.moe_models import DenseMoE, export
    from kiln.passes.moe.moe_dense_to_sparse import MoeDenseToSparse, MoeDenseToSparseConfig

    with tempfile.TemporaryDirectory() as tmp:
        path = export(DenseMoE(16, 32, 4, activation="relu"), Path(tmp) / "moe.onnx",
                      tokens=8, dim=16)
        model = ir.from_proto(onnx.load(str(path)))
    assert MoeDenseToSparse(MoeDenseToSparseConfig(k=2))(model).modified
    bind_inputs(model, {"x": [8, 16]})
    fold_constants(model)
    return model


#: Whole-model cases (weights packed or decoded in the kernel), checked against ORT.
QUANT_CASES = {"decode_contraction": _decode_contraction, "decode_conv": _decode_conv,
               "sparse_dense": _sparse_dense, "int8_dense": _int8_dense,
               "grouped_gemm": _grouped_gemm, "moe_sort": _grouped_gemm}


def test_every_rule_has_a_case_here():
    assert {rule.name for rule in RULES} == set(FP32_CASES) | set(QUANT_CASES) | set(ELSEWHERE)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("rule", list(FP32_CASES))
def test_fp32_rule_on_each_vector_path(rule, path):
    target = path_target(path)
    fn, inputs, want, *shapes = FP32_CASES[rule]()
    vm, rules = _compile(target, relax_module(fn, *inputs, shapes=shapes or None))
    assert rule in rules.values(), rules
    got = vm["main"](*[tvm.runtime.tensor(a) for a in inputs]).numpy()
    scale = max(float(np.abs(want).max()), 1e-6)
    assert float(np.abs(got - want).max()) / scale < RTOL


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("rule", list(QUANT_CASES))
def test_decode_rule_on_each_vector_path(rule, path):
    target = path_target(path)
    model = QUANT_CASES[rule]()
    vm, rules = _compile(target, lower_to_relax(model, target_name=target.name))
    assert rule in rules.values(), rules
    feeds = models.feeds(model)
    got = vm["main"](*[tvm.runtime.tensor(v) for v in feeds.values()]).numpy()
    assert relative_error(got, exact_reference(model, feeds)) < DECODE_REL_TOL


@pytest.mark.parametrize("preset, registers, accumulators", [
    ("x86-64-v3", 16, 12), ("x86-64-v4", 32, 25), ("arm64", 32, 25)])
def test_register_tile_fits_the_targets_registers(preset, registers, accumulators):
    """AVX2 has 16 vector registers, AVX-512 and NEON 32: the register tile's accumulator
    budget follows (a 4 x 4-vector AVX-512 tile on AVX2 would spill)."""
    from kiln.backends.tvm.schedules.rule import register_accumulators, vector_registers
    from kiln.backends.tvm.targets import resolve_target

    target = resolve_target(preset).tvm_target()
    assert vector_registers(target) == registers
    assert register_accumulators(target) == accumulators


def _guarded_dense():
    """13 rows: no 3..6-row tile divides them (AVX-512: 5 x 4 vectors, AVX2: 5 x 2)."""
    x = _rng().standard_normal((13, 64)).astype("float32")
    w = (_rng().standard_normal((64, 64)) / 8).astype("float32")
    return (lambda bb, xv: bb.emit(relax.op.matmul(xv, relax.const(w)))), [x], x @ w


def _guarded_conv():
    """A 1x1 conv on a 14x14 map (NHWC: rows of 14; AVX2: 5 x 2 vectors, the last tile 4)."""
    x = _rng().standard_normal((1, 32, 14, 14)).astype("float32")
    w = (_rng().standard_normal((32, 32, 1, 1)) / 6).astype("float32")
    want = np.einsum("nchw,oc->nohw", x, w[:, :, 0, 0])

    def fn(bb, xv):
        return bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(xv, relax.const(w))))

    return fn, [x], np.maximum(want, 0)


def _conv_7x7_wide():
    """A 3x3 conv on a 7x7 map whose weights outweigh its input: the column panels run
    outside the output rows (each panel reused by all 7 rows while cached)."""
    x = _rng().standard_normal((1, 64, 7, 7)).astype("float32")
    w = (_rng().standard_normal((128, 64, 3, 3)) / 24).astype("float32")
    pad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    want = np.zeros((1, 128, 7, 7), "float32")
    for ry in range(3):
        for rx in range(3):
            want += np.einsum("nchw,oc->nohw", pad[:, :, ry:ry + 7, rx:rx + 7], w[:, :, ry, rx])

    def fn(bb, xv):
        return bb.emit(relax.op.nn.conv2d(xv, relax.const(w), padding=1))

    return fn, [x], want


GUARDED_CASES = {"dense_13_rows": _guarded_dense, "conv_14x14": _guarded_conv,
                 "conv_7x7_wide": _conv_7x7_wide}
#: (rows M, columns N) of each case's contraction
GUARDED_SHAPES = {"dense_13_rows": (13, 64), "conv_14x14": (14, 32), "conv_7x7_wide": (7, 128)}


def guarded_row_split(mod) -> bool:
    """Whether a contraction kernel of ``mod`` has a guarded (predicated) row tile."""
    for func in mod.functions.values():
        if isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and \
                func.attrs.get("kiln.schedule_rule") == "contraction" and \
                "T.where" in func.script():
            return True
    return False


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", list(GUARDED_CASES))
def test_guarded_row_tile_on_each_vector_path(case, path):
    """Rows no 3..6-row tile divides get a tile whose last row block is guarded where the
    cost model prefers it (``dense.guarded_tile``); every path matches numpy."""
    from kiln.backends.tvm.schedules.dense import guarded_tile, narrower_tile, tile_columns, tile_rows
    from kiln.backends.tvm.schedules.rule import register_accumulators, vector_lanes_f32

    target = path_target(path)
    fn, inputs, want = GUARDED_CASES[case]()
    scheduled: list[tvm.IRModule] = []
    executable = tvm.compile(relax_module(fn, *inputs), target=target.tvm_target(),
                             relax_pipeline=relax_pipeline(target, None, scheduled.append))
    got = relax.VirtualMachine(executable, tvm.cpu())["main"](
        *[tvm.runtime.tensor(a) for a in inputs]).numpy()
    scale = max(float(np.abs(want).max()), 1e-6)
    assert float(np.abs(got - want).max()) / scale < RTOL
    # the schedule is guarded exactly when the rule's own tile choice says so
    tvm_target = target.tvm_target()
    lanes, acc = vector_lanes_f32(tvm_target), register_accumulators(tvm_target)
    m, n = GUARDED_SHAPES[case]
    nr, _ = tile_columns(n, lanes)
    mr = tile_rows(m, acc // (nr // lanes))
    if mr < 3:
        nr, mr = narrower_tile(n, m, nr, mr, lanes, acc)
    assert guarded_row_split(scheduled[-1]) == (guarded_tile(n, m, nr, mr, lanes, acc) is not None)
    if path == "x86-64-v3":  # AVX2: the 7 x 1-vector tile is latency-bound, both get guarded
        assert guarded_tile(n, m, nr, mr, lanes, acc) is not None


def test_guarded_tile_choices():
    """The cost model's picks (lanes, accumulators: AVX-512 16/25, AVX2 8/12)."""
    from kiln.backends.tvm.schedules.dense import guarded_tile

    assert guarded_tile(512, 14, 8, 7, 8, 12) == (16, 5)     # AVX2, 14 rows: 5+5+4
    assert guarded_tile(512, 7, 8, 7, 8, 12) == (16, 5)      # AVX2, 7 rows: 5+2 (not 7 x 1)
    assert guarded_tile(512, 56, 16, 4, 8, 12) is None       # AVX2: 4 x 2 (6 x 2 spills)
    assert guarded_tile(512, 7, 32, 7, 16, 25) is None       # AVX-512: 7 x 2 stays
    assert guarded_tile(512, 56, 64, 4, 16, 25) is None      # AVX-512: 4 x 4 stays
    assert guarded_tile(128, 128, 64, 4, 16, 25) is None
    assert guarded_tile(64, 13, 16, 13, 16, 25) == (64, 5)   # AVX-512, 13 rows: 5+5+3
    assert guarded_tile(64, 3, 64, 3, 16, 25) is None        # too few rows to split
    # a 3 x 4-vector AVX2 tile would need 12 + 4 + 1 = 17 of the 16 registers
    assert all(guarded_tile(512, m, 8, 7, 8, 12)[0] != 32 for m in (7, 14))


@pytest.mark.parametrize("path", ["x86-64-v3", "x86-64-v4"])
@pytest.mark.parametrize("k", [1, 3])
def test_rows_of_seven_fuse_into_pixels_on_avx2(path, k):
    """A conv on a 7x7 map: on AVX2 (12 accumulators) the image row's tiles (7 x 1, or 5
    rows and a latency-bound 2-row tail) cost more than a tile over the 49 fused pixels,
    so the accumulator is indexed by ``h * 7 + w``; AVX-512's 7 x 2 tile keeps the image
    rows. Both match numpy, the guarded tail's pixels included."""
    target = path_target(path)
    x = _rng().standard_normal((1, 64, 7, 7)).astype("float32")
    w = (_rng().standard_normal((128, 64, k, k)) / 24).astype("float32")
    pad = np.pad(x, ((0, 0), (0, 0), (k // 2, k // 2), (k // 2, k // 2)))
    want = np.zeros((1, 128, 7, 7), "float32")
    for ry in range(k):
        for rx in range(k):
            want += np.einsum("nchw,oc->nohw", pad[:, :, ry:ry + 7, rx:rx + 7], w[:, :, ry, rx])

    def fn(bb, xv):
        return bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(xv, relax.const(w), padding=k // 2)))

    scheduled: list[tvm.IRModule] = []
    executable = tvm.compile(relax_module(fn, x), target=target.tvm_target(),
                             relax_pipeline=relax_pipeline(target, None, scheduled.append))
    got = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    want = np.maximum(want, 0)
    assert float(np.abs(got - want).max()) / float(np.abs(want).max()) < RTOL
    conv = [f.script() for f in scheduled[-1].functions.values()
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None
            and f.attrs.get("kiln.schedule_rule") == "contraction"]
    assert len(conv) == 1
    fused = "T.int64(49), T.int64(128)))" in conv[0]  # the accumulator (on the stack)
    assert fused == (path == "x86-64-v3")
    assert ("T.where" in conv[0]) == fused  # 49 = 9 x 5 + 4: the last fused tile guarded
