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
