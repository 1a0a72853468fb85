"""Resize lowered by kiln (importer.resize): the tap tables against ONNX Runtime for every
mode (fast, numpy), and the built kernels for a few of them (host build vs ORT)."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from kiln.backends.tvm import build_artifact, load, lower_to_relax
from kiln.backends.tvm.importer.resize import (
    ResizeAttributeError,
    axis_taps,
    plan_resize,
    resize_mode,
)
from kiln.compiler.core.errors import LoweringError
from kiln.compiler.core.metrics import relative_error
from kiln.compiler.testing.onnx_models import to_ir
from kiln.compiler.testing.reference import ort_outputs

#: Max |kiln - ORT| relative to max |ORT| (float32 weights, a different summation order).
RESIZE_REL_TOL = 1e-5
COORDINATES = ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric",
               "half_pixel_symmetric", "tf_crop_and_resize"]
NEAREST = ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]


def resize_model(shape, *, opset=19, scales=None, sizes=None, roi=None, dtype=np.float32,
                 **attrs) -> onnx.ModelProto:
    """One Resize node on input ``x`` with constant roi/scales/sizes."""
    inits, names = [], ["x"]
    if opset < 11:
        inits.append(numpy_helper.from_array(np.array(scales, np.float32), "scales"))
        names.append("scales")
    else:
        empty = opset < 13
        for name, value, kind in (("roi", roi, np.float32), ("scales", scales, np.float32),
                                  ("sizes", sizes, np.int64)):
            if value is not None or (empty and name != "sizes"):
                array = np.array([] if value is None else value, kind)
                inits.append(numpy_helper.from_array(array, name))
                names.append(name)
            else:
                names.append("")
        while names[-1] == "":
            names.pop()
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        [helper.make_node("Resize", names, ["y"], name="resize", **attrs)], "resize",
        [helper.make_tensor_value_info("x", elem, list(shape))],
        [helper.make_tensor_value_info("y", elem, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(model)


def numpy_resize(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """kiln's resize computed in numpy from the same tap tables the kernels read."""
    opset = model.opset_import[0].version
    node = model.graph.node[0]
    attr = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}

    def given(name):
        value = inits.get(name)
        return None if value is None or value.size == 0 else value

    roi, scales, sizes = given("roi"), given("scales"), given("sizes")
    how = resize_mode(attr, opset)
    plan = plan_resize(list(x.shape), attr, opset, roi, scales, sizes)
    y = x
    for axis, p in enumerate(plan):
        if p is None:
            continue
        idx, w, inside = axis_taps(p, how)
        gathered = np.take(y, idx, axis=axis)           # [..., out, taps, ...]
        if w is None:
            y = np.squeeze(gathered, axis + 1)
        else:
            shape = [1] * gathered.ndim
            shape[axis], shape[axis + 1] = w.shape
            y = (gathered * w.reshape(shape)).sum(axis=axis + 1).astype(x.dtype)
        if inside is not None:
            shape = [1] * y.ndim
            shape[axis] = -1
            y = np.where(inside.reshape(shape), y, np.asarray(how.extrapolation, y.dtype))
    return y


