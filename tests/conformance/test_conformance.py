"""ONNX's backend conformance suite through kiln (issue 16.1).

The default run compiles a fast subset (one or two cases of many ops, and the cases of
each crash/wrong-result fix); the whole suite (every node and model test, ~2000 cases)
runs with KILN_SLOW=1 and must have no crash and no wrong result among the cases ONNX
Runtime passes. Cases are generated from the onnx wheel on first use and cached
(``kiln.compiler.testing.conformance.cases``).
"""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.compiler.testing.conformance import run_cases, select, summarize
from kiln.compiler.testing.conformance.cases import Case

#: one case per op family, fast to build; plus the cases of each fix (comment)
FAST_CASES = [
    "test_abs", "test_add_uint32", "test_and2d", "test_argmax_no_keepdims_example",
    "test_averagepool_2d_strides", "test_batchnorm_epsilon", "test_cast_DOUBLE_to_FLOAT",
    "test_concat_2d_axis_1", "test_conv_with_strides_no_padding", "test_convtranspose_1d",
    "test_depthtospace_example", "test_einsum_transpose", "test_erf", "test_flatten_axis0",
    "test_gather_negative_indices", "test_gathernd_example_float32",
    "test_gemm_default_scalar_bias", "test_globalaveragepool_precomputed",
    "test_group_normalization_epsilon", "test_gru_reverse", "test_hardmax_one_hot",
    "test_instancenorm_example", "test_lrn", "test_lstm_reverse", "test_matmul_1d_1d",
    "test_matmulinteger", "test_maxpool_2d_ceil_output_size_reduce_by_one",
    "test_mvn", "test_prelu_broadcast", "test_scatternd_multiply", "test_shrink_hard",
    "test_softmax_negative_axis", "test_split_2d_uneven_split_opset18",
    "test_spacetodepth", "test_transpose_all_permutations_5", "test_triu",
    "test_where_example", "test_Conv2d_depthwise_strided", "test_PixelShuffle",
    "test_operator_reduced_mean_keepdim", "test_single_relu_model",
    "test_clip_example",                        # 0-d inputs stay 0-d in the runtime
    "test_nonzero_example", "test_tile",        # output shapes Relax leaves open
    "test_gather_elements_1",                   # indices drawn within the dimension
    "test_log", "test_sqrt_example",            # NaN on random inputs is not a refusal
    "test_isinf_negative",                      # detect_positive=0 (was wrong)
    "test_mod_float_edge_cases_fmod_0_float32",  # fmod=0 by inf (was wrong)
    "test_bitshift_right_int8_shift_ge_width",  # shift >= width (was wrong)
    "test_expand_dim_changed",                  # runtime shape [2,1,6] (was wrong)
    "test_reduce_sum_keepdims_example",         # axes from an input (was refused)
    "test_layer_normalization_4d_axis1",        # Mean/InvStdDev keep their shape
    "test_sce_mean_weight_ii_3d",               # a loss expanded by its ONNX function
    "test_center_crop_pad_crop_axes_chw",       # the same, its shape input fixed
    "test_resize_downsample_sizes_nearest_not_larger",  # runtime sizes (were refused)
    "test_split_variable_parts_2d_opset18",     # runtime split parts (were refused)
    "test_reduce_l2_keep_dims_random_expanded",  # axes behind a Sqrt (were refused)
    "test_reduce_sum_do_not_keepdims_random",   # axis 1 or 2: picked at run time
    "test_l2normalization_axis_0",              # LpNormalization, a zero norm
    "test_pow_types_int64_int64",               # integer Pow (was refused)
    "test_batchnorm_example_training_mode",     # batch statistics (were ignored)
    "test_tril_zero",                           # an empty output (TVM failed on it)
    "test_resize_downsample_scales_cubic_A_n0p5_exclude_outside",  # runtime scales
    "test_resize_upsample_scales_nearest_axes_3_2",  # the same, over axes (were refused)
    "test_nonmaxsuppression_limit_output_size",  # runtime limit/thresholds (were refused)
    "test_constant_pad_axes", "test_reflect_pad",  # runtime pads / axes (were refused)
    "test_hannwindow_expanded",                 # size read through Range: probed
    "test_center_crop_pad_crop_and_pad_expanded",  # the same, a crop's shape (were refused)
    "test_affine_grid_2d_expanded",             # the same, its size Split folded (refused)
    "test_convtranspose_output_shape",          # output_shape as pads (was refused)
    "test_dynamicquantizelinear_expanded",      # a folded scalar stays 0-d (was refused)
    "test_maxpool_with_argmax_2d_precomputed_strides",  # Indices output (was refused)
    "test_lstm_with_peepholes",                 # sequence_lens drawn in 1..T (was refused)
    "test_resize_tf_crop_and_resize_axes_2_3",  # runtime roi over axes (was refused)
    "test_rotary_embedding_3d_input",           # i % 8 selects at 16 lanes (was refused)
]


