"""salient_split: 4-bit salient rows + binarized rest with a 1-bit mask; the graph
computes exactly the numpy reconstruction; refusals; idempotence; bits per weight."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from kiln.compiler.testing import quant_models as models
from kiln.passes.quant.salient_split import SalientSplit, SalientSplitConfig, split_quantize

# The ONNX form reproduces the numpy reconstruction to float32 rounding.
RECON_ATOL = 1e-6
# ~1.6 bits of codes plus scales and the mask on a 256x512 / 128x512 MLP.
MAX_BITS_PER_WEIGHT = 2.1
# Output SQNR of the 2-layer MLP at ~1.9 bits/weight (measured ~7 dB).
SQNR_FLOOR_DB = 4
OUTLIERS = (5, 40, 77)


def test_rewrites_mlp():
    model = models.mlp(d_in=256, hidden=512, d_out=128)
    inputs = models.feeds(model, outliers=OUTLIERS)
    (before,) = models.run(model, inputs)
    w1 = model.graph.initializers["w1"].const_value.numpy()
    split = SalientSplit(SalientSplitConfig(salient=0.2, block=128),
                         calibration=models.calibration(model, outliers=OUTLIERS))
    assert split(model).modified
    accepted = [c for c in split.last_candidates if c.accepted]
    assert len(accepted) == 2
    fc1 = accepted[0].data
    assert fc1.mask.sum() == round(0.2 * 256) and fc1.mask[list(OUTLIERS)].all()
    assert float(split.note.split()[0]) < MAX_BITS_PER_WEIGHT
    ops = models.ops(model)
    assert ops.count("ScatterND") == 2 and ops.count("UnpackBits") == 4
    assert ops.count("DequantizeTable") == 2 and ops.count("Transpose") == 3   # fc2: transB
    # the graph's W^ equals the numpy reconstruction
    *_, recon = split_quantize(w1, fc1.mask, 128)
    fc1_node = next(n for n in model.graph if n.name == "fc1")
    probe = models.build([helper.make_node("MatMul", ["x", "w"], ["y"])],
                         [models.init("w", recon)],
                         [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 256])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 512])])
    x = inputs["x"]
    (expected,) = models.run(probe, {"x": x})
    fc1_node.outputs[0].name = "h"
    model.graph.outputs.append(fc1_node.outputs[0])
    outputs = models.run(model, inputs)
    np.testing.assert_allclose(outputs[1], expected, atol=RECON_ATOL * np.abs(expected).max()
                               * 10)
    assert models.sqnr_db(before, outputs[0]) > SQNR_FLOOR_DB


def test_refuses_and_is_idempotent():
    model = models.mlp(d_in=64, hidden=128, d_out=32, shared=True)
    split = SalientSplit(calibration=models.calibration(model))
    split(model)
    reasons = {c.label: c.reason for c in split.last_candidates if not c.accepted}
    assert reasons["fc1"] == "weight 'w1' is shared with fc1_twin"
    again = SalientSplit(calibration=models.calibration(model))
    assert not again(model).modified
    assert {c.reason for c in again.last_candidates if c.label == "fc2"} == {
        "weight is already quantized"}
