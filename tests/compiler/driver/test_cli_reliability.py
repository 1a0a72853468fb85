"""Reliability of the CLI (issue 15, items 4-6): every bad spec or CLI input is refused in one
or two lines with exit code 2 (no traceback, no hang), setup stays quiet and light, and the
CLI answers the flags people expect. Small graphs only: nothing here builds a big model."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from kiln.compiler.core.spec.located_yaml import MAX_DEPTH, MAX_VALUES
from kiln.compiler.driver.cli import main

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = str(REPO / "compiler" / "core" / "examples" / "tiny_cnn.onnx")


def relu_model(path: Path, dims, opset: int = 17) -> str:
    """y = Relu(x) with input dims ``dims`` (a string dim is dynamic)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, path)
    return str(path)


def refused(capsys, *argv: str, max_lines: int = 2) -> str:
    """Run the CLI: exit 2, at most ``max_lines`` lines on stderr, no traceback."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert 1 <= len(lines) <= max_lines, err
    assert lines[0].startswith("kiln: error: "), err
    return err.strip()[len("kiln: error: "):]


def spec_file(tmp_path: Path, text: str, name: str = "spec.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# ---- YAML that must not be expanded --------------------------------------------------------

def billion_laughs(levels: int = 9) -> str:
    lines = ["kiln: 1", 'l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_before_expansion(tmp_path, capsys):
    text = billion_laughs()
    assert len(text.encode()) < 1024                   # ~9^9 values once expanded
    started = time.perf_counter()
    message = refused(capsys, "plan", EXAMPLE, "--spec", spec_file(tmp_path, text))
    assert time.perf_counter() - started < 10
    assert "spec.yaml:3:" in message and f"more than {MAX_VALUES} values" in message


def test_small_aliases_still_load(tmp_path, capsys):
    text = ("kiln: 1\ninputs:\n  x: &shape [1, 3, 32, 32]\npasses:\n"
            "  - fold_batchnorm: {select: {op: &ops [Conv]}}\n"
            "  - dedupe_weights: {select: {op: *ops}}\n")
    assert main(["plan", EXAMPLE, "--spec", spec_file(tmp_path, text)]) == 0


def test_a_recursive_alias_is_refused(tmp_path, capsys):
    message = refused(capsys, "plan", EXAMPLE, "--spec",
                      spec_file(tmp_path, "kiln: 1\na: &a [1, *a]\n"))
    assert "spec.yaml:2:" in message and "refers to the node that contains it" in message


@pytest.mark.parametrize("opener", ["[", "{a: "])
def test_deep_nesting_is_refused_without_recursion_error(tmp_path, capsys, opener):
    text = "kiln: 1\nx: " + opener * 20000 + "\n"
    message = refused(capsys, "plan", EXAMPLE, "--spec", spec_file(tmp_path, text))
    assert "spec.yaml:2:" in message and f"nested deeper than {MAX_DEPTH} levels" in message


def test_aliases_that_nest_too_deep_once_expanded(tmp_path, capsys):
    # each anchor is 40 levels deep; chained, they would be 40 * 5 levels
    lines = ["kiln: 1", "a0: &a0 " + "[" * 40 + "1" + "]" * 40]
    for i in range(1, 5):
        lines.append(f"a{i}: &a{i} " + "[" * 40 + f"*a{i - 1}" + "]" * 40)
    message = refused(capsys, "plan", EXAMPLE, "--spec",
                      spec_file(tmp_path, "\n".join(lines) + "\n"))
    assert "aliases expand to nesting deeper" in message


# ---- input dims ----------------------------------------------------------------------------

@pytest.mark.parametrize("dim", ["1099511627776", "1.0e+20", "100000000000000000000"])
def test_input_dims_beyond_memory_name_file_key_and_input(tmp_path, capsys, dim):
    model = relu_model(tmp_path / "dyn.onnx", ["N", 3, 16, 16])
    spec = spec_file(tmp_path, f"kiln: 1\ninputs: {{x: [{dim}, 3, 16, 16]}}\n")
    message = refused(capsys, "compile", model, "--spec", spec, "--no-build")
    assert message.startswith(f"{spec}:2 inputs.x"), message


def test_huge_input_binding_on_the_command_line(tmp_path, capsys):
    model = relu_model(tmp_path / "dyn.onnx", ["N", 3, 16, 16])
    message = refused(capsys, "compile", model, "--input", "x=1099511627776x3x16x16", "--no-build")
    assert "--input 'x=1099511627776x3x16x16'" in message and "memory" in message


def test_dynamic_input_without_binding_names_input_not_a_spec_key(tmp_path, capsys):
    model = relu_model(tmp_path / "dyn.onnx", ["N", 4])
    for argv in (["--spec", "reparam"], []):
        message = refused(capsys, "compile", model, *argv, "--no-build")
        assert "input 'x'" in message and "--input x=" in message
        assert "calibration" not in message and "reparam.yaml" not in message


# ---- other bad CLI input -------------------------------------------------------------------

@pytest.mark.parametrize("command", ["compile", "plan"])
def test_empty_spec_argument_is_refused(capsys, command):
    message = refused(capsys, command, EXAMPLE, "--spec", "")
    assert "--spec" in message and "empty" in message


def test_opset_too_new_does_not_print_ort_source_paths(tmp_path, capsys):
    model = relu_model(tmp_path / "new.onnx", [2, 4], opset=40)
    message = refused(capsys, "compile", model, "--no-build")
    assert "opset" in message
    assert "onnxruntime_src" not in message and ".h:" not in message and "::" not in message


def test_ort_message_keeps_the_sentence_only():
    from kiln.backends.ort import ort_message

    raw = ("[ONNXRuntimeError] : 1 : FAIL : /onnxruntime_src/core/graph/x.h:46 void "
           "onnxruntime::f(const std::map<a, b>&, bool) Opset 40 is under development.\nmore")
    assert ort_message(raw) == "Opset 40 is under development."
    assert ort_message("[ONNXRuntimeError] : 10 : INVALID_GRAPH : bad node") == "bad node"


# ---- setup ---------------------------------------------------------------------------------

def test_tuning_without_xgboost_names_the_extra(monkeypatch):
    from kiln.backends.tvm.tuning import tune
    from kiln.compiler.core.errors import KilnError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "xgboost" else real(name, *a))
    with pytest.raises(KilnError, match=r"kiln\[tune\]"):
        tune.require_xgboost()


def test_input_size_check_is_exact_at_the_limit(monkeypatch):
    from kiln.compiler.core.spec import schema

    monkeypatch.setattr(schema, "_machine_memory", lambda: 4 * 1000)
    assert schema.check_input_size([10, 100]) == [10, 100]
    with pytest.raises(ValueError, match="more than this machine's memory"):
        schema.check_input_size([10, 101])
