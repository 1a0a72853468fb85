"""Bad specs through the CLI: exit code 2 and one line naming the file, the line and the
key path; never a traceback (unless --debug)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kiln.compiler.driver.cli import main

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = str(REPO / "compiler" / "core" / "examples" / "tiny_cnn.onnx")


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def plan_error(capsys, spec: str) -> str:
    """`kiln plan` with a bad spec: exit 2, one line on stderr, no traceback."""
    code, err = run_cli(capsys, "plan", EXAMPLE, "--spec", spec)
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kiln: error: ")
    return lines[0][len("kiln: error: "):]


# (spec text, expected "file:line path" prefix, words the message must contain)
CASES = {
    "unknown top-level key": (
        "kiln: 1\nname: x\npasess: []\n",
        "spec.yaml:3 pasess:", ["unknown key 'pasess'", "did you mean 'passes'"]),
    "unknown key in a section": (
        "kiln: 1\nverify:\n  samples: 2\n  sampels: 3\n",
        "spec.yaml:4 verify.sampels:", ["unknown key 'sampels'", "did you mean 'samples'"]),
    "unknown pass option (flow mapping)": (
        "kiln: 1\npasses:\n  - dedupe_weights: {}\n  - fold_batchnorm: {mull_add: true}\n",
        "spec.yaml:4 passes[1].fold_batchnorm.mull_add:",
        ["fold_batchnorm", "unknown key 'mull_add'", "did you mean 'mul_add'"]),
    "unknown pass option (block mapping)": (
        "kiln: 1\npasses:\n  - fold_batchnorm:\n      optional: true\n      mull_add: true\n",
        "spec.yaml:5 passes[0].fold_batchnorm.mull_add:", ["unknown key 'mull_add'"]),
    "wrong type of a pass option": (
        "kiln: 1\npasses:\n  - fold_batchnorm:\n      mul_add: [1, 2]\n",
        "spec.yaml:4 passes[0].fold_batchnorm.mul_add:", ["fold_batchnorm", "boolean"]),
    "wrong type of a pass option (block list)": (
        "kiln: 1\npasses:\n  - fold_batchnorm:\n      mul_add:\n        - 1\n",
        "spec.yaml:4 passes[0].fold_batchnorm.mul_add:", ["boolean"]),
    "out-of-range pass option": (
        "kiln: 1\npasses:\n  - dedupe_weights: {min_elements: 0}\n",
        "spec.yaml:3 passes[0].dedupe_weights.min_elements:", ["greater than or equal to 1"]),
    "wrong type": (
        "kiln: 1\nverify:\n  samples: many\n",
        "spec.yaml:3 verify.samples:", ["integer", "'many'"]),
    "not one of": (
        "kiln: 1\nverify: {on_budget_exceeded: ignore}\n",
        "spec.yaml:2 verify.on_budget_exceeded:", ["'ignore' is not one of", "'fail'"]),
    "wrong type in a selector": (
        "kiln: 1\npasses:\n  - fold_batchnorm:\n      select:\n        op: Conv\n"
        "        param: {ndim: two}\n",
        "spec.yaml:6 passes[0].select.param.ndim:", ["integer"]),
    "unknown pass": (
        "kiln: 1\npasses:\n  - dedupe_weights: {}\n  - fold_batchnorn: {}\n",
        "spec.yaml:4 passes[1]:", ["unknown pass 'fold_batchnorn'",
                                   "did you mean 'fold_batchnorm'"]),
    "pass item with two names": (
        "kiln: 1\npasses:\n  - {fold_batchnorm: {}, dedupe_weights: {}}\n",
        "spec.yaml:3 passes[0]:", ["one key"]),
    "bad regex in a selector": (
        "kiln: 1\npasses:\n  - fold_batchnorm:\n      select:\n        name: 're:stem.(conv'\n",
        "spec.yaml:5 passes[0].select.name:", ["bad regex", "stem.(conv"]),
    "bad YAML": (
        "kiln: 1\npasses: [\n  - fold_batchnorm\n",
        "spec.yaml:3:", ["invalid YAML"]),
    "tab indentation": (
        "kiln: 1\nverify:\n\tsamples: 2\n",
        "spec.yaml:3:", ["invalid YAML", "'\\t'"]),
    "duplicate key": (
        "kiln: 1\nname: a\nverify: {samples: 2}\nname: b\n",
        "spec.yaml:4:", ["duplicate key 'name'"]),
    "duplicate key in a pass": (
        "kiln: 1\npasses:\n  - fold_batchnorm:\n      mul_add: true\n      mul_add: false\n",
        "spec.yaml:5 passes[0].fold_batchnorm:", ["duplicate key 'mul_add'"]),
    "wrong version": (
        "# a comment\nkiln: 2\nname: x\n",
        "spec.yaml:2 kiln:", ["spec version 2 is not supported", "version 1"]),
    "version as a string": (
        "kiln: '1'\n", "spec.yaml:1 kiln:", ["spec version '1' is not supported"]),
    "version as a bool": (
        "kiln: true\n", "spec.yaml:1 kiln:", ["spec version True is not supported"]),
    "missing version": (
        "name: x\npasses: []\n", "spec.yaml:1:", ["missing version key", "kiln: 1"]),
    "not a mapping": (
        "- kiln: 1\n", "spec.yaml:1:", ["must be a mapping"]),
    "empty file": (
        "# nothing\n", "spec.yaml:", ["empty"]),
    "python tag": (
        "kiln: 1\nname: !!python/object/apply:os.system ['true']\n",
        "spec.yaml:2 name:", ["invalid YAML", "python/object/apply:os.system", "not supported"]),
    "python tag on a scalar": (
        "kiln: 1\nverify:\n  samples: !!python/name:os.getcwd ''\n",
        "spec.yaml:3:", ["invalid YAML", "python/name:os.getcwd"]),
    "merge key": (
        "kiln: 1\n<<: {name: x}\n", "spec.yaml:2:", ["merge keys"]),
    "extends of a missing spec": (
        "kiln: 1\nname: x\nextends: reparm\n",
        "spec.yaml:3 extends:", ["no spec file or built-in spec named 'reparm'",
                                 "did you mean 'reparam'"]),
    "negative input dim": (
        "kiln: 1\ninputs:\n  x: [1, 3, -1, 32]\n",
        "spec.yaml:3 inputs.x[2]:", ["greater than 0"]),
}


@pytest.mark.parametrize("text, where, words", CASES.values(), ids=list(CASES))
def test_bad_spec(tmp_path, capsys, text, where, words):
    message = plan_error(capsys, write(tmp_path, text))
    location, _, _ = message.partition(": ")
    assert message.startswith(str(tmp_path / where)), message
    for word in words:
        assert word in message, message
    assert location  # "file:line path"


def test_empty_selector_names_pass_and_selector(tmp_path, capsys):
    text = ("kiln: 1\npasses:\n  - dedupe_weights: {}\n  - fold_batchnorm:\n"
            "      select: {op: LSTM, name: 'encoder.*'}\n")
    message = plan_error(capsys, write(tmp_path, text))
    assert message.startswith(f"{tmp_path / 'spec.yaml'}:5 passes[1].select: ")
    assert "'fold_batchnorm'" in message
    assert "matches no node" in message
    assert "LSTM" in message and "encoder.*" in message
    assert "optional: true" in message


def test_empty_selector_with_optional_passes(tmp_path, capsys):
    text = ("kiln: 1\npasses:\n  - fold_batchnorm:\n      select: {op: LSTM}\n"
            "      optional: true\n")
    code, err = run_cli(capsys, "plan", EXAMPLE, "--spec", write(tmp_path, text))
    assert code == 0, err
    assert err == ""


def test_exclude_that_removes_everything_is_empty(tmp_path, capsys):
    text = ("kiln: 1\npasses:\n  - fold_batchnorm:\n      select:\n        op: Conv\n"
            "        exclude: {name: '*conv'}\n")
    message = plan_error(capsys, write(tmp_path, text))
    assert message.startswith(f"{tmp_path / 'spec.yaml'}:4 passes[0].select: ")
    assert "matches no node" in message


def test_missing_spec_file(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    message = plan_error(capsys, str(missing))
    assert message == f"{missing}: no such spec file"


def test_unknown_builtin_spec_name(capsys):
    message = plan_error(capsys, "reparm")
    assert "no spec file or built-in spec named 'reparm'" in message
    assert "did you mean 'reparam'" in message


def test_spec_is_a_folder(tmp_path, capsys):
    folder = tmp_path / "specs.yaml"
    folder.mkdir()
    message = plan_error(capsys, str(folder))
    assert message.startswith(f"{folder}: cannot read spec")


def test_spec_is_binary(tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_bytes(b"kiln: 1\n\xff\xfe\x00\n")
    assert plan_error(capsys, str(path)) == f"{path}: not a text file"


def test_extends_loop(tmp_path, capsys):
    write(tmp_path, "kiln: 1\nextends: b.yaml\n", "a.yaml")
    write(tmp_path, "kiln: 1\nname: b\nextends: a.yaml\n", "b.yaml")
    message = plan_error(capsys, str(tmp_path / "a.yaml"))
    assert message.startswith(f"{tmp_path / 'b.yaml'}:3 extends: ")
    assert "loops back" in message and "a.yaml" in message


def test_extends_itself(tmp_path, capsys):
    spec = write(tmp_path, "kiln: 1\nextends: spec.yaml\n")
    message = plan_error(capsys, spec)
    assert message.startswith(f"{spec}:2 extends: ") and "loops back" in message


def test_error_in_parent_names_the_parent(tmp_path, capsys):
    write(tmp_path, "kiln: 1\nverify:\n  sampels: 2\n", "base.yaml")
    child = write(tmp_path, "kiln: 1\nextends: base.yaml\nname: child\n", "child.yaml")
    message = plan_error(capsys, child)
    assert message.startswith(f"{tmp_path / 'base.yaml'}:3 verify.sampels: "), message


def test_error_in_child_of_builtin_names_the_child(tmp_path, capsys):
    child = write(tmp_path, "kiln: 1\nextends: reparam\nverify:\n  samplez: 1\n")
    message = plan_error(capsys, child)
    assert message.startswith(f"{child}:4 verify.samplez: ")
    assert "did you mean 'samples'" in message


def test_child_list_replaces_parent_list(tmp_path, capsys):
    """Lists are replaced: a bad option in the child's passes names the child's line."""
    child = write(tmp_path, "kiln: 1\nextends: reparam\npasses:\n\n  - fold_batchnorm:\n"
                            "      mull_add: 1\n")
    message = plan_error(capsys, child)
    assert message.startswith(f"{child}:6 passes[0].fold_batchnorm.mull_add: "), message


def test_odd_input_name_is_quoted_in_key_path(tmp_path, capsys):
    message = plan_error(capsys, write(tmp_path, "kiln: 1\ninputs:\n  input.1: [1, 0]\n"))
    assert message.startswith(f"{tmp_path / 'spec.yaml'}:3 inputs['input.1'][1]: "), message


# -- real processes: exit code 2, one line on stderr, nothing on stdout, no traceback ------

def kiln(*argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln.compiler.driver.cli", *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["unknown pass option (flow mapping)", "python tag"])
def test_subprocess_bad_spec(tmp_path, case):
    text, where, words = CASES[case]
    proc = kiln("compile", EXAMPLE, "--spec", write(tmp_path, text), "--no-build",
                "-o", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kiln: error: {tmp_path / where}"), lines
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(tmp_path):
    spec = write(tmp_path, CASES["unknown top-level key"][0])
    proc = kiln("--debug", "plan", EXAMPLE, "--spec", spec)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "SpecError" in proc.stderr


def test_unknown_target_in_spec_fails_before_any_work(tmp_path, capsys):
    spec = write(tmp_path, "kiln: 1\nname: edge\ntarget: arm46\n")
    out = tmp_path / "out"
    code = main(["compile", EXAMPLE, "--spec", spec, "--no-build", "-o", str(out)])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert line.startswith(f"kiln: error: {spec}:3 target: unknown target 'arm46' "
                           "(did you mean 'arm64'?)"), line
    assert not out.exists()


def test_unknown_target_option(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["compile", EXAMPLE, "--target", "hots", "-o", str(out)])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert line.startswith("kiln: error: --target: unknown target 'hots' (did you mean 'host'?)")
    assert not out.exists()


def test_wrong_tag_of_a_tagged_union_points_at_the_tag(tmp_path, capsys):
    spec = write(tmp_path, "kiln: 1\npasses:\n  - quantize:\n      weights:\n"
                           "        granularity: per_channel\n        dtype: int5\n")
    message = plan_error(capsys, spec)
    assert message.startswith(f"{spec}:6 passes[0].quantize.weights.dtype: "), message
    assert "'int5' is not one of 'int8', 'int4'" in message and "Input tag" not in message