def test_fast_subset_passes():
    cases = select(names=FAST_CASES)
    outcomes = run_cases(cases, jobs=2)
    failed = [f"{o.name}: {o.outcome}: {o.reason}" for o in outcomes if o.outcome != "pass"]
    assert not failed, "\n".join(failed)
    assert len({c.op for c in cases}) >= 40


def _case(tmp_path, name, model: onnx.ModelProto, inputs, outputs) -> Case:
    folder = tmp_path / name
    data = folder / "test_data_set_0"
    data.mkdir(parents=True)
    onnx.save(model, folder / "model.onnx")
    for j, array in enumerate(inputs):
        (data / f"input_{j}.pb").write_bytes(numpy_helper.from_array(array).SerializeToString())
    for j, array in enumerate(outputs):
        (data / f"output_{j}.pb").write_bytes(numpy_helper.from_array(array).SerializeToString())
    return Case(name=name, kind="node", op=model.graph.node[0].op_type, directory=str(folder),
                opset=model.opset_import[0].version, domains=(), input_types=("float32",),
                output_types=("float32",))


def _relu(domain=""):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], domain=domain)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets)


def test_outcomes_are_classified_wrong_refused_and_hang(tmp_path):
    import numpy as np

    x = np.array([-1.0, 0.5, 2.0], np.float32)
    wrong = _case(tmp_path, "wrong_relu", _relu(), [x], [x])              # relu(-1) != -1
    refused = _case(tmp_path, "custom_op", _relu("com.example"), [x], [x])
    slow = _case(tmp_path, "hang", _relu(), [x], [np.maximum(x, 0)])
    by_name = {o.name: o for o in run_cases([wrong, refused], jobs=2)}
    assert by_name["wrong_relu"].outcome == "wrong"
    assert "values differ" in by_name["wrong_relu"].reason
    assert by_name["custom_op"].outcome == "refused" and by_name["custom_op"].reason
    (hang,) = run_cases([slow], jobs=1, timeout=0.01)
    assert hang.outcome == "crash" and hang.reason.startswith("hang")


def test_a_worker_killed_by_a_signal_is_a_crash_and_the_run_goes_on(tmp_path, monkeypatch):
    import numpy as np

    x = np.array([-1.0, 0.5, 2.0], np.float32)
    dies = _case(tmp_path, "dies", _relu(), [x], [np.maximum(x, 0)])
    lives = _case(tmp_path, "lives", _relu(), [x], [np.maximum(x, 0)])
    monkeypatch.setenv("KILN_CONFORMANCE_SIGNAL_ON", "dies")
    first, second = run_cases([dies, lives], jobs=1)
    assert first.outcome == "crash" and "SIGSEGV" in first.reason
    assert second.outcome == "pass"


def test_outcomes_name_the_kernels_left_unscheduled(monkeypatch):
    """A case's outcome records the build's kernels left at TVM's default schedule (the
    compile report's ``unscheduled``): TopK's kernel (kiln's heap kernel, ``kiln_topk``) when
    the rule for IR-builder kernels is left out, none with every rule (tests/backends/tvm/schedules hold each
    rule's own conformance cases to none)."""
    from kiln.backends.tvm.schedules import registry
    from kiln.compiler.testing.conformance import run_in_process

    (case,) = select(names=["test_top_k"])
    assert run_in_process(case).unscheduled == []
    without = tuple(rule for rule in registry.RULES if rule.name != "ir_builder")
    monkeypatch.setattr(registry.schedule_primfunc, "__defaults__", (without,))
    outcome = run_in_process(case)
    assert outcome.outcome == "pass" and outcome.unscheduled == ["kiln_topk"]


@pytest.mark.slow
def test_whole_suite_has_no_crash_and_no_wrong_result():
    outcomes = run_cases(select(kinds=["node", "simple", "pytorch-converted",
                                       "pytorch-operator", "light"]), jobs=2, timeout=600)
    # the goal: no crash and no wrong result among the cases ONNX Runtime passes
    # (opset <= 21 and any opset); float16/bfloat16 (the extended figure) is reported only:
    # a crash there still fails, a one-ulp float16 difference in an _expanded graph does not
    bad = [f"{o.name}: {o.outcome}: {o.reason}" for o in outcomes
           if o.ort == "pass" and (o.outcome == "crash" and o.figures or o.outcome == "wrong"
                                   and {"headline", "all-opsets"} & set(o.figures))]
    assert not bad, "\n".join(bad)
    # docs/op-coverage.md: 97.7% (headline) and 97.2% (the filter): the full run
    # at 49fce85 (97.5%, 96.8%) with the cases fixed since rerun; the goal is 95%
    for figure in ("headline", "all-opsets"):
        counts = summarize(outcomes, figure)
        assert counts["pass"] >= 0.95 * counts["total"], (figure, counts)


def test_failures_name_each_case_that_does_not_pass():
    from kiln.compiler.testing.conformance import failures

    assert failures(["test_abs"]) == []
    with pytest.raises(ValueError, match="test_no_such_case"):
        failures(["test_abs", "test_no_such_case"])
