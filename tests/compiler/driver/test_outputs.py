"""What `kiln compile` writes: reproducible model.onnx, a complete report.json, never the
input model; and what `kiln schema` / `kiln passes` print."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from kiln.compiler.core.spec import builtin_specs
from kiln.compiler.driver.cli import main

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = REPO / "compiler" / "core" / "examples" / "tiny_cnn.onnx"
#: specs/reparam.yaml's passes, in order
REPARAM_PASSES = ["fold_parametrization", "merge_lora", "merge_branches", "dedupe_weights",
                  "fold_batchnorm"]
TORCH_SOURCE = "kiln.compiler.testing.torch_models:cnn_with_batchnorm"
PASS_KEYS = ("name", "matched", "modified", "params_before", "params_after", "bytes_before",
             "bytes_after", "sqnr_db", "max_abs_err", "seconds")
TOTAL_KEYS = ("params_before", "params_after", "bytes_before", "bytes_after", "sqnr_db",
              "max_abs_err", "seconds")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compile_to(capsys, source: str | Path, outdir: Path, *extra: str) -> tuple[int, str]:
    code = main(["compile", str(source), "--spec", "reparam", "--no-build", "--quiet",
                 "-o", str(outdir), *extra])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def onnx_outputs(tmp_path_factory) -> tuple[Path, Path]:
    """The example compiled twice with the reparam spec, into two folders."""
    root = tmp_path_factory.mktemp("onnx_outputs")
    for name in ("a", "b"):
        assert main(["compile", str(EXAMPLE), "--spec", "reparam", "--no-build", "--quiet",
                     "-o", str(root / name)]) == 0
    return root / "a", root / "b"


@pytest.fixture(scope="module")
def torch_outputs(tmp_path_factory) -> tuple[Path, Path]:
    """The PyTorch test CNN (MODULE:CALLABLE) exported and compiled twice."""
    root = tmp_path_factory.mktemp("torch_outputs")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        for name in ("a", "b"):
            assert main(["compile", TORCH_SOURCE, "--spec", "reparam", "--no-build", "--quiet",
                         "-o", str(root / name)]) == 0
    return root / "a", root / "b"


def test_onnx_source_gives_identical_bytes(onnx_outputs):
    a, b = onnx_outputs
    assert (a / "model.onnx").read_bytes() == (b / "model.onnx").read_bytes()


def test_torch_source_gives_identical_bytes(torch_outputs):
    a, b = torch_outputs
    assert (a / "model.onnx").read_bytes() == (b / "model.onnx").read_bytes()
    report = json.loads((a / "report.json").read_text())
    assert report["model"] == TORCH_SOURCE
    assert [p["name"] for p in report["passes"]] == REPARAM_PASSES
    assert report == {**json.loads((b / "report.json").read_text()),
                      "load_seconds": report["load_seconds"], "passes": report["passes"],
                      "total": report["total"]}  # only timings differ


def test_outputs_are_written_atomically(onnx_outputs):
    for folder in onnx_outputs:
        assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "report.json"]


def test_report_has_every_pass_field_and_a_total(onnx_outputs):
    report = json.loads((onnx_outputs[0] / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == REPARAM_PASSES
    for entry in report["passes"]:
        for key in PASS_KEYS:
            assert key in entry, (entry["name"], key)
        if entry["name"] in ("dedupe_weights", "fold_batchnorm"):
            assert entry["modified"] is True and entry["matched"] >= 1
            assert entry["params_after"] < entry["params_before"]
            assert entry["bytes_after"] < entry["bytes_before"]
        else:   # tiny_cnn has no computed weight, LoRA adapter or RepVGG branch
            assert entry["modified"] is False and entry["matched"] == 0
            assert entry["params_after"] == entry["params_before"]
            assert entry["bytes_after"] == entry["bytes_before"]
        assert entry["seconds"] >= 0
    dedupe, fold = report["passes"][-2:]
    assert dedupe["sqnr_db"] is None and dedupe["max_abs_err"] == 0.0  # identical: SQNR inf
    assert fold["sqnr_db"] > 100 and fold["max_abs_err"] < 1e-4
    total = report["total"]
    for key in TOTAL_KEYS:
        assert key in total, key
    assert total["params_before"] == dedupe["params_before"]
    assert total["params_after"] == fold["params_after"]
    assert total["bytes_after"] == fold["bytes_after"]
    assert report["onnx_bytes"] == (onnx_outputs[0] / "model.onnx").stat().st_size


def test_output_into_the_input_folder_keeps_the_input(tmp_path, capsys):
    model = tmp_path / "tiny_cnn.onnx"
    model.write_bytes(EXAMPLE.read_bytes())
    before = sha256(model)
    for _ in range(2):
        code, err = compile_to(capsys, model, tmp_path)
        assert code == 0, err
    assert sha256(model) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "report.json",
                                                          "tiny_cnn.onnx"]


@pytest.mark.parametrize("how", ["same path", "relative", "symlink"])
def test_outdir_whose_model_onnx_is_the_input_is_refused(tmp_path, capsys, monkeypatch, how):
    model = tmp_path / "model.onnx"
    model.write_bytes(EXAMPLE.read_bytes())
    before = sha256(model)
    source: str | Path = model
    if how == "relative":
        monkeypatch.chdir(tmp_path)
        source = "model.onnx"
    elif how == "symlink":
        link = tmp_path / "elsewhere" / "link.onnx"
        link.parent.mkdir()
        link.symlink_to(model)
        source = link
    code, err = compile_to(capsys, source, tmp_path if how != "relative" else Path("."))
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "is the input model" in err and "refusing to write over it" in err
    assert sha256(model) == before
    assert not (tmp_path / "report.json").exists()  # refused before any work


def test_outdir_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "out"
    target.write_text("keep me")
    code, err = compile_to(capsys, EXAMPLE, target)
    assert code == 2 and err.strip() == f"kiln: error: {target}: exists and is not a folder"
    assert target.read_text() == "keep me"


def test_outdir_that_cannot_be_created(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = compile_to(capsys, EXAMPLE, blocker / "sub")
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "cannot write output" in err


def test_failed_compile_writes_only_a_failed_report(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("kiln: 1\npasses:\n  - dedupe_weights\n"
                    "  - fold_batchnorm: {select: {op: LSTM}}\n")
    out = tmp_path / "out"
    code = main(["compile", str(EXAMPLE), "--spec", str(spec), "--no-build", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]  # no model.onnx
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "failed"
    assert report["error"]["kind"] == "SpecError" and "matches no node" in \
        report["error"]["message"]
    assert [p["name"] for p in report["passes"]] == ["dedupe_weights"]  # what ran before
    assert f"report of the failed compile: {out / 'report.json'}" in err


def test_failed_compile_beside_an_earlier_build_leaves_it_alone(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = compile_to(capsys, EXAMPLE, out)
    assert code == 0, err
    before = {p.name: sha256(p) for p in out.iterdir()}
    spec = tmp_path / "spec.yaml"
    spec.write_text("kiln: 1\npasses:\n  - fold_batchnorm: {select: {op: LSTM}}\n")
    code = main(["compile", str(EXAMPLE), "--spec", str(spec), "--no-build", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert {p.name: sha256(p) for p in out.iterdir()} == before
    beside = tmp_path / "out.failed-report.json"
    assert json.loads(beside.read_text())["status"] == "failed"
    assert str(beside) in err
    # the next good run into the folder removes the stale failed report
    code, err = compile_to(capsys, EXAMPLE, out)
    assert code == 0, err
    assert not beside.exists()


# -- kiln schema and kiln passes ---------------------------------------------------------

@pytest.fixture(scope="module")
def schema() -> dict:
    import io
    from contextlib import redirect_stdout

    buffer = io.StringIO()
    with redirect_stdout(buffer):
        assert main(["schema"]) == 0
    return json.loads(buffer.getvalue())


def test_schema_is_a_json_schema(schema):
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"].endswith("2020-12/schema")


@pytest.mark.parametrize("name", sorted(builtin_specs()))
def test_schema_validates_builtin_specs(schema, name):
    jsonschema = pytest.importorskip("jsonschema")
    document = yaml.safe_load(builtin_specs()[name].read_text())
    jsonschema.Draft202012Validator(schema).validate(document)


@pytest.mark.parametrize("text", [
    "kiln: 1\npasses:\n  - fold_batchnorm: {mull_add: true}\n",
    "kiln: 1\npasses:\n  - fold_batchnorn: {}\n",
    "kiln: 1\nverify: {sampels: 2}\n",
    "kiln: 2\n",
    "kiln: 1\npasses:\n  - dedupe_weights: {min_elements: 0}\n",
])
def test_schema_rejects_bad_specs(schema, text):
    jsonschema = pytest.importorskip("jsonschema")
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(yaml.safe_load(text)))
    assert errors, text


def test_schema_accepts_common_pass_keys(schema):
    jsonschema = pytest.importorskip("jsonschema")
    text = ("kiln: 1\npasses:\n  - dedupe_weights\n  - fold_batchnorm:\n      mul_add: false\n"
            "      optional: true\n      select: {op: [Conv], exclude: {name: '*head*'}}\n"
            "      budget: {sqnr_db: 30}\n")
    jsonschema.Draft202012Validator(schema).validate(yaml.safe_load(text))


def test_passes_lists_builtins_with_options(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "fold_batchnorm (exact): Fold BatchNormalization" in out
    assert "mul_add: bool = True" in out
    assert "dedupe_weights (exact): Store byte-identical initializers" in out
    assert "min_elements: int = 1" in out
    assert "select, optional, budget" in out
