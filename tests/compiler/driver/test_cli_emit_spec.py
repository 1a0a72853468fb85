"""`kiln plan MODEL --spec S --emit-spec OUT|-`: the loaded spec written as YAML that loads to
an equal spec; with `-` the YAML alone is on stdout (the plan goes to stderr)."""

from __future__ import annotations

from pathlib import Path

import yaml

from kiln.compiler.driver.cli import main
from kiln.compiler.driver.specs import load_spec, spec_from_text

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = str(REPO / "compiler" / "core" / "examples" / "tiny_cnn.onnx")
#: specs/reparam.yaml's passes, in order
REPARAM_PASSES = ["fold_parametrization", "merge_lora", "merge_branches", "dedupe_weights",
                  "fold_batchnorm"]


def test_emit_spec_to_a_file(tmp_path, capsys):
    out = tmp_path / "resolved.yaml"
    assert main(["plan", EXAMPLE, "--spec", "int8", "--emit-spec", str(out)]) == 0
    assert "quantize" in capsys.readouterr().out          # the plan is still printed
    spec = load_spec("int8")
    again = load_spec(out)
    assert again.model_copy(update={"source": spec.source}) == spec


def test_emit_spec_to_stdout(capsys):
    assert main(["plan", EXAMPLE, "--spec", "reparam", "--emit-spec", "-"]) == 0
    captured = capsys.readouterr()
    document = yaml.safe_load(captured.out)
    assert [next(iter(p)) for p in document["passes"]] == REPARAM_PASSES
    assert "fold_batchnorm" in captured.err                 # plan lines
    spec = load_spec("reparam")
    assert spec_from_text(captured.out, file=spec.source) == spec


def test_emit_spec_to_an_unwritable_place(tmp_path, capsys):
    target = tmp_path / "missing" / "out.yaml"
    code = main(["plan", EXAMPLE, "--spec", "reparam", "--emit-spec", str(target)])
    err = capsys.readouterr().err
    assert code == 2 and "cannot write the spec" in err and "Traceback" not in err
