"""prune's fidelity claims (docs/passes.md) on an MLP 64-64-1024-64-10 trained in about two
seconds on scikit-learn's digits, accuracy measured in ONNX Runtime on 397 held-out digits:

- global magnitude pruning beats layer-wise uniform pruning at 80% and 90% sparsity
  (measured over training seeds 0-3: 0.97-0.98 vs 0.47-0.68 at 80%, 0.87-0.94 vs 0.19-0.40
  at 90%);
- layer collapse: magnitudes are not comparable across layers (a ReLU network is the same
  function with W_l, b_l scaled by c and W_{l+1} by 1/c). With fc3 scaled by 1/4 (exact),
  global pruning at 98% (and 90%) empties fc3 (all but a few weights) and the accuracy is chance (0.08-0.11);
  ``min_keep_per_layer`` keeps fc3 alive and gets some of it back (0.17-0.23 at 98% with
  1%; 0.72-0.89 at 90% with 2%, where the collapsed net is at 0.08-0.20).

The margins asserted are well inside the spreads measured over seeds; the default run uses
seed 0, KILN_SLOW=1 adds seeds 1-3.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from kiln.compiler.core import graph as kir
from kiln.compiler.testing.sparse_models import digits_data, digits_mlp_weights, mlp_from_weights
from kiln.passes.prune.prune import Prune, PruneConfig

HIDDEN = (64, 1024, 64)
#: global minus layer-wise accuracy, at least (measured >= 0.29 at 80%, >= 0.47 at 90%)
GLOBAL_GAIN = {0.8: 0.15, 0.9: 0.3}
#: accuracy of the collapsed net, at most (10 classes: chance is ~0.1; measured <= 0.11
#: at 98%, <= 0.20 at 90% where fc3 keeps a couple of weights)
COLLAPSED = {0.98: 0.15, 0.9: 0.3}
#: accuracy min_keep_per_layer wins back over the collapsed net, at least
#: (measured 0.07-0.15 at 98% with 1%, 0.52-0.81 at 90% with 2%)
MIN_KEEP_GAIN = {0.98: 0.04, 0.9: 0.3}
#: fc3's scale in the reparameterized net (fc4 gets 1 / FC3_SCALE)
FC3_SCALE = 0.25
SEEDS = [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow),
         pytest.param(3, marks=pytest.mark.slow)]


def _net(seed: int, fc3_scale: float = 1.0):
    weights, biases = (list(a) for a in digits_mlp_weights(HIDDEN, seed))
    weights[2], biases[2] = weights[2] * fc3_scale, biases[2] * fc3_scale
    weights[3] = weights[3] / fc3_scale
    return mlp_from_weights(weights, biases, batch="N")


def _accuracy(model) -> float:
    _, _, x, y = digits_data()
    session = ort.InferenceSession(kir.model_bytes(model), providers=["CPUExecutionProvider"])
    return float((session.run(None, {"x": x})[0].argmax(axis=1) == y).mean())


def _pruned(seed: int, fc3_scale: float = 1.0, **options) -> tuple[float, dict[str, float]]:
    model = _net(seed, fc3_scale)
    p = Prune(PruneConfig(**options))
    assert p(model).modified
    return _accuracy(model), p.sparsity_by_layer


@pytest.mark.parametrize("seed", SEEDS)
def test_global_beats_layerwise_at_80_and_90_percent(seed):
    dense = _accuracy(_net(seed))
    assert dense > 0.95
    for sparsity, gain in GLOBAL_GAIN.items():
        layer, by_layer = _pruned(seed, sparsity=sparsity, scope="layer")
        assert all(s == pytest.approx(sparsity, abs=1e-3) for s in by_layer.values())
        glob, by_layer = _pruned(seed, sparsity=sparsity, scope="global")
        assert max(by_layer.values()) > sparsity > min(by_layer.values())
        assert glob > layer + gain, (sparsity, glob, layer)


@pytest.mark.parametrize("seed", SEEDS)
def test_layer_collapse_at_98_percent_and_min_keep_per_layer(seed):
    np.testing.assert_allclose(_accuracy(_net(seed, FC3_SCALE)), _accuracy(_net(seed)))
    # the plain net: accuracy falls far below the 80% one
    assert _pruned(seed, sparsity=0.98, scope="global")[0] < 0.5
    for sparsity, keep in ((0.98, 0.01), (0.9, 0.02)):
        collapsed, by_layer = _pruned(seed, FC3_SCALE, sparsity=sparsity, scope="global")
        assert by_layer["fc3"] > 0.999 and collapsed < COLLAPSED[sparsity]   # ~all zeros
        kept, by_layer = _pruned(seed, FC3_SCALE, sparsity=sparsity, scope="global",
                                 min_keep_per_layer=keep)
        assert by_layer["fc3"] == pytest.approx(1 - keep, abs=1e-3)
        assert kept > collapsed + MIN_KEEP_GAIN[sparsity], (sparsity, kept, collapsed)
