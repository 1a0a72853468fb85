"""CPU legalization of transcendental ops: sigmoid / SiLU / tanh built for the host use
the vectorizable polynomials (no scalar libm call left in the library) and match ONNX
Runtime over the whole float range, saturated tails included."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from kiln.backends.tvm import build_artifact, load

# Measured on x in [-20, 20] against float64: sigmoid 8e-8, tanh 2.2e-7 absolute; SiLU 1.2e-6
# (x * sigmoid, so it scales with |x|: the bound below is relative to max |y| when above 1).
ABS_TOL = 2e-6
SHAPE = [1, 8, 16, 16]


def _model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, SHAPE)
            for n in ("sigmoid", "silu", "tanh")]
    nodes = [helper.make_node("Sigmoid", ["x"], ["sigmoid"]),
             helper.make_node("Sigmoid", ["x"], ["s"]),
             helper.make_node("Mul", ["x", "s"], ["silu"]),
             helper.make_node("Tanh", ["x"], ["tanh"])]
    graph = helper.make_graph(nodes, "transcendental", [x], outs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _inputs() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.uniform(-12, 12, size=SHAPE).astype(np.float32)
    # saturated tails and values where fast_exp clamps its argument
    x.flat[:6] = [-100.0, -88.0, -30.0, 30.0, 88.0, 100.0]
    return x


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("transcendental")
    model = onnx_ir.serde.deserialize_model(_model())
    build_artifact(model, "host", outdir, model_hash="sha256:test",
                   inputs=[("x", SHAPE, "float32")])
    return outdir


def test_sigmoid_silu_tanh_match_onnxruntime(artifact):
    x = _inputs()
    session = ort.InferenceSession(_model().SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x})
    got = load(artifact)(x)
    for name, ref, out in zip(("sigmoid", "silu", "tanh"), expected, got, strict=True):
        assert np.all(np.isfinite(out)), name
        assert np.max(np.abs(out - ref)) < ABS_TOL * max(1.0, float(np.max(np.abs(ref)))), name


@pytest.mark.parametrize("op", ["sigmoid", "tanh", "exp"])
def test_legalized_without_a_transcendental_call(op):
    """The legalized kernel is plain arithmetic (which the elementwise rule vectorizes), not
    a per-element ``T.exp``/``T.sigmoid``/``T.tanh`` call."""
    import tvm
    from tvm import relax

    from kiln.backends.tvm.schedules.fast_math import cpu_legalize_map

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(SHAPE, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(getattr(relax.op, op)(x))
        bb.emit_func_output(y)
    legal = relax.transform.LegalizeOps(cpu_legalize_map())(bb.get())
    funcs = [f for _, f in legal.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(funcs) == 1
    text = funcs[0].script()
    assert not any(f"T.{name}(" in text for name in ("exp", "sigmoid", "tanh")), text


def _symbolic_softmax_kernel(rows: tuple):
    """The legalized softmax over the last axis of ``rows + (S,)``, S symbolic."""
    import tvm
    from tvm import relax, tirx

    from kiln.backends.tvm.schedules.fast_math import cpu_legalize_map

    seq = tirx.Var("S", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([*(seq if r == "S" else r for r in rows), seq], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.softmax(x, axis=-1))
        bb.emit_func_output(y)
    legal = relax.transform.LegalizeOps(cpu_legalize_map())(bb.get())
    (func,) = [f for _, f in legal.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    return func


@pytest.mark.parametrize("rows", [(1, 4, "S"), (1, "S"), ("S",), (4, 8)])
def test_symbolic_row_softmax_reduces_in_vector_partials(rows):
    """A softmax over a symbolic row (attention over a sequence) takes its max and sum as
    lane-wise partials over the row's full vectors (vector max / add per vector, in a
    local buffer), then the lanes and a serial tail: the row rule used to reduce each
    row serially (S=512 encoder softmax 1.87 ms -> 0.49 ms a call)."""
    from kiln.backends.tvm.schedules.elementwise import schedule_row_reduction
    from kiln.backends.tvm.schedules.rule import RuleContext
    from kiln.backends.tvm.targets import resolve_target

    ctx = RuleContext.create(resolve_target("host").tvm_target())
    sch = schedule_row_reduction(_symbolic_softmax_kernel(rows), ctx)
    assert sch is not None
    lines = sch.mod["main"].script().splitlines()
    for kind in ("max", "sum"):
        block = f'T.sblock("lane_partial_{kind}_update")'
        at = next(i for i, line in enumerate(lines) if block in line)
        assert "T.vectorized(" in lines[at - 1], "\n".join(lines[at - 3:at + 1])
        assert any(f"lane_partial_{kind}_local = " in line and 'scope="local"' in line
                   for line in lines)
    assert any("T.parallel(" in line for line in lines)  # rows in parallel, S/S not fused


def _softmax_model(rows: list) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [*rows, "S"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], "softmax",
                              [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("rows", [[1, 4, "S"], [1, 3]])
def test_symbolic_row_softmax_matches_onnxruntime(tmp_path, rows):
    """Max exact, the sum reassociated (16 lane partials, then the lanes and the tail):
    ORT's result to float32 tolerance at lengths with no full vector, one, one and a
    tail, and 64 vectors."""
    from kiln.compiler.driver.symbolic import load_with_symbols

    proto = _softmax_model(rows)
    path = tmp_path / "softmax.onnx"
    onnx.save(proto, path)
    model = load_with_symbols(str(path), {"x": [*rows[:-1], "S=2..1024", "S"] if rows[-1] == "S"
                                          else [*rows, "S=2..1024"]})
    built = build_artifact(model, "host", tmp_path / "out", model_hash="t")
    assert built.unscheduled == [] and built.rules["softmax"] == "reduction", built.rules
    compiled = load(tmp_path / "out")
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(5)
    for length in (2, 3, 15, 16, 17, 1024):
        shape = [length if r == "S" else r for r in rows] + [length]
        x = (rng.standard_normal(shape) * 4).astype(np.float32)
        x.flat[0] = 80.0  # a row whose max dominates: exp underflows elsewhere
        np.testing.assert_allclose(compiled(x)[0], session.run(None, {"x": x})[0],
                                   rtol=1e-5, atol=1e-6)


def test_symbolic_row_softmax_right_under_any_schedule():
    """A reduction over an empty loop never runs its init: with no full vector (S < 16)
    or no tail (S = 16, 32) the legalized softmax must not read that partial, also when
    no kiln rule schedules it (TVM's default loop nest here)."""
    import tvm

    from kiln.backends.tvm.targets import resolve_target

    func = _symbolic_softmax_kernel((4,))
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      target=resolve_target("host").tvm_target())
    rng = np.random.default_rng(6)
    for length in (3, 15, 16, 17, 32):
        x = rng.standard_normal((4, length)).astype(np.float32)
        expected = np.exp(x - x.max(-1, keepdims=True))
        expected /= expected.sum(-1, keepdims=True)
        out = tvm.runtime.tensor(np.full_like(x, np.nan))
        lib(tvm.runtime.tensor(x), out)
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)