def _cases():
    """(id, shape, kwargs) for the resize matrix."""
    cases = []
    up, down = {"sizes": [1, 2, 7, 9]}, {"scales": [1.0, 1.0, 0.6, 0.45]}
    for coord, nearest in itertools.product(COORDINATES, NEAREST):
        if coord == "tf_crop_and_resize":
            continue
        for name, size in (("up", up), ("down", down)):
            cases.append((f"nearest-{nearest}-{coord}-{name}", {
                "mode": "nearest", "nearest_mode": nearest,
                "coordinate_transformation_mode": coord, **size}))
    for coord in COORDINATES:
        extra = {"roi": [0, 0, 0.2, 0.1, 1, 1, 0.9, 1.2], "extrapolation_value": -3.0} \
            if coord == "tf_crop_and_resize" else {}
        for mode in ("linear", "cubic"):
            for name, size in (("up", up), ("down", down), ("frac", {"scales": [1, 1, 1.7, 2.3]})):
                cases.append((f"{mode}-{coord}-{name}", {
                    "mode": mode, "coordinate_transformation_mode": coord, **size, **extra}))
    for a, exclude in itertools.product((-0.5, -0.75), (0, 1)):
        for name, size in (("up", up), ("down", down)):
            cases.append((f"cubic-a{a}-exclude{exclude}-{name}", {
                "mode": "cubic", "cubic_coeff_a": a, "exclude_outside": exclude, **size}))
    for mode, size in itertools.product(("linear", "cubic"),
                                        ({"sizes": [1, 2, 3, 2]}, {"scales": [1, 1, 0.6, 0.3]})):
        cases.append((f"antialias-{mode}-{'sizes' if 'sizes' in size else 'scales'}",
                      {"mode": mode, "antialias": 1, **size}))
    cases += [
        ("axes-3-2-scales", {"axes": [3, 2], "scales": [2.0, 1.5], "mode": "linear"}),
        ("axes-2-3-sizes", {"axes": [2, 3], "sizes": [9, 3], "mode": "nearest"}),
        ("not-larger", {"keep_aspect_ratio_policy": "not_larger", "axes": [2, 3],
                        "sizes": [7, 7], "mode": "linear"}),
        ("not-smaller", {"keep_aspect_ratio_policy": "not_smaller", "axes": [2, 3],
                         "sizes": [7, 7], "mode": "nearest"}),
        ("channels-too", {"scales": [1, 2, 1.5, 1], "mode": "nearest"}),
        ("opset10-nearest-up", {"opset": 10, "scales": [1, 1, 2, 3], "mode": "nearest"}),
        ("opset10-nearest-down", {"opset": 10, "scales": [1, 1, 0.5, 0.6], "mode": "nearest"}),
        ("opset10-linear", {"opset": 10, "scales": [1, 1, 1.5, 2], "mode": "linear"}),
        ("opset11-linear", {"opset": 11, "scales": [1, 1, 2, 2], "mode": "linear",
                            "coordinate_transformation_mode": "align_corners"}),
        ("opset13-cubic-sizes", {"opset": 13, "sizes": [1, 2, 8, 3], "mode": "cubic"}),
    ]
    return cases


CASES = _cases()
SHAPE = (1, 2, 4, 5)


