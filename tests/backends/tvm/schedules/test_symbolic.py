"""symbolic_contraction on 1x1 convolutions over a symbolic width (an OCR line): the rows
are padded to the row tile so the micro-kernel runs unguarded, the column panels go
outermost when they give enough parallel work, and results match ONNX Runtime at
widths no row tile divides."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.compiler.driver.symbolic import load_with_symbols

pytest.importorskip("tvm")

#: fp32 sums of up to 24 products, summed in another order than ORT's
TOLERANCE = 1e-4
#: widths that leave every row tile (4..8 rows) a tail, and one row alone
WIDTHS = (1, 7, 9, 37, 203)


def _conv1x1_model(path, cin: int, cout: int, height: int):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((cout, cin, 1, 1)) / np.sqrt(cin)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"]),
         helper.make_node("HardSwish", ["c"], ["y"])], "conv1x1",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, height, "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _conv1x1_prim_func(height: int, cin: int, cout: int):
    """The NHWC 1x1 conv as the CPU build sees it: C[0, h, w, o] = sum_k A[0, h, w, k] B[o, k]."""
    from tvm import te, tirx

    width = tirx.Var("W", "int64")
    a = te.placeholder((1, height, width, cin), name="a")
    b = te.placeholder((cout, cin), name="b")
    k = te.reduce_axis((0, cin), name="k")
    c = te.compute((1, height, width, cout),
                   lambda n, y, x, o: te.sum(a[n, y, x, k] * b[o, k], axis=k), name="c")
    return te.create_prim_func([a, b, c])


def _block_text(script: str, name: str) -> str:
    start = script.index(f'T.sblock("{name}")')
    end = script.find("T.sblock(", start + 1)
    return script[start:end if end > 0 else len(script)]


def _attention_model(path, *, batch: int, softmax: bool):
    """x [batch, S, 16] -> (softmax of) x x^T -> times x: attention over a symbolic S."""
    scores = "p" if softmax else "s"
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["x", "xt"], ["s"])]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["s"], ["p"], axis=-1))
    nodes.append(helper.make_node("MatMul", [scores, "x"], ["y"]))
    graph = helper.make_graph(
        nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, "S", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _matches_ort(compiled, path, batch: int, lengths, *, seed: int) -> None:
    session = ort.InferenceSession(str(path))
    rng = np.random.default_rng(seed)
    for length in lengths:
        x = (rng.standard_normal((batch, length, 16)) / 4).astype(np.float32)
        np.testing.assert_allclose(compiled(x)[0], session.run(None, {"x": x})[0],
                                   rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.parametrize("height, cout, panels_outer", [(1, 48, False), (4, 96, True)])
def test_symbolic_rows_padded_micro_kernel_unguarded(height, cout, panels_outer):
    from kiln.backends.tvm.schedules.rule import with_const_params
    from kiln.backends.tvm.schedules.symbolic import SymbolicContraction
    from kiln.backends.tvm.targets import resolve_target

    func = with_const_params(_conv1x1_prim_func(height, 24, cout), frozenset({1}))
    sch = SymbolicContraction().apply(func, resolve_target("host").tvm_target(), False)
    assert sch is not None
    script = sch.mod["main"].script()
    assert "a_pad" in script  # A's rows copied up to a whole row tile (zeros below)
    assert "T.where" not in _block_text(script, "c_update")  # no guard in the K loop
    # panels outermost: the parallel loop's extent is static (no symbolic W in it)
    head = script[:script.index('T.sblock("c_update")')]
    parallel = [line for line in head.splitlines() if "T.parallel(" in line][-1]
    assert ("W" not in parallel) == panels_outer, parallel


@pytest.mark.parametrize("height, cout", [(1, 48), (4, 96)])
def test_symbolic_1x1_conv_matches_ort(tmp_path, height, cout):
    from kiln.backends.tvm import build_artifact, load

    path = _conv1x1_model(tmp_path / "m.onnx", 24, cout, height)
    model = load_with_symbols(str(path), {"x": [1, 24, height, "W=1..256"]})
    built = build_artifact(model, "host", tmp_path / "out", model_hash="t")
    assert "symbolic_contraction" in built.rules.values() and built.unscheduled == [], \
        built.rules
    compiled = load(tmp_path / "out")
    session = ort.InferenceSession(str(path))
    rng = np.random.default_rng(1)
    for width in WIDTHS:
        x = rng.standard_normal((1, 24, height, width)).astype(np.float32)
        np.testing.assert_allclose(compiled(x)[0], session.run(None, {"x": x})[0],
                                   rtol=TOLERANCE, atol=TOLERANCE)


def test_symbolic_attention_matmuls_scheduled(tmp_path):
    """Self-attention's two matmuls over a symbolic sequence S (x x^T: rows and columns
    symbolic; its product with x: the reduction symbolic) get symbolic_contraction, none
    is left to the generic schedule, and results match ORT at lengths no tile divides."""
    from kiln.backends.tvm import build_artifact, load

    path = _attention_model(tmp_path / "a.onnx", batch=1, softmax=False)
    model = load_with_symbols(str(path), {"x": [1, "S=1..128", 16]})
    built = build_artifact(model, "host", tmp_path / "out", model_hash="t")
    assert built.unscheduled == [], built.rules
    assert list(built.rules.values()).count("symbolic_contraction") >= 2, built.rules
    _matches_ort(load(tmp_path / "out"), path, 1, (1, 7, 33, 70), seed=2)


def test_softmax_over_a_symbolic_row_gets_the_row_rule(tmp_path):
    """Attention's softmax over a symbolic sequence: kiln's row reduction (rows parallel,
    each row's max and sum serial in one pass), not dlight's generic rule; a build with it
    matches ORT at lengths no vector divides."""
    from tvm import te, tirx, topi

    from kiln.backends.tvm import build_artifact, load
    from kiln.backends.tvm.schedules.elementwise import schedule_row_reduction
    from kiln.backends.tvm.schedules.rule import RuleContext
    from kiln.backends.tvm.targets import resolve_target

    seq = tirx.Var("S", "int64")
    x = te.placeholder((4, seq, seq), name="x")
    func = te.create_prim_func([x, topi.nn.softmax(x, axis=-1)])
    ctx = RuleContext.create(resolve_target("host").tvm_target())
    assert schedule_row_reduction(func, ctx) is not None

    path = _attention_model(tmp_path / "a.onnx", batch=4, softmax=True)
    built = build_artifact(load_with_symbols(str(path), {"x": [4, "S=1..300", 16]}), "host",
                           tmp_path / "out", model_hash="t")
    assert built.unscheduled == [] and built.rules["softmax"] == "reduction", built.rules
    _matches_ort(load(tmp_path / "out"), path, 4, (1, 7, 33, 300), seed=3)


@pytest.mark.parametrize("vectors, accumulators, rows", [
    (4, 25, 4), (5, 25, 4), (2, 25, 8), (3, 25, 8), (1, 25, 8), (2, 12, 4), (4, 12, 2),
    (12, 12, 1)])
def test_symbolic_row_tile_is_a_power_of_two(vectors, accumulators, rows):
    """AVX-512's 25 accumulators over a 4-vector panel hold 6 rows; symbolic rows get 4
    (S=16 padded to 18 rows made the encoder's dense layers 12-16% slower than the fixed
    build's 4-row tile)."""
    from kiln.backends.tvm.schedules.symbolic import symbolic_row_tile

    assert symbolic_row_tile(vectors, accumulators) == rows


def _dense_residual_model(path, dim: int, hidden: int):
    """x [1, S, dim] -> x W + b + x (a transformer's projection and residual)."""
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((dim, hidden)) / np.sqrt(dim)).astype(np.float32)
    b = rng.standard_normal(hidden).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["c"]),
         helper.make_node("Add", ["c", "x"], ["y"])], "dense_residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_symbolic_dense_pads_rows_to_a_power_of_two_and_matches_ort(tmp_path):
    """The encoder's projection over a symbolic sequence: rows padded to a power-of-two
    tile (S=16 pads nothing), and results match ORT at lengths that leave a tail."""
    import re

    import tvm

    from kiln.backends.tvm import build_artifact, load
    from kiln.backends.tvm.importer import lower_to_relax
    from kiln.backends.tvm.pipeline import relax_pipeline
    from kiln.backends.tvm.targets import resolve_target

    path = _dense_residual_model(tmp_path / "d.onnx", 64, 64)
    model = load_with_symbols(str(path), {"x": [1, "S=2..1024", 64]})
    scheduled: list[tvm.IRModule] = []
    target = resolve_target("host")
    tvm.compile(lower_to_relax(model, target_name=target.name), target=target.tvm_target(),
                relax_pipeline=relax_pipeline(target, None, scheduled.append))
    scripts = [f.script() for gv, f in scheduled[-1].functions.items()
               if f.attrs and f.attrs.get("kiln.schedule_rule") == "symbolic_contraction"]
    assert scripts
    padded = r"\(S \+ T\.int64\(\d+\)\) // T\.int64\((\d+)\)"  # (S + 3) // 4 * 4
    tiles = {int(m) for script in scripts for m in re.findall(padded, script)}
    assert tiles and all(t & (t - 1) == 0 for t in tiles), tiles

    build_artifact(load_with_symbols(str(path), {"x": [1, "S=2..1024", 64]}), "host",
                   tmp_path / "out", model_hash="t")
    compiled = load(tmp_path / "out")
    session = ort.InferenceSession(str(path))
    rng = np.random.default_rng(5)
    for length in (2, 3, 15, 16, 17, 1024):
        x = rng.standard_normal((1, length, 64)).astype(np.float32)
        np.testing.assert_allclose(compiled(x)[0], session.run(None, {"x": x})[0],
                                   rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.parametrize("columns, nr, mr, lanes, accumulators, tile", [
    (768, 32, 2, 8, 12, (24, 4)),    # AVX2: 4 vectors x 2 rows -> the fixed build's 4 x 3
    (256, 16, 4, 8, 12, (16, 4)),    # AVX2, 2 vectors x 4 rows: kept
    (256, 64, 4, 16, 25, (64, 4)),   # AVX-512 4 x 4: kept
    (40, 40, 2, 8, 12, (40, 2))])    # 5 vectors, no narrower panel divides 40 with more
def test_narrower_symbolic_tile(columns, nr, mr, lanes, accumulators, tile):
    from kiln.backends.tvm.schedules.symbolic import narrower_symbolic_tile

    assert narrower_symbolic_tile(columns, nr, mr, lanes, accumulators) == tile


@pytest.mark.parametrize("path", ["host", "x86-64-v3"])
def test_symbolic_dense_tile_on_each_path(path):
    """A symbolic-row projection to 768 columns (the encoder's QKV): on AVX2 a 4 x 3 tile
    whose accumulators are a stack buffer (no "local" workspace per tile), on every path a
    power-of-two row tile, and numpy's result at sequence lengths that leave a tail."""
    import re

    import tvm
    from tvm import relax

    from kiln.backends.tvm.pipeline import relax_pipeline

    from .relax_models import relax_module
    from .test_isa_paths import RTOL, path_target

    target = path_target(path)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((17, 64)).astype("float32")
    w = (rng.standard_normal((64, 768)) / 8).astype("float32")

    def fn(bb, xv):
        return bb.emit(relax.op.matmul(xv, relax.const(w)))

    scheduled: list[tvm.IRModule] = []
    mod = relax_module(fn, x, shapes=[[tvm.tirx.Var("n", "int64"), 64]])
    executable = tvm.compile(mod, target=target.tvm_target(),
                             relax_pipeline=relax_pipeline(target, None, scheduled.append))
    kernel = next(f for f in scheduled[-1].functions.values()
                  if f.attrs and f.attrs.get("kiln.schedule_rule") == "symbolic_contraction")
    script = kernel.script()
    tiles = {int(t) for t in re.findall(r"\(n \+ T\.int64\(\d+\)\) // T\.int64\((\d+)\)", script)}
    assert tiles and all(t & (t - 1) == 0 for t in tiles), tiles
    if path == "x86-64-v3":
        assert tiles == {4} and 'scope="local"' not in script, script
    vm = relax.VirtualMachine(executable, tvm.cpu())
    for rows in (2, 3, 15, 16, 17):
        got = vm["main"](tvm.runtime.tensor(x[:rows])).numpy()
        want = x[:rows] @ w
        assert float(np.abs(got - want).max()) / float(np.abs(want).max()) < RTOL
