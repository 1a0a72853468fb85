"""check_pass holds a pass to its contract: an exact pass that changes outputs, or a lossy one
under its SQNR floor, fails with the output and the figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from kiln.compiler.core.pass_api import Candidate, KilnPass
from kiln.compiler.testing import quant_models
from kiln.compiler.testing.passcheck import check_pass, is_exact, seeded_inputs
from kiln.passes.reparam.fold_batchnorm import FoldBatchNorm

EXAMPLE = Path(__file__).resolve().parents[3] / "compiler" / "core" / "examples" / "tiny_cnn.onnx"


class _Perturb(KilnPass):
    """Scales every MatMul weight by (1 + eps): wrong for an exact pass."""

    name = "perturb"
    eps = 1e-2

    def candidates(self, model):
        return [Candidate(n, n.name) for n in self.selected_nodes(model) if n.op_type == "MatMul"
                and n.inputs[1].const_value is not None]

    def rewrite(self, model, accepted):
        for c in accepted:
            w = c.anchor.inputs[1]
            w.const_value = ir.tensor(w.const_value.numpy() * (1 + self.eps), name=w.name)
        return len(accepted)


class _LossyPerturb(_Perturb):
    exact = False


def test_an_exact_pass_that_changes_outputs_fails():
    with pytest.raises(AssertionError, match="exact pass 'perturb' changed output"):
        check_pass(_Perturb(), quant_models.mlp())


def test_lossy_pass_is_held_to_its_floor():
    check = check_pass(_LossyPerturb(), quant_models.mlp(), min_sqnr_db=30)
    assert all(30 <= v < 60 for v in check.sqnr_db.values())  # 1% error: ~40 dB
    with pytest.raises(AssertionError, match="SQNR .* dB < 50 dB"):
        check_pass(_LossyPerturb(), quant_models.mlp(), min_sqnr_db=50)
    with pytest.raises(ValueError, match="give min_sqnr_db"):
        check_pass(_LossyPerturb(), quant_models.mlp())


def test_a_real_exact_pass_passes():
    model = ir.load(EXAMPLE)  # the bundled demo CNN: Conv -> BatchNormalization ...
    check = check_pass(FoldBatchNorm(), model)
    assert check.modified and check.rewritten >= 1
    assert "BatchNormalization" not in [n.op_type for n in model.graph]
    assert all(v <= 1e-4 for v in check.relative_error.values())


def test_is_exact_only_for_identical_outputs():
    check = check_pass(_LossyPerturb(), quant_models.mlp(), min_sqnr_db=30)
    assert not is_exact(check)


def test_seeded_inputs_are_repeatable():
    model = quant_models.mlp()
    a, b = seeded_inputs(model), seeded_inputs(model)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
