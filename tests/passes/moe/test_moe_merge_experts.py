"""moe_merge_experts: similar experts averaged (weighted by routing share)."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.passes.moe.form import Expert, recognize
from kiln.passes.moe.moe_merge_experts import MoeMergeExperts, MoeMergeExpertsConfig
from tests.passes.moe.conftest import calibration, load, run


def test_identical_experts_merge_exactly(moe_files):
    """Two copies of one expert merged into one with log(2) added to its logit: same output
    (exp(l) + exp(l) = exp(l + log 2))."""
    from kiln.passes.moe.emit import emit

    model = load(moe_files["dense"])
    [(_, layer)] = recognize(model)
    experts = list(layer.experts)
    experts[3] = Expert(**vars(experts[1]))
    router = layer.router_w.copy()
    router[:, 3] = router[:, 1]
    bias = layer.router_b.copy()
    bias[3] = bias[1]
    emit(model, layer.with_(experts=experts, router_w=router, router_b=bias), name="moe")
    reference = run(model)
    p = MoeMergeExperts(MoeMergeExpertsConfig(experts=3), calibration=calibration())
    assert p(model).modified
    assert "merged [[1, 3]]" in p.last_candidates[0].label
    np.testing.assert_allclose(run(model), reference, atol=1e-5)


def test_merges_to_target_count(moe_files):
    model = load(moe_files["sparse8"])
    MoeMergeExperts(MoeMergeExpertsConfig(experts=4), calibration=calibration())(model)
    [(_, after)] = recognize(model)
    assert after.num_experts == 4 and after.k == 2


def test_refuses_fewer_than_k_and_no_reduction(moe_files):
    model = load(moe_files["sparse"])
    p = MoeMergeExperts(MoeMergeExpertsConfig(experts=1), calibration=calibration())
    assert not p(model).modified and "fewer than k=2" in p.last_candidates[0].reason
    p = MoeMergeExperts(MoeMergeExpertsConfig(experts=4), calibration=calibration())
    assert not p(model).modified and "not more than 4" in p.last_candidates[0].reason


def test_config_requires_experts():
    with pytest.raises(ValueError, match="experts"):
        MoeMergeExpertsConfig()
