"""prune_channels: exact when it removes only all-zero channels (CNN with residual, depthwise,
concat, grouped conv; MLP), shapes really shrink, idempotent, refusals named."""

from __future__ import annotations

import numpy as np

from kiln.compiler.testing import prune_models
from kiln.compiler.testing import quant_models as qm
from kiln.passes.prune.prune_channels import PruneChannels, PruneChannelsConfig

# removing zero channels drops only exact-zero terms; ORT may still reorder sums
RTOL = 1e-5
ATOL = 1e-5


def _shape(model, name):
    return list(model.graph.initializers[name].const_value.shape)


def test_zero_channels_removed_exactly_cnn():
    model = prune_models.coupled_cnn(zero_channels={"conv1": [1, 5], "conv2": [1, 5],
                                                    "dw": [1, 5]})
    feeds = qm.feeds(model)
    before = qm.run(model, feeds)
    prune = PruneChannels(PruneChannelsConfig(zero_only=True))
    assert prune(model).modified
    assert _shape(model, "conv1.weight") == [6, 4, 3, 3]
    assert _shape(model, "conv3.weight") == [12, 12, 1, 1]
    assert model.graph.node(5).attributes.get_int("group") == 6
    np.testing.assert_allclose(qm.run(model, feeds)[0], before[0], rtol=RTOL, atol=ATOL)
    reasons = {c.reason for c in prune.last_candidates}
    assert "it reaches graph output 'y'" in reasons
    again = PruneChannels(PruneChannelsConfig(zero_only=True))
    assert not again(model).modified


def test_half_the_channels_cnn_stays_valid():
    model = prune_models.coupled_cnn()
    feeds = qm.feeds(model)
    PruneChannels(PruneChannelsConfig(amount=0.5))(model)
    assert _shape(model, "conv1.weight") == [4, 4, 3, 3]
    assert _shape(model, "gconv.weight") == [4, 6, 3, 3]
    assert qm.run(model, feeds)[0].shape == (1, 10)


def test_zero_neurons_mlp_and_round_to():
    model = prune_models.mlp(zero_neurons={"fc1": [0, 3, 9], "fc2": list(range(10))})
    feeds = qm.feeds(model)
    before = qm.run(model, feeds)
    PruneChannels(PruneChannelsConfig(zero_only=True))(model)
    assert _shape(model, "fc1.weight") == [32, 61]
    np.testing.assert_allclose(qm.run(model, feeds)[0], before[0], rtol=RTOL, atol=ATOL)
    rounded = prune_models.mlp()
    PruneChannels(PruneChannelsConfig(amount=0.3, round_to=8))(rounded)
    assert _shape(rounded, "fc1.weight") == [32, 48]
