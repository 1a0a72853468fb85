"""moe_dense_to_sparse: a dense mixture becomes top-k dispatch; through the pipeline
(built-in spec moe-top2) against ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.passes.moe.form import recognize
from kiln.passes.moe.moe_dense_to_sparse import MoeDenseToSparse, MoeDenseToSparseConfig
from tests.passes.moe.conftest import load, run

#: top-k over all E experts, renormalized, is the dense mixture itself
FLOAT_TOL = 1e-5


def test_rewrites_to_topk_dispatch(moe_files):
    model = load(moe_files["dense"])
    p = MoeDenseToSparse()
    assert p(model).modified
    assert "top-2 sparse dispatch" in p.last_candidates[0].label
    [(_, layer)] = recognize(model)
    assert layer.k == 2 and layer.renormalize and layer.dispatch == "per-expert"
    ops = [n.op_type for n in model.graph]
    assert ops.count("NonZero") == 4 and ops.count("ScatterND") == 4 and "TopK" in ops


def test_k_equal_to_experts_is_exact(moe_files):
    model = load(moe_files["dense"])
    reference = run(model)
    MoeDenseToSparse(MoeDenseToSparseConfig(k=4))(model)
    np.testing.assert_allclose(run(model), reference, atol=FLOAT_TOL, rtol=FLOAT_TOL)


def test_refuses_sparse_layer_and_is_idempotent(moe_files):
    model = load(moe_files["sparse"])
    p = MoeDenseToSparse()
    assert not p(model).modified
    assert p.last_candidates[0].reason == "already top-2"


def test_config_rejects_k_zero():
    with pytest.raises(ValueError, match="k"):
        MoeDenseToSparseConfig(k=0)


def test_moe_top2_spec_end_to_end(moe_files, tmp_path):
    """kiln compile --spec moe-top2: the dense mixture becomes top-2; the written model runs
    in ONNX Runtime and matches the pass's math (top-2 renormalized)."""
    from kiln.compiler.driver.cli import main

    out = tmp_path / "out"
    code = main(["compile", str(moe_files["dense"]), "--spec", "moe-top2", "--input",
                 "x=13x16", "-o", str(out)])
    assert code in (0, None)
    compiled = load(out / "model.onnx")
    [(_, layer)] = recognize(compiled)
    assert layer.k == 2
    expected = load(moe_files["dense"])
    MoeDenseToSparse()(expected)
    np.testing.assert_allclose(run(compiled), run(expected), atol=FLOAT_TOL)


def test_moe_top2_builds_for_host_with_tvm(moe_files, tmp_path):
    """The emitted sparse dispatch (NonZero, GatherND, ScatterND per expert) goes through
    the generic TVM import and matches ONNX Runtime (the driver's compiled check)."""
    pytest.importorskip("tvm")
    from kiln.compiler.driver.compile import compile_to_folder

    result = compile_to_folder(moe_files["dense"], "moe-top2", tmp_path / "out",
                               input_shapes={"x": [8, 16]}, target="host")
    compiled = result.report.compiled
    assert compiled is not None and (tmp_path / "out" / "model.so").exists()
    assert compiled.sqnr_db > 100


def test_moe_top2_builds_a_mixtral_export_as_grouped_dispatch(moe_files, tmp_path):
    """A Mixtral-style torch export (its own top-2 loop) through ``--spec moe-top2`` for host:
    moe_router writes it in kiln's dispatch form, so the build lowers it to the grouped
    dispatch kernels and matches ONNX Runtime (the loop as exported failed in TVM's import)."""
    pytest.importorskip("tvm")
    import onnx

    from kiln.backends.tvm.importer.moe_dispatch import find_dispatch_layers
    from kiln.compiler.driver.compile import compile_to_folder

    out = tmp_path / "out"
    result = compile_to_folder(moe_files["sparse"], "moe-top2", out,
                               input_shapes={"x": [13, 16]}, target="host")
    compiled = result.report.compiled
    assert compiled is not None and compiled.sqnr_db > 100
    [layer] = find_dispatch_layers(onnx.load(str(out / "model.onnx")))
    assert len(layer.experts) == 4
