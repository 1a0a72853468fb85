"""Bad model sources through the CLI: exit code 2, at most two lines on stderr naming the
file, input or callable, no traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import onnx
import pytest

from kiln.compiler.driver.cli import main

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = REPO / "compiler" / "core" / "examples" / "tiny_cnn.onnx"


def compile_error(capsys, *argv: str) -> str:
    """`kiln compile ... --no-build` must fail with code 2 and a short message."""
    code = main(["compile", *argv, "--no-build", "--quiet"])
    captured = capsys.readouterr()
    return _check(code, captured.err, captured.out)


def _check(code: int, err: str, out: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert 1 <= len(lines) <= 2, err
    assert lines[0].startswith("kiln: error: "), err
    assert out == ""
    return err.strip()[len("kiln: error: "):]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """Broken model files, written once."""
    folder = tmp_path_factory.mktemp("bad_models")
    data = EXAMPLE.read_bytes()
    (folder / "truncated.onnx").write_bytes(data[: len(data) // 3])
    (folder / "text.onnx").write_text("this is not an ONNX model\n")
    (folder / "empty.onnx").write_bytes(b"")
    (folder / "folder.onnx").mkdir()
    (folder / "garbage.pt2").write_bytes(bytes(range(256)) * 4)
    with zipfile.ZipFile(folder / "notexport.pt2", "w") as archive:
        archive.writestr("hello.txt", "not an exported program")
    ext = folder / "ext"
    ext.mkdir()
    onnx.save(onnx.load(EXAMPLE), ext / "model.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    (folder / "plugin_models.py").write_text(
        "def boom():\n    raise RuntimeError('the model factory exploded\\nsecond line')\n"
        "def not_a_pair():\n    return 42\n"
        "NOT_CALLABLE = 3\n")
    (folder / "syntax_error.py").write_text("def f(:\n")
    return folder


def test_truncated_onnx(models, capsys):
    path = models / "truncated.onnx"
    message = compile_error(capsys, str(path))
    assert message.startswith(f"{path}: not a readable ONNX model")


def test_text_file_named_onnx(models, capsys):
    path = models / "text.onnx"
    assert compile_error(capsys, str(path)).startswith(f"{path}: not a readable ONNX model")


def test_empty_onnx(models, capsys):
    path = models / "empty.onnx"
    assert compile_error(capsys, str(path)).startswith(f"{path}: not a readable ONNX model")


def test_onnx_folder(models, capsys):
    path = models / "folder.onnx"
    assert compile_error(capsys, str(path)) == f"{path}: is a folder, expected an .onnx file"


def test_missing_onnx(tmp_path, capsys):
    path = tmp_path / "nope.onnx"
    assert compile_error(capsys, str(path)) == f"{path}: no such file"


def test_external_data_works_then_missing_then_short(models, tmp_path, capsys):
    folder = tmp_path / "ext"
    shutil.copytree(models / "ext", folder)
    model = folder / "model.onnx"
    assert main(["compile", str(model), "--no-build", "--quiet"]) == 0
    capsys.readouterr()
    data = (folder / "weights.bin").read_bytes()
    (folder / "weights.bin").unlink()
    message = compile_error(capsys, str(model))
    assert message.startswith(f"{model}: initializer ")
    assert "'weights.bin'" in message and "missing" in message
    (folder / "weights.bin").write_bytes(data[:100])
    message = compile_error(capsys, str(model))
    assert message.startswith(f"{model}: external data file 'weights.bin' is too short")


@pytest.mark.parametrize("binding, words", [
    ("x", ["--input 'x'", "NAME=DIM"]),
    ("x=", ["--input 'x='", "NAME=DIM"]),
    ("=1x3x32x32", ["NAME=DIM"]),
    ("x=1xthreex32x32", ["integers"]),
    ("x=1x0x32x32", ["positive"]),
    ("x=1x3x32", ["input 'x' has rank 4", "[1, 3, 32]"]),
    ("x=2x3x32x32", ["input 'x' dim 0 is fixed at 1, got 2"]),
    ("image=1x3x32x32", ["no input named 'image'", "inputs: x"]),
    ("3=1x3x32x32", ["input #3 does not exist"]),
])
def test_bad_input_binding(capsys, binding, words):
    message = compile_error(capsys, str(EXAMPLE), "--input", binding)
    for word in words:
        assert word in message, message


def test_unknown_input_in_spec(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("kiln: 1\ninputs:\n  image: [1, 3, 32, 32]\n")
    message = compile_error(capsys, str(EXAMPLE), "--spec", str(spec))
    assert "no input named 'image'" in message and "inputs: x" in message


@pytest.mark.parametrize("source, expected", [
    ("kiln_no_such_module:make", "cannot import 'kiln_no_such_module' (ModuleNotFoundError"),
    ("kiln.compiler.testing.torch_models:no_such_model",
     "'kiln.compiler.testing.torch_models' has no callable 'no_such_model'"),
    ("{models}/plugin_models.py:NOT_CALLABLE", "has no callable 'NOT_CALLABLE'"),
    ("{models}/plugin_models.py:boom",
     "calling it failed (RuntimeError: the model factory exploded)"),
    ("{models}/plugin_models.py:not_a_pair", "must return (torch.nn.Module, example_inputs)"),
    ("{models}/syntax_error.py:f", "cannot import"),
    ("{models}/missing.py:f", "no such file"),
    (":f", "expected MODULE:CALLABLE"),
])
def test_bad_callable(models, capsys, monkeypatch, source, expected):
    monkeypatch.chdir(REPO)
    source = source.format(models=models)
    message = compile_error(capsys, source)
    assert message.startswith(f"{source}: "), message
    assert expected in message, message


def test_garbage_pt2(models, capsys):
    path = models / "garbage.pt2"
    message = compile_error(capsys, str(path))
    assert message.startswith(f"{path}: not a torch.export program")


def test_zip_that_is_not_an_export(models, capsys):
    path = models / "notexport.pt2"
    message = compile_error(capsys, str(path))
    assert message.startswith(f"{path}: not a torch.export program")
    # The reason, not torch's "check the warnings above".
    assert "warnings above" not in message


# -- real processes ----------------------------------------------------------------------

def kiln(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln.compiler.driver.cli", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("source", ["{models}/garbage.pt2", "{models}/plugin_models.py:boom"])
def test_subprocess_bad_model(models, source):
    proc = kiln("compile", source.format(models=models), "--no-build")
    _check(proc.returncode, proc.stderr, proc.stdout)


def test_subprocess_bad_input_binding():
    proc = kiln("plan", str(EXAMPLE), "--spec", "reparam", "--input", "y=1x3x32x32")
    message = _check(proc.returncode, proc.stderr, proc.stdout)
    assert message == f"{EXAMPLE}: no input named 'y' (inputs: x)"


def test_long_library_messages_are_cut_to_two_lines(capsys, monkeypatch):
    """Errors carrying a library's multi-line text still print at most two lines."""
    from kiln.compiler.core.errors import FrontendError
    from kiln.compiler.driver import compile as pipeline

    def load_model(source, **_):
        raise FrontendError(f"{source}: the loader said:\nline one\nline two\nline three")

    monkeypatch.setattr(pipeline, "load_model", load_model)
    message = compile_error(capsys, str(EXAMPLE))
    assert message == f"{EXAMPLE}: the loader said:\nline one ... (more with --debug)"
