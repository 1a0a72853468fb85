"""LSTM / GRU / RNN lowered by kiln (importer.recurrent): directions, initial states,
sequence lengths, activations, clip, linear_before_reset and both layouts, each built for
the host and compared with ONNX Runtime on random weights."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.tvm import build_artifact, load, lower_to_relax
from kiln.backends.tvm.importer.recurrent import RecurrentAttributeError, parse_activations
from kiln.compiler.core.errors import LoweringError
from kiln.compiler.core.metrics import relative_error
from kiln.compiler.testing.onnx_models import to_ir
from kiln.compiler.testing.reference import REL_TOL, ort_outputs

#: Gates per op, and how many state outputs (Y_h, Y_c) it has.
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
STATES = {"LSTM": 2, "GRU": 1, "RNN": 1}


def recurrent_model(op: str, *, steps=5, batch=2, inputs=3, hidden=4, direction="forward",
                    bias=True, initial=False, lengths=None, lengths_input=False,
                    peepholes=False, opset=14, seed=0, **attrs) -> onnx.ModelProto:
    """One ``op`` node with random constant weights; outputs Y, Y_h (and Y_c)."""
    rng = np.random.default_rng(seed)
    dirs = 2 if direction == "bidirectional" else 1
    gates = GATES[op]

    def weight(name, shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.5).astype(np.float32), name)

    inits = [weight("W", (dirs, gates * hidden, inputs)), weight("R", (dirs, gates * hidden, hidden))]
    names = ["X", "W", "R", ""]
    if bias:
        inits.append(weight("B", (dirs, 2 * gates * hidden)))
        names[3] = "B"
    graph_inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [steps, batch, inputs])]
    names.append("")
    if lengths is not None:
        names[4] = "L"
        if lengths_input:
            graph_inputs.append(helper.make_tensor_value_info("L", TensorProto.INT32, [batch]))
        else:
            inits.append(numpy_helper.from_array(np.array(lengths, np.int32), "L"))
    state_shape = (dirs, batch, hidden)
    if initial:
        names.append("H0")
        inits.append(weight("H0", state_shape))
        if op == "LSTM":
            names.append("C0")
            inits.append(weight("C0", state_shape))
    if peepholes:
        names += [""] * (7 - len(names)) + ["P"]
        inits.append(weight("P", (dirs, 3 * hidden)))
    while names and names[-1] == "":
        names.pop()
    outputs = ["Y", "Y_h", "Y_c"][:1 + STATES[op]]
    node = helper.make_node(op, names, outputs, hidden_size=hidden, direction=direction, **attrs)
    graph = helper.make_graph(
        [node], "rec", graph_inputs,
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(model)


def feeds_for(model: onnx.ModelProto, lengths=None, seed=1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        if value.name == "L":
            feeds["L"] = np.array(lengths, np.int32)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def batch_first(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (layout 0) with ``layout=1``: X, initial states and outputs batch-major.

    ONNX Runtime runs only layout 0, so a layout-1 model is checked against this one's
    source with the inputs and outputs transposed (:func:`check_against_ort`).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    (node,) = out.graph.node
    node.attribute.append(helper.make_attribute("layout", 1))
    for init in out.graph.initializer:
        if init.name in ("H0", "C0"):
            init.CopyFrom(numpy_helper.from_array(
                np.ascontiguousarray(numpy_helper.to_array(init).transpose(1, 0, 2)), init.name))
    dims = out.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_value, dims[1].dim_value = dims[1].dim_value, dims[0].dim_value
    del out.graph.value_info[:]
    for value in out.graph.output:
        value.type.tensor_type.ClearField("shape")
    return onnx.shape_inference.infer_shapes(out)


def check_against_ort(model, feeds, tmp_path, tol=REL_TOL, layout=0):
    """Build for the host, run, and compare every output with ONNX Runtime
    (``layout=1``: kiln builds :func:`batch_first` of ``model``)."""
    built, run_feeds = model, feeds
    if layout:
        built = batch_first(model)
        run_feeds = {**feeds, "X": np.ascontiguousarray(feeds["X"].transpose(1, 0, 2))}
    result = build_artifact(to_ir(built), "host", tmp_path, model_hash="sha256:test")
    got = load(tmp_path)(**run_feeds)
    got = list(got) if isinstance(got, (list, tuple)) else [got]
    want = ort_outputs(model, feeds)
    if layout:
        want = [w.transpose(2, 0, 1, 3) if w.ndim == 4 else w.transpose(1, 0, 2) for w in want]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert relative_error(g, w) < tol, relative_error(g, w)
    return result


#: One-direction cases run in the slow suite: a bidirectional node runs both code paths.
SLOW = pytest.mark.slow


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("direction", [pytest.param("forward", marks=SLOW),
                                       pytest.param("reverse", marks=SLOW), "bidirectional"])
def test_directions_match_ort(op, direction, tmp_path):
    model = recurrent_model(op, direction=direction, initial=direction != "forward")
    result = check_against_ort(model, feeds_for(model), tmp_path)
    # the per-step GEMVs and the input projection are kiln's contraction kernels
    assert any("contraction" in rule for rule in result.rules.values()), result.rules


@pytest.mark.parametrize("op, attrs", [
    pytest.param("LSTM", {"clip": 0.5}, marks=SLOW),
    pytest.param("LSTM", {"input_forget": 1}, marks=SLOW),
    ("LSTM", {"peepholes": True, "initial": True, "clip": 0.5}),
    ("LSTM", {"bias": False, "layout": 1, "initial": True}),
    pytest.param("LSTM", {"activations": ["HardSigmoid", "Relu", "Softsign"],
                          "activation_alpha": [0.3], "activation_beta": [0.4]}, marks=SLOW),
    pytest.param("GRU", {"linear_before_reset": 1, "initial": True}, marks=SLOW),
    ("GRU", {"linear_before_reset": 1, "direction": "bidirectional", "layout": 1}),
    ("GRU", {"clip": 0.3, "activations": ["Sigmoid", "LeakyRelu"], "activation_alpha": [0.2]}),
    ("RNN", {"activations": ["Relu", "Affine"], "activation_alpha": [0.7],
             "activation_beta": [0.1], "direction": "bidirectional"}),
    pytest.param("RNN", {"activations": ["ScaledTanh"], "activation_alpha": [1.5],
                         "activation_beta": [0.5]}, marks=SLOW),
], ids=["lstm-clip", "lstm-input-forget", "lstm-peepholes-clip", "lstm-layout1-nobias",
        "lstm-activations", "gru-lbr", "gru-lbr-bidir-layout1", "gru-clip-leaky",
        "rnn-relu-affine-bidir", "rnn-scaledtanh"])
def test_attributes_match_ort(op, attrs, tmp_path):
    attrs = dict(attrs)
    layout = attrs.pop("layout", 0)
    model = recurrent_model(op, seed=3, **attrs)
    check_against_ort(model, feeds_for(model), tmp_path, layout=layout)


@pytest.mark.parametrize("op, as_input", [("LSTM", True), ("GRU", False),
                                           pytest.param("LSTM", False, marks=SLOW),
                                           pytest.param("GRU", True, marks=SLOW)])
def test_sequence_lengths_match_ort(op, as_input, tmp_path):
    """Shorter sequences keep their state and write zeros past their end, both ways."""
    lengths = [5, 2, 3]
    model = recurrent_model(op, batch=3, direction="bidirectional", initial=True,
                            lengths=lengths, lengths_input=as_input)
    check_against_ort(model, feeds_for(model, lengths), tmp_path)


@pytest.mark.parametrize("op", ["LSTM", pytest.param("GRU", marks=SLOW),
                                pytest.param("RNN", marks=SLOW)])
def test_a_single_step_matches_ort(op, tmp_path):
    model = recurrent_model(op, steps=1, batch=3, direction="bidirectional")
    check_against_ort(model, feeds_for(model), tmp_path)


def test_shapes_and_only_y_h_used(tmp_path):
    """A longer sequence with a wider state; only Y_h is a graph output (Y unused)."""
    model = recurrent_model("LSTM", steps=12, batch=1, inputs=16, hidden=32)
    del model.graph.output[0]
    del model.graph.output[1:]
    check_against_ort(model, feeds_for(model), tmp_path)


def test_activation_parameters_are_consumed_in_order():
    acts = parse_activations({"activations": [b"Affine", b"Tanh", b"LeakyRelu"],
                              "activation_alpha": [2.0, 0.3], "activation_beta": [0.5]},
                             ["Sigmoid", "Tanh", "Tanh"], 1)
    assert [(a.name, a.alpha, a.beta) for a in acts[0]] == [
        ("affine", 2.0, 0.5), ("tanh", 0.0, 0.0), ("leakyrelu", 0.3, 0.0)]
    with pytest.raises(RecurrentAttributeError, match="expected 6"):
        parse_activations({"activations": [b"Tanh"]}, ["Sigmoid", "Tanh", "Tanh"], 2)


def test_unknown_activation_is_a_clean_error():
    model = recurrent_model("RNN", activations=["Gelu"])
    with pytest.raises(LoweringError, match=r"RNN .*unsupported activation 'Gelu'"):
        lower_to_relax(to_ir(model))
