"""Typed pass options at load, and a loaded spec written back out: every built-in spec loads
to frozen config objects (granularity PerTensor / PerChannel / PerGroup), emits to YAML that
loads to an equal spec, and compiles to byte-identical ONNX either way; option errors still
name file:line key.path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kiln.compiler.core import graph as kir
from kiln.compiler.core.errors import KilnError, SpecError
from kiln.compiler.core.pass_api import PassConfig
from kiln.compiler.core.spec import builtin_specs, dump_spec, load_spec, spec_from_text
from kiln.compiler.driver import registry
from kiln.compiler.driver.compile import compile_model
from kiln.passes.quant.config import (
    ActivationQuant,
    IntWeights,
    PerChannel,
    PerGroup,
    PerTensor,
    QuantizeConfig,
)
from kiln.passes.reparam.fold_batchnorm import FoldBatchNormConfig

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = REPO / "compiler" / "core" / "examples" / "tiny_cnn.onnx"
BUILTIN = sorted(builtin_specs())


def load(ref):
    return load_spec(ref, config_for=registry.config_class)


def from_text(text, file="spec.yaml"):
    return spec_from_text(text, config_for=registry.config_class, file=file)


def same_source(spec, like):
    return spec.model_copy(update={"source": like.source})


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_spec_round_trips(name, tmp_path):
    spec = load(name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(dump_spec(spec), encoding="utf-8")
    again = load(path)
    assert same_source(again, spec) == spec
    assert dump_spec(same_source(again, spec)) == dump_spec(spec)     # a fixed point


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_options_are_typed_and_frozen(name):
    spec = load(name)
    for entry in spec.passes:
        assert type(entry.options) is registry.config_class(entry.name)
        fields = list(type(entry.options).model_fields)
        if fields:
            with pytest.raises(ValidationError):
                setattr(entry.options, fields[0], None)


def test_quantize_options_become_config_objects():
    int8 = load("int8").passes[1].options
    assert isinstance(int8, QuantizeConfig)
    assert int8.weights == IntWeights(dtype="int8", granularity=PerChannel(), symmetric=True)
    assert int8.activations == ActivationQuant(dtype="uint8", calibration="mse")
    int4 = load("int4-weights").passes[0].options
    assert int4.weights.granularity == PerGroup(size=128) and int4.activations is None
    assert isinstance(load("int8").passes[0].options, FoldBatchNormConfig)


@pytest.mark.parametrize("text, expected", [
    ("per_tensor", PerTensor()), ("per_channel", PerChannel()), ("{group: 64}", PerGroup(size=64)),
])
def test_granularity_yaml_forms(text, expected):
    spec = from_text(f"kiln: 1\npasses:\n  - quantize:\n      weights: {{dtype: int4, "
                     f"granularity: {text}}}\n")
    assert spec.passes[0].options.weights.granularity == expected
    emitted = yaml.safe_load(dump_spec(spec))
    assert emitted["passes"][0]["quantize"]["weights"]["granularity"] == yaml.safe_load(text)


@pytest.mark.parametrize("granularity, where, words", [
    ("per_row", "passes[0].quantize.weights.granularity", ["'per_row' is not one of"]),
    ("{group: 4}", "passes[0].quantize.weights.granularity.group",
     ["greater than or equal to 8"]),
    ("7", "passes[0].quantize.weights.granularity", ["per_tensor, per_channel or {group: N}"]),
])
def test_granularity_errors_name_file_line_and_key(granularity, where, words):
    text = ("kiln: 1\npasses:\n  - quantize:\n      weights:\n        dtype: int4\n"
            f"        granularity: {granularity}\n")
    with pytest.raises(SpecError) as caught:
        from_text(text)
    message = str(caught.value)
    assert message.startswith(f"spec.yaml:6 {where}: pass 'quantize': "), message
    for word in words:
        assert word in message, message


def test_extends_is_resolved_into_the_emitted_spec(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("kiln: 1\nextends: int8\nname: mine\nverify: {samples: 1}\n"
                     "calibration: {samples: 3}\n", encoding="utf-8")
    spec = load(child)
    text = dump_spec(spec)
    assert "extends int8" in text.splitlines()[0]
    assert "extends" not in yaml.safe_load(text)
    again = from_text(text, file=spec.source)
    assert again == spec.model_copy(update={"extends": None})
    assert [e.name for e in again.passes] == ["fold_batchnorm", "quantize"]


def test_loader_uses_the_lookup_it_is_given():
    """The core knows no pass: a spec's pass names mean what the given lookup says."""
    class Only(PassConfig):
        level: int = 1

    def lookup(name):
        if name != "only":
            raise KilnError(f"no pass {name!r} here")
        return Only

    spec = spec_from_text("kiln: 1\npasses:\n  - only: {level: 3}\n", config_for=lookup)
    assert spec.passes[0].options == Only(level=3)
    with pytest.raises(SpecError, match=r"<spec>:4 passes\[1\]: no pass 'quantize' here"):
        spec_from_text("kiln: 1\npasses:\n  - only\n  - quantize\n", config_for=lookup)


@pytest.mark.parametrize("name", ["reparam", "int8"])
def test_emitted_spec_compiles_to_the_same_onnx(name, tmp_path):
    spec = load(name)
    again = from_text(dump_spec(spec), file=str(tmp_path / "emitted.yaml"))
    first = compile_model(EXAMPLE, spec)
    second = compile_model(EXAMPLE, again)
    assert kir.model_bytes(first.model) == kir.model_bytes(second.model)


@pytest.mark.parametrize("text, kind, path", [
    ("random", "RandomSource", None),
    ("npz:cal/samples.npz", "NpzSource", "cal/samples.npz"),
    ("folder:images", "FolderSource", "images"),
])
def test_calibration_source_is_typed_and_written_back_as_its_string(text, kind, path):
    preprocess = "\n  preprocess: {size: [8, 8]}" if text.startswith("folder:") else ""
    spec = spec_from_text(f"kiln: 1\ncalibration:\n  source: '{text}'{preprocess}\npasses: []\n",
                          config_for=registry.config_class)
    source = spec.calibration.source
    assert type(source).__name__ == kind and getattr(source, "path", None) == path
    assert yaml.safe_load(dump_spec(spec))["calibration"]["source"] == text


@pytest.mark.parametrize("text", ["npz:", "csv:data.csv", "randomly"])
def test_bad_calibration_source_names_the_forms(text):
    with pytest.raises(SpecError, match="is not one of random, npz:PATH, folder:PATH"):
        spec_from_text(f"kiln: 1\ncalibration: {{source: '{text}'}}\npasses: []\n",
                       config_for=registry.config_class)
