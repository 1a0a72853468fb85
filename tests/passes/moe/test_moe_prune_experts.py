"""moe_prune_experts: rarely chosen experts go (routing statistics from calibration)."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.compiler.core.errors import PassError
from kiln.passes.moe.form import recognize
from kiln.passes.moe.moe_prune_experts import MoePruneExperts, MoePruneExpertsConfig
from tests.passes.moe.conftest import TOKENS, calibration, load, run


def test_drops_the_rarest_expert_and_keeps_other_tokens(moe_files):
    model = load(moe_files["sparse8"])
    [(_, layer)] = recognize(model)
    cal = calibration()
    share = MoePruneExperts(calibration=cal).routing_share(model, layer)
    assert share.sum() == pytest.approx(1.0) and share.shape == (8,)
    rarest = int(np.argmin(share))
    reference = run(model)
    p = MoePruneExperts(MoePruneExpertsConfig(keep=7), calibration=cal)
    assert p(model).modified
    assert f"dropped [{rarest}]" in p.last_candidates[0].label
    [(_, after)] = recognize(model)
    assert after.num_experts == 7 and after.k == 2
    # tokens that never picked the dropped expert keep their output exactly
    logits = TOKENS.astype(np.float64) @ layer.router_w
    untouched = ~np.any(np.argsort(-logits, axis=1)[:, :2] == rarest, axis=1)
    np.testing.assert_allclose(run(model)[untouched], reference[untouched], atol=1e-5)


def test_refuses_when_every_expert_is_used(moe_files):
    model = load(moe_files["sparse"])
    p = MoePruneExperts(MoePruneExpertsConfig(min_share=0.01), calibration=calibration())
    assert not p(model).modified
    assert "every expert is chosen" in p.last_candidates[0].reason


def test_never_below_k(moe_files):
    model = load(moe_files["sparse"])
    MoePruneExperts(MoePruneExpertsConfig(keep=1), calibration=calibration())(model)
    [(_, after)] = recognize(model)
    assert after.num_experts == 2


def test_needs_calibration(moe_files):
    with pytest.raises(PassError, match="calibration"):
        MoePruneExperts(MoePruneExpertsConfig(keep=2))(load(moe_files["sparse"]))
