"""prune_channels: exact when it removes only all-zero channels (CNN with residual, depthwise,
concat, grouped conv; MLP; whole attention heads of a torch-exported transformer block),
shapes really shrink, idempotent, refusals named."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.compiler.testing import prune_models
from kiln.compiler.testing import quant_models as qm
from kiln.passes.prune.channel_slice import replace_initializer
from kiln.passes.prune.prune_channels import PruneChannels, PruneChannelsConfig

# removing zero channels drops only exact-zero terms; ORT may still reorder sums
RTOL = 1e-5
ATOL = 1e-5
# half the heads and FFN neurons of a random block, residual kept: measured 14.6 dB
LOSSY_SQNR_DB = 10.0


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


def _reshape_targets(model):
    """Each Reshape's target shape (Constant node or initializer), in graph order."""
    out = []
    for node in model.graph:
        if node.op_type == "Reshape":
            target = node.inputs[1]
            tensor = target.const_value if target.const_value is not None else \
                target.producer().attributes["value"].as_tensor()
            out.append(tensor.numpy().tolist())
    return out


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["torchscript", "torch.export"])
def test_zero_heads_removed_exactly_attention(dynamo):
    """Heads 1 and 2 (of 4, d=8) of the exported block have all-zero Q, K and V. Both
    torch exporters (torch.export: ~15 s for its first export here, so slow)."""
    model = prune_models.attention_block(zero_heads=[1, 2], dynamo=dynamo)
    feeds = qm.feeds(model)
    before = qm.run(model, feeds)
    prune = PruneChannels(PruneChannelsConfig(zero_only=True))
    assert prune(model).modified
    assert prune.note == "kept 2 of 4 channel units in 1 groups"
    # Q, K, V lose two heads' columns (and biases), the output projection the same rows
    inits = {k: list(v.const_value.shape) for k, v in model.graph.initializers.items()}
    assert inits["q.bias"] == inits["k.bias"] == inits["v.bias"] == [16]
    matmuls = [n for n in model.graph if n.op_type == "MatMul"
               and n.inputs[1].const_value is not None]
    assert [list(n.inputs[1].const_value.shape) for n in matmuls] == \
        [[32, 16], [32, 16], [32, 16], [16, 32], [32, 64], [64, 32]]
    # the head-splitting Reshapes now make 2 heads; the merging one 2 * 8 channels
    assert _reshape_targets(model) == [[2, 8, 2, 8]] * 3 + [[2, 8, 16]]
    np.testing.assert_allclose(qm.run(model, feeds)[0], before[0], rtol=RTOL, atol=ATOL)
    reasons = {c.reason for c in prune.last_candidates}
    assert "it reaches graph input 'x'" in reasons  # the residual stream stays whole
    assert not PruneChannels(PruneChannelsConfig(zero_only=True))(model).modified


def test_half_the_heads_torchscript_export():
    """The TorchScript exporter's form (Constant nodes for the Reshape targets): 50% of
    the heads and of the FFN neurons go, the model stays valid, lossy but close."""
    model = prune_models.attention_block(dynamo=False)
    feeds = qm.feeds(model)
    before = qm.run(model, feeds)[0]
    prune = PruneChannels(PruneChannelsConfig(amount=0.5))
    prune(model)
    assert prune.note == "kept 34 of 68 channel units in 2 groups"
    assert _reshape_targets(model) == [[2, 8, 2, 8]] * 3 + [[2, 8, 16]]
    after = qm.run(model, feeds)[0]
    assert after.shape == before.shape
    # the residual carries x through: half the heads and neurons do not destroy it
    sqnr = 10 * np.log10(np.sum(before ** 2) / np.sum((after - before) ** 2))
    assert sqnr > LOSSY_SQNR_DB


def test_zero_only_keeps_a_channel_a_bias_shifts():
    """A MatMul's zero weight column whose Add bias is non-zero is not a zero channel."""
    model = prune_models.mlp(zero_neurons={"fc1": [0, 3]})
    bias = model.graph.initializers["fc1.bias"].const_value.numpy().copy()
    bias[3] = 0.5  # neuron 3: zero weights, bias 0.5 -> relu(0.5) reaches fc2
    replace_initializer(model.graph, model.graph.initializers["fc1.bias"], bias)
    feeds = qm.feeds(model)
    before = qm.run(model, feeds)
    PruneChannels(PruneChannelsConfig(zero_only=True))(model)
    assert _shape(model, "fc1.weight") == [32, 63]  # only neuron 0 went
    np.testing.assert_allclose(qm.run(model, feeds)[0], before[0], rtol=RTOL, atol=ATOL)


def _dead_neuron_mlp():
    """The MLP with fc1's neurons 0-15 dead (bias -100: ReLU never fires on the seeded
    inputs) and their weights tripled (so l1 ranks them highest)."""
    model = prune_models.mlp()
    for name, change in (("fc1.weight", lambda w: np.concatenate([w[:, :16] * 3, w[:, 16:]], 1)),
                         ("fc1.bias", lambda b: np.concatenate([b[:16] * 0 - 100, b[16:]]))):
        old = model.graph.initializers[name]
        replace_initializer(model.graph, old, change(old.const_value.numpy()).astype(np.float32))
    return model


def _kept_fc1_columns(pruned, original) -> list[int]:
    w, w0 = (m.graph.initializers["fc1.weight"].const_value.numpy() for m in (pruned, original))
    return [int(np.nonzero((w0 == w[:, [j]]).all(axis=0))[0][0]) for j in range(w.shape[1])]


