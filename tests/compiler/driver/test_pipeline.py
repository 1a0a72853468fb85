"""The pipeline driver: verification after every pass, budgets, skip_pass, plan."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
import pytest

from kiln.compiler.core.errors import SpecError, VerificationError
from kiln.compiler.core.pass_api import Candidate, KilnPass, PassConfig, add_initializer
from kiln.compiler.driver import registry
from kiln.compiler.driver.compile import compile_model, plan_model
from kiln.compiler.driver.specs import spec_from_text

EXAMPLE = "compiler/core/examples/tiny_cnn.onnx"
#: specs/reparam.yaml's passes, in order
REPARAM_PASSES = ["fold_parametrization", "merge_lora", "merge_branches", "dedupe_weights",
                  "fold_batchnorm"]


class NoiseConfig(PassConfig):
    scale: float = 1e-3


class AddWeightNoise(KilnPass):
    """Test pass: perturbs the Gemm weight (lossy, relative noise of `scale`)."""

    name = "add_weight_noise"
    config_class = NoiseConfig
    exact = False

    def candidates(self, model):
        return [Candidate(n, n.name) for n in self.selected_nodes(model) if n.op_type == "Gemm"]

    def rewrite(self, model, accepted: Sequence[Candidate]) -> int:
        for c in accepted:
            w = c.anchor.inputs[1].const_value.numpy()
            noise = np.random.default_rng(0).standard_normal(w.shape) * np.abs(w).mean()
            new = add_initializer(model.graph, "noisy", (w + self.config.scale * noise)
                                  .astype(w.dtype))
            c.anchor.replace_input_with(1, new)
        return len(accepted)


class BrokenExactPass(AddWeightNoise):
    """Test pass that claims to be exact but is not."""

    name = "broken_exact"
    exact = True


@pytest.fixture
def test_passes(monkeypatch):
    monkeypatch.setitem(registry.BUILTIN_PASSES, "add_weight_noise",
                        f"{__name__}:AddWeightNoise")
    monkeypatch.setitem(registry.BUILTIN_PASSES, "broken_exact", f"{__name__}:BrokenExactPass")
    registry.available.cache_clear()
    yield
    registry.available.cache_clear()


def test_exact_passes_verified(tmp_path):
    result = compile_model(EXAMPLE, "reparam")
    names = [p.name for p in result.report.passes]
    assert names == REPARAM_PASSES
    # tiny_cnn has no computed weight, LoRA adapter or RepVGG branch: those three match nothing
    assert not any(p.modified or p.matched for p in result.report.passes[:3])
    fold = result.report.passes[names.index("fold_batchnorm")]
    assert fold.matched == 2 and fold.refused == 2 and fold.modified
    assert fold.sqnr_db > 100 and fold.max_abs_err < 1e-4
    dedupe = result.report.passes[names.index("dedupe_weights")]
    assert dedupe.modified and dedupe.sqnr_db == math.inf  # dedupe is bit-exact
    out = result.save(tmp_path)
    report = json.loads((out / "report.json").read_text())
    assert report["total"]["params_after"] < report["total"]["params_before"]


def test_exact_pass_that_changes_outputs_fails(test_passes):
    spec = spec_from_text("kiln: 1\npasses:\n  - broken_exact: {scale: 0.1}\n")
    with pytest.raises(VerificationError, match="exact pass 'broken_exact' changed the outputs"):
        compile_model(EXAMPLE, spec)


def test_lossy_pass_within_budget(test_passes):
    spec = spec_from_text("kiln: 1\npasses:\n  - add_weight_noise:\n      scale: 0.001\n"
                          "      budget: {sqnr_db: 30}\n")
    result = compile_model(EXAMPLE, spec)
    (p,) = result.report.passes
    assert p.modified and not p.exact and 30 < p.sqnr_db < 200


def test_lossy_pass_over_budget_fails_or_is_skipped(test_passes):
    text = ("kiln: 1\npasses:\n  - add_weight_noise:\n      scale: 0.5\n"
            "      budget: {sqnr_db: 40}\n")
    with pytest.raises(VerificationError, match="below the budget of 40"):
        compile_model(EXAMPLE, spec_from_text(text))
    skipping = spec_from_text(text + "verify: {on_budget_exceeded: skip_pass}\n")
    result = compile_model(EXAMPLE, skipping)
    (p,) = result.report.passes
    assert p.skipped and "undone" in p.note
    assert not any(n.name == "noisy" for n in result.model.graph.initializers.values())


def test_end_to_end_budget(test_passes):
    spec = spec_from_text("kiln: 1\npasses:\n  - add_weight_noise: {scale: 0.5}\n"
                          "verify: {budget: {sqnr_db: 60}}\n")
    with pytest.raises(VerificationError, match="end to end"):
        compile_model(EXAMPLE, spec)


def test_selector_matching_nothing_is_an_error():
    spec = spec_from_text("kiln: 1\npasses:\n  - fold_batchnorm:\n"
                          "      select: {op: Conv, name: 'nothing*'}\n", file="s.yaml")
    with pytest.raises(SpecError) as info:
        compile_model(EXAMPLE, spec)
    assert "s.yaml:4" in str(info.value) and "fold_batchnorm" in str(info.value)
    optional = spec_from_text("kiln: 1\npasses:\n  - fold_batchnorm:\n"
                              "      select: {name: 'nothing*'}\n      optional: true\n")
    result = compile_model(EXAMPLE, optional)
    assert not result.report.passes[0].modified


def test_plan_lists_matches_and_reasons_without_writing(tmp_path):
    before = (tmp_path / "x").exists()
    plan = plan_model(EXAMPLE, "reparam")
    fold = plan[REPARAM_PASSES.index("fold_batchnorm")]
    assert [c.label for c in fold.candidates if c.accepted] == [
        "stem.conv <- stem.bn", "head.fc <- head.scale + head.shift"]
    reasons = [c.reason for c in fold.candidates if not c.accepted]
    assert reasons == ["weight 'left.weight' is shared with right.conv",
                       "weight 'left.weight' is shared with left.conv"]
    assert (tmp_path / "x").exists() == before


def test_input_binding_and_npz_calibration(tmp_path):
    data = np.random.default_rng(0).standard_normal((3, 1, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "cal.npz", x=data)
    spec = spec_from_text(f"kiln: 1\ncalibration: {{source: 'npz:{tmp_path}/cal.npz'}}\n"
                          "verify: {samples: 3}\npasses: [fold_batchnorm]\n")
    result = compile_model(EXAMPLE, spec)
    assert result.report.verify_samples == 3
    np.testing.assert_array_equal(result.samples[2]["x"], data[2])


def test_source_model_is_not_modified(tmp_path):
    original = ir.load(EXAMPLE)
    compile_model(EXAMPLE, "reparam")
    assert [n.op_type for n in ir.load(EXAMPLE).graph] == [n.op_type for n in original.graph]


class RecordActivations(KilnPass):
    """Test pass: reads the activations feeding every Gemm through the calibration context."""

    name = "record_activations"
    needs_calibration = True
    seen: dict = {}

    def candidates(self, model):
        names = [n.inputs[0].name for n in model.graph if n.op_type == "Gemm"]
        RecordActivations.seen = self.calibration.activations(model, names)
        return []

    def rewrite(self, model, accepted):
        return 0


def test_calibration_context_gives_activations(monkeypatch):
    monkeypatch.setitem(registry.BUILTIN_PASSES, "record_activations",
                        f"{__name__}:RecordActivations")
    registry.available.cache_clear()
    try:
        spec = spec_from_text("kiln: 1\ncalibration: {samples: 3, seed: 5}\n"
                              "passes: [record_activations]\n")
        compile_model(EXAMPLE, spec)
    finally:
        registry.available.cache_clear()
    (values,) = RecordActivations.seen.values()
    assert len(values) == 3 and values[0].shape == (1, 16)
    assert not np.allclose(values[0], values[1])


def test_html_report(tmp_path):
    spec = spec_from_text("kiln: 1\npasses: [fold_batchnorm]\noutput: {report: [json, html]}\n")
    out = compile_model(EXAMPLE, spec).save(tmp_path)
    page = (out / "report.html").read_text()
    assert "<td>fold_batchnorm</td>" in page and (out / "report.json").exists()


def test_folder_calibration_with_preprocessing(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    spec = spec_from_text(
        f"kiln: 1\ncalibration:\n  source: 'folder:{folder}'\n  samples: 3\n"
        "  preprocess: {size: [32, 32], mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}\n"
        "verify: {samples: 5}\npasses: [fold_batchnorm]\n")
    result = compile_model(EXAMPLE, spec)
    assert result.report.verify_samples == 3  # all the images there are
    x = result.samples[0]["x"]
    assert x.shape == (1, 3, 32, 32) and x.dtype == np.float32
    assert -2.1 <= x.min() < 0 < x.max() <= 2.1
    with pytest.raises(SpecError, match="needs `preprocess:`"):
        spec_from_text(f"kiln: 1\ncalibration: {{source: 'folder:{folder}'}}\n")
    bad = spec_from_text(f"kiln: 1\ncalibration:\n  source: 'folder:{folder}'\n"
                         "  preprocess: {size: [32, 32], color: gray}\n", file="g.yaml")
    with pytest.raises(SpecError, match=r"g.yaml:3 calibration.source: preprocessed images"):
        compile_model(EXAMPLE, bad)


def test_progress_counts_calibration_and_verification_samples():
    """Calibration and verification report (done/total), which the console draws as
    determinate bars (and plain counted lines in a pipe)."""
    said: list[str] = []
    compile_model(EXAMPLE, "int8", progress=said.append)
    assert said.count("verify (4/4)") == 1
    assert "verify after pass 'quantize' (4/4)" in said
    calibration = [t for t in said if t.startswith("calibration (")]
    assert calibration[-1] == "calibration (16/16)" and len(calibration) >= 16
