"""Resize with scales computed at run time (importer.resize_scales): one build for the
declared output shape, run with the scales a graph input feeds, against ONNX Runtime for
each coordinate mode, rounding, kernel, exclude_outside and antialias; scales that give
the same output size (1.2 on a size-4 axis) still move the samples (onnx's reference);
refused without a declared output shape."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from kiln.backends.tvm import build_artifact, load, lower_to_relax
from kiln.backends.tvm.importer.resize_scales import (
    OUTPUT_SHAPE_ATTR,
    annotate_runtime_scales,
    tap_offsets,
)
from kiln.compiler.core.errors import LoweringError
from kiln.compiler.core.metrics import relative_error
from kiln.compiler.testing.onnx_models import to_ir
from kiln.compiler.testing.reference import ort_outputs

#: Max |kiln - ORT| relative to max |ORT| (float32 weights, another summation order).
RESIZE_REL_TOL = 1e-5
SHAPE = [1, 2, 4, 5]
#: (output name, attributes, scales [H, W]) of the Resize nodes of the one model
NODES = [
    ("nearest_floor", {"mode": "nearest", "nearest_mode": "floor"}, [2.0, 1.5]),
    ("nearest_prefer_ceil", {"mode": "nearest", "nearest_mode": "round_prefer_ceil",
                             "coordinate_transformation_mode": "asymmetric"}, [1.5, 0.6]),
    ("linear_half_pixel", {"mode": "linear"}, [0.5, 1.8]),
    ("linear_pytorch", {"mode": "linear",
                        "coordinate_transformation_mode": "pytorch_half_pixel"}, [0.25, 2.0]),
    ("linear_symmetric", {"mode": "linear",
                          "coordinate_transformation_mode": "half_pixel_symmetric"},
     [1.5, 0.8]),
    ("cubic_exclude", {"mode": "cubic", "cubic_coeff_a": -0.5, "exclude_outside": 1},
     [0.75, 1.6]),
    ("cubic_align", {"mode": "cubic", "coordinate_transformation_mode": "align_corners"},
     [2.0, 0.6]),
    ("linear_antialias", {"mode": "linear", "antialias": 1}, [0.5, 0.6]),
    ("cubic_antialias", {"mode": "cubic", "antialias": 1}, [0.75, 0.4]),
]


def _out_shape(scales):
    return SHAPE[:2] + [int(np.floor(np.float32(n) * np.float32(s)))
                        for n, s in zip(SHAPE[2:], scales)]


def runtime_scales_model(nodes=NODES, declared=True) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)]
    graph_nodes, outputs = [], []
    for name, attrs, scales in nodes:
        inputs.append(helper.make_tensor_value_info(f"s_{name}", TensorProto.FLOAT, [2]))
        graph_nodes.append(helper.make_node("Resize", ["x", "", f"s_{name}"], [name],
                                            name=name, axes=[2, 3], **attrs))
        outputs.append(helper.make_tensor_value_info(
            name, TensorProto.FLOAT, _out_shape(scales) if declared else None))
    graph = helper.make_graph(graph_nodes, "resize_scales", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_one_build_matches_ort_for_every_mode(tmp_path):
    model = runtime_scales_model()
    build_artifact(to_ir(model), "host", tmp_path, model_hash="sha256:test")
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    feeds = {"x": x, **{f"s_{name}": np.array(scales, np.float32)
                        for name, _, scales in NODES}}
    got = load(tmp_path)(**feeds)
    want = ort_outputs(model, feeds)
    for (name, _, _), g, w in zip(NODES, got, want):
        g = np.asarray(g)
        assert g.shape == w.shape, name
        assert relative_error(g, w) <= RESIZE_REL_TOL, name


def test_a_scale_that_keeps_the_size_still_moves_the_samples(tmp_path):
    """floor(4 * 1.2) = 4, floor(5 * 1.1) = 5, but x_orig = (x + 0.5) / 1.2 - 0.5: onnx's
    reference interpolates (ONNX Runtime copies the input when the sizes are unchanged, so
    the reference here is onnx's)."""
    from onnx.reference import ReferenceEvaluator

    model = runtime_scales_model([("same_size", {"mode": "linear"}, [1.2, 1.1])])
    build_artifact(to_ir(model), "host", tmp_path / "out", model_hash="sha256:test")
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    feeds = {"x": x, "s_same_size": np.array([1.2, 1.1], np.float32)}
    got = np.asarray(load(tmp_path / "out")(**feeds))
    want = ReferenceEvaluator(model).run(None, feeds)[0]
    assert relative_error(got.reshape(want.shape), want) <= RESIZE_REL_TOL
    assert not np.allclose(want, x)


def test_declared_output_shape_is_written_on_the_node_only_for_runtime_scales():
    model = runtime_scales_model(NODES[:1])
    assert annotate_runtime_scales(model) == 1
    (attr,) = [a for a in model.graph.node[0].attribute if a.name == OUTPUT_SHAPE_ATTR]
    assert list(attr.ints) == _out_shape(NODES[0][2])
    assert annotate_runtime_scales(model) == 0  # idempotent
    undeclared = runtime_scales_model(NODES[:1], declared=False)
    assert annotate_runtime_scales(undeclared) == 0


def test_without_a_declared_output_shape_runtime_scales_are_refused():
    model = runtime_scales_model(NODES[:1], declared=False)
    with pytest.raises(LoweringError, match=r"Resize \(node 'nearest_floor'\).*scales "
                                            r"computed at run time and no declared output"):
        lower_to_relax(to_ir(model))


def test_antialias_taps_cover_every_scale_the_output_size_allows():
    from kiln.backends.tvm.importer.resize import ResizeMode, offsets_and_kernel

    how = ResizeMode(mode="cubic", antialias=True)
    wide = tap_offsets(how, 10, 4)              # scale in [0.4, 0.5)
    for scale in (0.4, 0.45, 0.499):
        needed, _ = offsets_and_kernel(how, scale)
        assert set(needed) <= set(wide)
    assert list(tap_offsets(ResizeMode(mode="linear"), 4, 8)) == [0, 1]
