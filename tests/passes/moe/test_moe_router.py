"""moe_router: k, renormalization and temperature of recognized MoE layers."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.passes.moe.form import recognize
from kiln.passes.moe.moe_router import MoeRouter, MoeRouterConfig
from tests.passes.moe.conftest import TOKENS, load, run


def _reference(layer, x, k, renormalize, temperature):
    """The MoE layer in numpy: the math the pass's docstring states."""
    logits = (x @ layer.router_w) / (layer.temperature * temperature)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    y = np.zeros((x.shape[0], layer.experts[0].w2.shape[1]))
    for t in range(x.shape[0]):
        chosen = np.argsort(-p[t], kind="stable")[:k]
        v = p[t, chosen] / (p[t, chosen].sum() if renormalize else 1.0)
        for j, e in zip(v, chosen):
            ex = layer.experts[e]
            h = np.maximum(x[t] @ ex.w1 + ex.b1, 0)
            y[t] += j * (h @ ex.w2 + ex.b2)
    return y


@pytest.mark.parametrize("k, renormalize, temperature",
                         [(1, None, 1.0), (3, True, 1.0), (2, False, 1.0), (2, True, 2.0)])
def test_reroutes_like_the_math(moe_files, k, renormalize, temperature):
    model = load(moe_files["sparse"])
    [(_, layer)] = recognize(model)
    p = MoeRouter(MoeRouterConfig(k=k, renormalize=renormalize, temperature=temperature))
    assert p(model).modified
    [c] = p.last_candidates
    assert c.accepted and f"top-{k}" in c.label
    expected = _reference(layer, TOKENS.astype(np.float64), k,
                          True if renormalize is None else renormalize, temperature)
    np.testing.assert_allclose(run(model), expected, atol=1e-5)
    [(_, after)] = recognize(model)
    assert after.k == k


def test_k_zero_makes_a_dense_mixture(moe_files):
    model = load(moe_files["sparse"])
    MoeRouter(MoeRouterConfig(k=0))(model)
    [(_, layer)] = recognize(model)
    assert layer.k is None and layer.dispatch == "stacked"


def test_refuses_nothing_to_change_and_too_large_k(moe_files):
    model = load(moe_files["sparse"])
    p = MoeRouter(MoeRouterConfig(k=2, reemit=False))
    assert not p(model).modified
    assert p.last_candidates[0].reason == "already routes that way"
    model = load(moe_files["dense"])
    p = MoeRouter(MoeRouterConfig())
    assert not p(model).modified
    assert p.last_candidates[0].reason == "already routes that way"
    model = load(moe_files["sparse"])
    p = MoeRouter(MoeRouterConfig(k=5))
    assert not p(model).modified
    assert "more than the layer's 4 experts" in p.last_candidates[0].reason


def test_torch_topk_loop_is_written_in_the_dispatch_form(moe_files):
    """A Mixtral-style export's own loop (torch.where + index_add) that already routes top-2
    is re-emitted in kiln's sparse dispatch form (what the TVM build lowers to grouped
    GEMMs), computing the same; a layer kiln wrote is then left."""
    model = load(moe_files["sparse"])
    before = run(model)
    [(_, layer)] = recognize(model)
    assert not layer.emitted
    p = MoeRouter(MoeRouterConfig(k=2))
    assert p(model).modified
    assert "top-2 as before, written in the sparse dispatch form" in p.last_candidates[0].label
    [(_, after)] = recognize(model)
    assert after.emitted and after.k == 2 and after.renormalize
    np.testing.assert_allclose(run(model), before, rtol=1e-5, atol=1e-6)
    again = MoeRouter(MoeRouterConfig(k=2))
    assert not again(model).modified
    assert again.last_candidates[0].reason == "already routes that way"


def test_idempotent(moe_files):
    model = load(moe_files["sparse"])
    MoeRouter(MoeRouterConfig(k=1))(model)
    assert not MoeRouter(MoeRouterConfig(k=1))(model).modified


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="temperature"):
        MoeRouterConfig(temperature=0)
