"""apply_mask: masks and output-channel gates from a safetensors file, exact against numpy
and ORT; ``drop`` removes the channels left all zero; refusals and idempotence."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

from kiln.compiler.core.errors import KilnError
from kiln.compiler.testing import prune_models
from kiln.compiler.testing import quant_models as qm
from kiln.passes.prune.apply_mask import ApplyMask, ApplyMaskConfig


def _weight(model, name):
    return model.graph.initializers[name].const_value.numpy()


def _masks(tmp_path, tensors):
    path = tmp_path / "masks.safetensors"
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
              str(path))
    return str(path)


def test_elementwise_mask_multiplies_the_weight(tmp_path):
    model = prune_models.mlp()
    w1 = _weight(model, "fc1.weight")
    mask = (np.random.default_rng(1).random(w1.shape) > 0.5).astype(np.float32)
    result = ApplyMask(ApplyMaskConfig(file=_masks(tmp_path, {"fc1.weight": mask})))(model)
    assert result.modified
    np.testing.assert_array_equal(_weight(model, "fc1.weight"), w1 * mask)
    assert ApplyMask(ApplyMaskConfig(file=_masks(tmp_path, {"fc1.weight": mask})))(
        model).modified is False


def test_gate_scales_the_channel_and_its_bias(tmp_path):
    model = prune_models.mlp()
    feeds = qm.feeds(model)
    w2, b2 = _weight(model, "fc2.weight"), _weight(model, "fc2.bias")
    gate = np.linspace(0.0, 2.0, w2.shape[0]).astype(np.float32)
    ApplyMask(ApplyMaskConfig(file=_masks(tmp_path, {"fc2.weight": gate})))(model)
    # Gemm transB=1: the output channels are the weight's rows
    np.testing.assert_allclose(_weight(model, "fc2.weight"), w2 * gate[:, None], rtol=1e-6)
    np.testing.assert_allclose(_weight(model, "fc2.bias"), b2 * gate, rtol=1e-6)
    assert qm.run(model, feeds)[0].shape == (4, 10)


def test_drop_removes_gated_off_channels_exactly(tmp_path):
    model = prune_models.mlp()
    feeds = qm.feeds(model)
    gate = np.ones(64, dtype=np.float32)
    gate[[2, 7, 30, 31]] = 0.0
    reference = prune_models.mlp()
    ApplyMask(ApplyMaskConfig(file=_masks(tmp_path, {"fc2.weight": gate})))(reference)
    expected = qm.run(reference, feeds)[0]
    masking = ApplyMask(ApplyMaskConfig(file=_masks(tmp_path, {"fc2.weight": gate}),
                                        drop=True))
    assert masking(model).modified
    assert list(_weight(model, "fc2.weight").shape) == [60, 64]
    assert list(_weight(model, "fc3.weight").shape) == [60, 10]
    assert "dropped 4 zero channels" in masking.note
    np.testing.assert_allclose(qm.run(model, feeds)[0], expected, rtol=1e-5, atol=1e-5)


def test_bad_keys_and_shapes_are_refused_with_the_reason(tmp_path):
    model = prune_models.mlp()
    file = _masks(tmp_path, {"nope.weight": np.ones(3), "fc1.weight": np.ones((5, 7))})
    masking = ApplyMask(ApplyMaskConfig(file=file))
    assert not masking(model).modified
    reasons = {c.reason for c in masking.last_candidates}
    assert "no initializer named 'nope.weight'" in reasons
    assert any(r and "fits neither weight shape [32, 64]" in r for r in reasons)


def test_missing_or_corrupt_file_is_a_clear_error(tmp_path):
    with pytest.raises(KilnError, match="does not exist"):
        ApplyMask(ApplyMaskConfig(file=str(tmp_path / "absent.safetensors")))(
            prune_models.mlp())
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(KilnError, match="is not a safetensors file"):
        ApplyMask(ApplyMaskConfig(file=str(bad)))(prune_models.mlp())


def test_drop_keeps_zero_weight_channels_whose_bias_is_not_zero(tmp_path):
    model = prune_models.mlp()
    feeds = qm.feeds(model)
    mask = np.ones((32, 64), dtype=np.float32)
    mask[:, [3, 4]] = 0.0               # fc1's columns 3, 4: zero weights, fc1.bias stays
    reference = prune_models.mlp()
    ApplyMask(ApplyMaskConfig(file=_masks(tmp_path, {"fc1.weight": mask})))(reference)
    expected = qm.run(reference, feeds)[0]
    masking = ApplyMask(ApplyMaskConfig(file=_masks(tmp_path, {"fc1.weight": mask}),
                                        drop=True))
    masking(model)
    assert list(_weight(model, "fc1.weight").shape) == [32, 64]   # nothing dropped
    np.testing.assert_allclose(qm.run(model, feeds)[0], expected, rtol=1e-5, atol=1e-5)