def test_activation_criterion_ranks_by_mean_abs_activation():
    """criterion: activation scores a neuron by the mean |x| its consumer reads (fc1's:
    relu1's output, calibration): the 16 dead neurons go first, exactly (they pass on 0),
    though l1 ranks them first to keep; the kept ones are the top by mean |relu1|."""
    model, original = _dead_neuron_mlp(), _dead_neuron_mlp()
    calibration = qm.calibration(model, count=4)
    acts = calibration.activations(original, ["h"])["h"]
    mean_abs = np.mean([np.abs(a).mean(axis=0) for a in acts], axis=0)
    assert (mean_abs[:16] == 0).all() and (mean_abs[16:] > 0).all()
    feeds = qm.feeds(model)
    before = qm.run(model, feeds)[0]
    fc1 = lambda node: node.name == "fc1"  # noqa: E731
    prune = PruneChannels(PruneChannelsConfig(amount=0.5, criterion="activation"),
                          selected=fc1, calibration=calibration)
    assert prune(model).modified
    kept = _kept_fc1_columns(model, original)
    assert kept == sorted(np.argsort(-mean_abs, kind="stable")[:32].tolist())
    assert not set(kept) & set(range(16))

    exact = _dead_neuron_mlp()
    PruneChannels(PruneChannelsConfig(amount=0.25, criterion="activation"), selected=fc1,
                  calibration=qm.calibration(exact, count=4))(exact)
    assert _kept_fc1_columns(exact, original) == list(range(16, 64))
    np.testing.assert_allclose(qm.run(exact, feeds)[0], before, rtol=RTOL, atol=ATOL)

    by_l1 = _dead_neuron_mlp()
    PruneChannels(PruneChannelsConfig(amount=0.25, criterion="l1"), selected=fc1)(by_l1)
    assert set(range(16)) <= set(_kept_fc1_columns(by_l1, original))


CHANNELS_SPEC = """kiln: 1
name: channels-50
passes:
  - prune_channels:
      amount: 0.5
      criterion: l1
verify:
  samples: 2
"""
#: the TVM module vs ONNX Runtime on the same pruned model.onnx (float32 reassociation)
BUILD_RTOL = 1e-4
BUILD_ATOL = 1e-5


def test_compile_with_a_prune_channels_spec_end_to_end(tmp_path):
    """kiln compile --spec (prune_channels, 50%) --target host on the coupled CNN: the
    written model.onnx has half the channels (depthwise conv's group halved, the grouped
    conv keeps one of its two groups) and is smaller; the TVM module that kiln run
    executes matches ONNX Runtime on that model.onnx."""
    import json

    import onnx
    import onnx_ir as ir
    import onnxruntime as ort

    from kiln.compiler.core import graph as kir
    from kiln.compiler.driver.cli import main

    spec, source, out = tmp_path / "channels.yaml", tmp_path / "cnn.onnx", tmp_path / "out"
    spec.write_text(CHANNELS_SPEC)
    onnx.save(kir.to_proto(prune_models.coupled_cnn(width=16, size=16)), source)
    assert main(["compile", str(source), "--spec", str(spec), "--target", "host",
                 "-o", str(out), "--no-cache"]) in (0, None)
    report = json.loads((out / "report.json").read_text())
    [entry] = report["passes"]
    assert entry["name"] == "prune_channels" and entry["matched"] == 2
    assert entry["note"] == "kept 9 of 18 channel units in 2 groups"
    assert report["compiled"]["verified"] and (out / "model.so").is_file()
    written = ir.load(out / "model.onnx")
    shapes = {k: list(v.const_value.shape) for k, v in written.graph.initializers.items()}
    assert shapes["conv1.weight"] == [8, 4, 3, 3] and shapes["dw.weight"] == [8, 1, 3, 3]
    assert shapes["conv3.weight"] == [12, 16, 1, 1] and shapes["gconv.weight"] == [8, 12, 3, 3]
    assert shapes["fc.weight"] == [10, 8]
    groups = {n.name: n.attributes.get_int("group", 1) for n in written.graph}
    assert groups["dw"] == 8 and groups["gconv"] == 1
    assert (out / "model.onnx").stat().st_size < 0.6 * source.stat().st_size

    x = np.random.default_rng(7).standard_normal((1, 4, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    assert main(["run", str(out), "--inputs", str(tmp_path / "in.npz"),
                 "--output", str(tmp_path / "y.npz")]) in (0, None)
    compiled = np.load(tmp_path / "y.npz")["y"]
    expected = ort.InferenceSession(str(out / "model.onnx"),
                                    providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(compiled, expected, rtol=BUILD_RTOL, atol=BUILD_ATOL)


@pytest.mark.slow
def test_compile_prunes_attention_heads_end_to_end(tmp_path):
    """The same spec on the attention block (8 heads of 8, FFN 128, TorchScript export):
    4 heads and 64 FFN neurons go, TVM builds the pruned model and matches ONNX Runtime."""
    import json

    import onnx
    import onnx_ir as ir

    from kiln.compiler.core import graph as kir
    from kiln.compiler.driver.cli import main

    spec, source, out = tmp_path / "channels.yaml", tmp_path / "block.onnx", tmp_path / "out"
    spec.write_text(CHANNELS_SPEC)
    model = prune_models.attention_block(d_model=64, heads=8, ffn=128, batch=1, seq=16,
                                         dynamo=False)
    onnx.save(kir.to_proto(model), source)
    assert main(["compile", str(source), "--spec", str(spec), "--target", "host",
                 "-o", str(out), "--no-cache"]) in (0, None)
    report = json.loads((out / "report.json").read_text())
    assert report["passes"][0]["note"] == "kept 68 of 136 channel units in 2 groups"
    assert report["compiled"]["verified"]
    written = ir.load(out / "model.onnx")
    assert _reshape_targets(written) == [[1, 16, 4, 8]] * 3 + [[1, 16, 32]]
    assert (out / "model.onnx").stat().st_size < 0.7 * source.stat().st_size
