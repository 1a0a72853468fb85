"""Frontends: ONNX files (with external data), .pt2 programs, MODULE:CALLABLE; input binding."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from kiln.compiler.core import graph as kir
from kiln.compiler.core.errors import FrontendError
from kiln.compiler.core.frontend import load_model, parse_input_binding
from kiln.compiler.testing.real_models import rapidocr_input_shape, rapidocr_model

EXAMPLE = "compiler/core/examples/tiny_cnn.onnx"


def _run(model, feeds):
    return ort.InferenceSession(kir.model_bytes(model),
                                providers=["CPUExecutionProvider"]).run(None, feeds)


def test_onnx_with_external_data(tmp_path):
    proto = onnx.load(EXAMPLE)
    onnx.save(proto, tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.data", size_threshold=0)
    assert (tmp_path / "m.data").exists()
    model = load_model(tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    expected = _run(load_model(EXAMPLE), {"x": x})
    np.testing.assert_array_equal(_run(model, {"x": x})[0], expected[0])


def test_pt2_and_callable_give_the_same_graph(tmp_path):
    import torch

    from kiln.compiler.testing.torch_models import cnn_with_batchnorm

    module, args = cnn_with_batchnorm()
    torch.export.save(torch.export.export(module, args), tmp_path / "m.pt2")
    from_pt2 = load_model(tmp_path / "m.pt2")
    from_callable = load_model("kiln.compiler.testing.torch_models:cnn_with_batchnorm")
    feeds = {kir.graph_inputs(from_pt2)[0].name: args[0].numpy()}
    with torch.no_grad():
        expected = module(*args).numpy()
    for model in (from_pt2, from_callable):
        np.testing.assert_allclose(_run(model, feeds)[0], expected, rtol=1e-4, atol=1e-5)
    assert any(kir.module_path(n) == "head" for n in from_callable.graph)


def test_python_file_callable(tmp_path):
    (tmp_path / "mine.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Linear(4, 2), (torch.ones(1, 4),)\n")
    model = load_model(f"{tmp_path}/mine.py:make")
    assert [n.op_type for n in model.graph] == ["Gemm"]


def test_binding_by_name_and_position_makes_shapes_static():
    path = rapidocr_model("cls")
    (name, shape), = rapidocr_input_shape("cls").items()
    by_name = load_model(path, input_shapes={name: shape})
    by_position = load_model(path, input_shapes={0: shape})
    for model in (by_name, by_position):
        assert kir.shape_list(kir.graph_inputs(model)[0]) == shape
        assert all(isinstance(d, int) for d in kir.shape_list(model.graph.outputs[0]))


def test_binding_errors():
    with pytest.raises(FrontendError, match="no input named 'y' \\(inputs: x\\)"):
        load_model(EXAMPLE, input_shapes={"y": [1, 3, 32, 32]})
    with pytest.raises(FrontendError, match="dim 2 is fixed at 32, got 30"):
        load_model(EXAMPLE, input_shapes={"x": [1, 3, 30, 32]})
    with pytest.raises(FrontendError, match="rank 4"):
        load_model(EXAMPLE, input_shapes={"x": [1, 3]})
    assert parse_input_binding("x=1x3x640x640") == ("x", [1, 3, 640, 640])
    for bad in ("x", "x=", "=1x2", "x=1xa", "x=0x3"):
        with pytest.raises(FrontendError):
            parse_input_binding(bad)


def test_does_not_fuse_what_passes_own():
    """Folding constants must leave BatchNorm and duplicate weights to the spec's passes."""
    model = load_model(EXAMPLE)
    assert [n.op_type for n in model.graph].count("BatchNormalization") == 1
    assert {"left.weight", "right.weight"} <= set(model.graph.initializers)
    assert isinstance(model, ir.Model)