def _input(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("case", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_tap_tables_match_ort(case):
    model = resize_model(SHAPE, **case)
    x = _input(SHAPE)
    (want,) = ort_outputs(model, {"x": x})
    got = numpy_resize(model, x)
    assert got.shape == want.shape
    assert relative_error(got, want) < RESIZE_REL_TOL


BUILT = ["nearest-round_prefer_floor-half_pixel-up", "nearest-floor-asymmetric-down",
         "linear-half_pixel-frac", "cubic-a-0.5-exclude1-down", "linear-tf_crop_and_resize-up",
         "antialias-cubic-scales", "axes-3-2-scales", "opset10-nearest-down"]


@pytest.mark.parametrize("name", BUILT)
def test_built_resize_matches_ort(name, tmp_path):
    model = resize_model(SHAPE, **dict(CASES)[name])
    x = _input(SHAPE, 1)
    build_artifact(to_ir(model), "host", tmp_path, model_hash="sha256:test")
    got = load(tmp_path)(x=x)
    got = got[0] if isinstance(got, (list, tuple)) else got
    (want,) = ort_outputs(model, {"x": x})
    assert got.shape == want.shape
    assert relative_error(got, want) < RESIZE_REL_TOL


@pytest.mark.parametrize("case, layout_aware", [
    ({"scales": [1, 1, 2, 2], "mode": "nearest"}, True),               # an FPN upsample
    ({"sizes": [1, 2, 7, 9], "mode": "linear"}, True),
    ({"scales": [1, 1, 1.7, 2.3], "mode": "linear"}, False),           # out != scale * in
    ({"scales": [1, 1, 2, 2], "mode": "linear", "coordinate_transformation_mode":
      "half_pixel_symmetric"}, False),
    ({"scales": [1, 1, 0.5, 0.5], "mode": "linear", "antialias": 1}, False),
    ({"scales": [1, 2, 2, 2], "mode": "nearest"}, False),              # channels resized
])
def test_layout_aware_resize2d_only_where_it_computes_onnx(case, layout_aware):
    """TVM's ``image.resize2d`` (which ConvertLayout follows) where it is exact, kiln's
    gathers elsewhere."""
    script = lower_to_relax(to_ir(resize_model(SHAPE, **case))).script()
    assert ("R.image.resize2d" in script) == layout_aware
    assert ("kiln_resize" in script) != layout_aware


def test_nearest_on_integers_and_a_3d_input(tmp_path):
    model = resize_model((2, 3, 5), sizes=[2, 3, 12], mode="nearest", dtype=np.uint8,
                         coordinate_transformation_mode="asymmetric")
    x = np.arange(30, dtype=np.uint8).reshape(2, 3, 5)
    build_artifact(to_ir(model), "host", tmp_path, model_hash="sha256:test")
    got = load(tmp_path)(x=x)
    got = got[0] if isinstance(got, (list, tuple)) else got
    np.testing.assert_array_equal(got, ort_outputs(model, {"x": x})[0])


def test_bad_attributes_are_clean_errors():
    with pytest.raises(ResizeAttributeError, match="keep_aspect_ratio_policy='squash'"):
        plan_resize([1, 1, 4, 4], {"keep_aspect_ratio_policy": b"squash"}, 19, None, None,
                    np.array([1, 1, 8, 8]))
    model = resize_model(SHAPE, scales=[1, 1, 2, 2], mode="area")
    with pytest.raises(LoweringError, match=r"Resize \(node 'resize'\).*mode='area'"):
        lower_to_relax(to_ir(model))


def test_sizes_from_an_input_are_fixed_by_the_output_shape():
    from kiln.backends.tvm.importer.static_operands import resize_sizes

    assert resize_sizes([1, 1, 2, 2], [1, 1, 7, 8], [3, 2], "stretch") == [8, 7]
    # not_larger: the axis whose out/in reproduces every output dim sets the scale
    # (onnx's test: 1x1x2x2 -> sizes 7x8 -> 7x7); the other axis gets a size that cannot
    assert resize_sizes([1, 1, 2, 2], [1, 1, 7, 7], [2, 3], "not_larger") == [7, 14]
    assert resize_sizes([1, 1, 2, 2], [1, 1, 8, 8], [2, 3], "not_smaller") == [8, 1]
    assert resize_sizes([1, 1, 4, 4], [1, 1, 3, 5], [2, 3], "not_larger") is None  # no scale


@pytest.mark.slow  # its cases also run in tests/conformance' fast subset
def test_runtime_resize_sizes_and_scales_pass():
    from kiln.compiler.testing.conformance import run_cases, select

    names = ["test_resize_downsample_sizes_nearest_not_larger",
             "test_resize_upsample_scales_nearest"]
    outcomes = run_cases(select(names=names), jobs=2)
    assert [o.outcome for o in outcomes] == ["pass", "pass"], [o.reason for o in outcomes]


@pytest.mark.parametrize("axes", [[2, 3], [3, 2], [-1]])
def test_a_runtime_roi_over_axes_matches_ort(axes, tmp_path):
    # TVM's converter ignores axes: the roi and sizes over them were taken for every axis
    sizes = {2: 3, 3: 5, -1: 5}
    roi = {2: (0.4, 0.6), 3: (0.2, 0.9), -1: (0.2, 0.9)}
    graph = helper.make_graph(
        [helper.make_node("Resize", ["x", "roi", "", "sizes"], ["y"], axes=axes, mode="linear",
                          coordinate_transformation_mode="tf_crop_and_resize")], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 4, 6]),
         helper.make_tensor_value_info("roi", onnx.TensorProto.FLOAT, [2 * len(axes)])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([sizes[a] for a in axes], np.int64), "sizes")])
    model = onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]))
    feeds = {"x": _input([1, 2, 4, 6], 2),
             "roi": np.array([roi[a][0] for a in axes] + [roi[a][1] for a in axes], np.float32)}
    build_artifact(to_ir(model), "host", tmp_path, model_hash="sha256:test")
    got = load(tmp_path)(**feeds)
    got = got[0] if isinstance(got, (list, tuple)) else got
    (want,) = ort_outputs(model, feeds)
    assert got.shape == want.shape
    assert relative_error(got, want) < RESIZE_REL_TOL
