"""Reliability of the CLI (issue 15, items 4-6): every bad spec or CLI input is refused in one
or two lines with exit code 2 (no traceback, no hang), setup stays quiet and light, and the
CLI answers the flags people expect. Small graphs only: nothing here builds a big model."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from kiln.compiler.core.spec.located_yaml import MAX_DEPTH, MAX_VALUES
from kiln.compiler.driver.cli import main

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = str(REPO / "compiler" / "core" / "examples" / "tiny_cnn.onnx")
#: specs/reparam.yaml's passes, in order
REPARAM_PASSES = ["fold_parametrization", "merge_lora", "merge_branches", "dedupe_weights",
                  "fold_batchnorm"]


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


# ---- the CLI people expect -----------------------------------------------------------------

def test_version(capsys):
    from kiln.compiler.core.version import kiln_version

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"kiln {kiln_version()}"


@pytest.mark.parametrize("flag", ["--debug", "-v", "-vv", "--verbose", "-q"])
def test_common_flags_before_and_after_the_subcommand(capsys, flag):
    assert main([flag, "specs"]) == 0
    assert main(["specs", flag]) == 0


def test_debug_after_the_subcommand_shows_the_traceback():
    from kiln.compiler.core.errors import SpecError

    with pytest.raises(SpecError):
        main(["plan", EXAMPLE, "--spec", "no-such-spec", "--debug"])


def _actions(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((f"{name} {a}", h) for a, h in _actions(sub))
        else:
            yield "/".join(action.option_strings) or action.dest, action.help


def test_every_argument_has_help_without_rst_markup():
    from kiln.compiler.driver.cli import build_parser

    parser = build_parser()
    seen = list(_actions(parser))
    assert len(seen) > 30
    for name, text in seen:
        assert text, f"{name}: no help text"
        assert "``" not in text, f"{name}: RST backticks in help"
    assert "``" not in parser.format_help()


@pytest.mark.parametrize("command", ["compile", "plan", "run", "passes", "specs", "schema"])
def test_every_command_help_has_examples(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and f"kiln {command}" in text.split("examples:")[1]
    assert "``" not in text


def test_passes_shows_full_option_types(capsys):
    assert main(["passes", "quantize"]) == 0
    out = capsys.readouterr().out
    assert "weights: IntWeights | FloatWeights | PowerWeights | CodebookWeights" in out
    assert "clip: 'none' | 'mse_search' = 'none'" in out          # a Literal, under IntWeights
    assert "Union" not in out and "Literal" not in out and "``" not in out
    assert main(["passes"]) == 0
    listing = capsys.readouterr().out
    assert "fold_batchnorm (exact)" in listing and "IntWeights:" not in listing


def test_option_types_from_json_schema():
    from kiln.compiler.driver.option_types import type_text

    assert type_text({"type": "array", "items": {"type": "integer"}}) == "list[int]"
    assert type_text({"anyOf": [{"type": "boolean"}, {"type": "null"}]}) == "bool | None"
    assert type_text({"enum": ["a", "b"], "type": "string"}) == "'a' | 'b'"
    assert type_text({"type": "object", "additionalProperties": {"type": "number"}}) == \
        "dict[str, float]"
    assert type_text({"$ref": "#/$defs/PerGroup"}) == "PerGroup"


def test_passes_unknown_name(capsys):
    message = refused(capsys, "passes", "quantise")
    assert "did you mean 'quantize'" in message


def test_passes_json(capsys):
    assert main(["passes", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    quantize = next(p for p in listing if p["name"] == "quantize")
    assert quantize["exact"] is False and "weights" in quantize["options"]["properties"]


def test_specs_lists_and_prints_builtins(capsys):
    from kiln.compiler.core.spec import builtin_specs

    assert main(["specs"]) == 0
    out = capsys.readouterr().out
    for name in builtin_specs():
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
    assert "Static W8A8" in out
    assert main(["specs", "int8"]) == 0
    assert capsys.readouterr().out == (REPO / "specs" / "int8.yaml").read_text()
    assert main(["specs", "--json"]) == 0
    assert {r["name"] for r in json.loads(capsys.readouterr().out)} == set(builtin_specs())
    assert "did you mean 'int8'" in refused(capsys, "specs", "int9")


def test_plan_json(capsys):
    assert main(["plan", EXAMPLE, "--spec", "reparam", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [p["pass"] for p in plan] == REPARAM_PASSES
    fold = plan[REPARAM_PASSES.index("fold_batchnorm")]
    assert fold["rewrites"] and all({"node", "reason"} <= set(r) for r in fold["refuses"])


def test_compile_json_summary(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compile", EXAMPLE, "--spec", "reparam", "--no-build", "-o", str(out),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["files"] == ["model.onnx", "report.json"]
    assert [p["name"] for p in summary["report"]["passes"]] == REPARAM_PASSES


def test_summary_fits_80_columns(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["compile", EXAMPLE, "--spec", "reparam", "--no-build"]) == 0
    out = capsys.readouterr().out
    assert max(len(line.rstrip()) for line in out.splitlines()) <= 80, out
    assert "weight bytes" in out and "fold_batchnorm" in out
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["compile", EXAMPLE, "--spec", "reparam", "--no-build"]) == 0
    wide = capsys.readouterr().out
    assert "┃ pass" in wide or "| pass" in wide or "pass " in wide.splitlines()[1]


def test_plain_progress_prints_slow_steps_as_they_happen(monkeypatch):
    import io

    from kiln.compiler.driver.console import PlainProgress

    monkeypatch.setattr(PlainProgress, "SLOW_SECONDS", 0.05)
    stream = io.StringIO()
    say = PlainProgress(stream)
    say("loading model")
    say("reference run")                 # quick: nothing printed for loading model
    time.sleep(0.3)
    assert stream.getvalue() == "kiln: reference run ...\n"     # printed while it runs
    say("build: tune (1/8)")
    time.sleep(0.3)
    for done in range(2, 9):
        say(f"build: tune ({done}/8)")
    say.close()
    lines = stream.getvalue().splitlines()
    assert lines[1].startswith("kiln: reference run: 0.") and lines[1].endswith(" s")
    assert lines[2] == "kiln: build: tune (1/8)" and "kiln: build: tune (8/8)" in lines
    assert lines[-1].startswith("kiln: build: tune: ")
    assert len(lines) < 10                                       # counters are thinned


def test_quiet_silences_tvm_native_logging(tmp_path):
    import subprocess
    import sys

    model = relu_model(tmp_path / "relu.onnx", [2, 4])
    target = json.dumps({"kind": "llvm", "mattr": ["+bogusfeat"]})  # LLVM warns per kernel
    argv = [sys.executable, "-m", "kiln.compiler.driver.cli", "compile", model, "--target",
            target, "-o", str(tmp_path / "out")]
    loud = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert loud.returncode == 0 and "'+bogusfeat' is not a recognized" in loud.stderr  # native
    quiet = subprocess.run(argv + ["-q"], capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == "" and quiet.stderr == ""


def test_native_silencing_restores_stderr(capfd):
    import os

    from kiln.compiler.driver.console import native_output_silenced

    with native_output_silenced():
        os.write(2, b"native noise\n")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"


# ---- arm64 libraries are stripped ----------------------------------------------------------

def _sections(library: Path) -> set[str]:
    data = library.read_bytes()
    return {name for name in (".symtab", ".strtab", ".dynsym") if name.encode() in data}


def _dynamic_symbols(library: Path) -> list[str]:
    import subprocess

    nm = subprocess.run(["aarch64-linux-gnu-nm", "-D", "--defined-only", str(library)],
                        capture_output=True, text=True, check=True)
    return sorted(line.split()[-1] for line in nm.stdout.splitlines() if line.strip())


@pytest.mark.skipif(__import__("shutil").which("aarch64-linux-gnu-strip") is None,
                    reason="no arm64 cross toolchain (tools/edge/install_cross.sh)")
def test_arm64_library_is_stripped_unless_keep_symbols(tmp_path, capsys):
    model = relu_model(tmp_path / "relu.onnx", [2, 4])
    stripped, kept = tmp_path / "stripped", tmp_path / "kept"
    assert main(["compile", model, "--target", "arm64", "-o", str(stripped), "-q"]) == 0
    assert main(["compile", model, "--target", "arm64", "-o", str(kept), "-q",
                 "--keep-symbols"]) == 0
    small, big = stripped / "model.so", kept / "model.so"
    assert _sections(small) == {".dynsym"} and {".symtab", ".dynsym"} <= _sections(big)
    assert small.stat().st_size < big.stat().st_size
    # what the runtime looks up (dlsym) is all still there
    assert _dynamic_symbols(small) == _dynamic_symbols(big) != []
    # the manifest's hash is of the stripped file that ships
    manifest = json.loads((stripped / "manifest.json").read_text())
    assert small.name in json.dumps(manifest)


def test_keep_symbols_in_the_spec_loads_and_round_trips(tmp_path):
    from kiln.compiler.core.spec import dump_spec
    from kiln.compiler.driver.specs import load_spec, spec_from_text

    spec = load_spec(spec_file(tmp_path, "kiln: 1\noutput: {keep_symbols: true}\n"))
    assert spec.output.keep_symbols is True
    assert spec_from_text(dump_spec(spec), file=spec.source) == spec


def test_empty_spec_name_in_python():
    from kiln.compiler.core.errors import SpecError
    from kiln.compiler.driver.specs import load_spec

    with pytest.raises(SpecError, match="empty spec name"):
        load_spec("")


def test_terminal_progress_is_a_live_bar(monkeypatch):
    import io

    from rich.console import Console

    from kiln.compiler.driver import console as console_module

    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, width=80)
    monkeypatch.setattr(console_module, "make_console", lambda stderr=False: terminal)
    with console_module.progress("auto") as say:
        assert not isinstance(say, console_module.PlainProgress)
        say("loading model")
        for done in range(1, 5):
            say(f"build: tune ({done}/4)")
    shown = screen.getvalue()
    assert "\x1b[" in shown and "build: tune" in shown        # drawn live, with escapes
    assert "4/4" in shown                                    # a determinate bar for counters
    with console_module.progress("off") as say:
        say("loading model")                                 # prints nothing anywhere


def test_deeply_nested_target_json(capsys):
    message = refused(capsys, "compile", EXAMPLE, "--target", "{\"a\": " + "[" * 100000)
    assert message.startswith("--target:")


def test_run_quiet_prints_nothing(tmp_path, capsys):
    model = relu_model(tmp_path / "relu.onnx", [2, 4])
    out = tmp_path / "out"
    assert main(["compile", model, "--target", "host", "-o", str(out), "-q"]) == 0
    inputs = tmp_path / "in.npz"
    np.savez(inputs, x=np.ones((2, 4), np.float32))
    capsys.readouterr()
    assert main(["run", str(out), "--inputs", str(inputs), "--output",
                 str(tmp_path / "y.npz"), "-q"]) == 0
    assert capsys.readouterr() == ("", "")
    assert np.load(tmp_path / "y.npz")[np.load(tmp_path / "y.npz").files[0]].shape == (2, 4)


# ---- make setup's apt step -----------------------------------------------------------------

INSTALL_CROSS = REPO / "tools" / "edge" / "install_cross.sh"


def _install_cross(tmp_path, tools: dict[str, str], **env) -> tuple[int, str]:
    """Run install_cross.sh with PATH holding only ``tools`` (name -> script body)."""
    import shutil
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in tools.items():
        tool = bin_dir / name
        tool.write_text("#!/bin/sh\n" + body + "\n")
        tool.chmod(0o755)
    done = subprocess.run([shutil.which("bash"), str(INSTALL_CROSS)], capture_output=True,
                          text=True, timeout=60, env={"PATH": str(bin_dir), **env})
    return done.returncode, done.stderr


def test_install_cross_skips_without_root_and_says_what_to_run(tmp_path):
    calls = tmp_path / "apt-calls"
    code, err = _install_cross(tmp_path, {"id": "echo 1000",
                                          "apt-get": f"echo \"$@\" >> {calls}"})
    assert code == 0 and "skipped (not root" in err
    assert "apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross" in err
    assert not calls.exists()                                 # apt-get never ran


def test_install_cross_says_what_it_installs_as_root(tmp_path):
    calls = tmp_path / "apt-calls"
    code, err = _install_cross(tmp_path, {"id": "echo 0",
                                          "apt-get": f"echo \"$@\" >> {calls}"})
    assert code == 0
    assert "installing the arm64 cross toolchain with apt-get: gcc-aarch64-linux-gnu" in err
    assert "install -y -qq --no-install-recommends gcc-aarch64-linux-gnu" in calls.read_text()


def test_install_cross_opt_out(tmp_path):
    calls = tmp_path / "apt-calls"
    code, err = _install_cross(tmp_path, {"id": "echo 0", "apt-get": f"echo x >> {calls}"},
                               KILN_NO_APT="1")
    assert code == 0 and "KILN_NO_APT=1" in err and not calls.exists()


def test_samples_that_cannot_be_held_in_memory(tmp_path, capsys, monkeypatch):
    from kiln.compiler.core.spec import schema

    monkeypatch.setattr(schema, "_machine_memory", lambda: 1 << 30)         # 1 GiB
    model = relu_model(tmp_path / "dyn.onnx", ["N", 3, 256, 256])            # 768 KiB/sample
    spec = spec_file(tmp_path, "kiln: 1\ninputs: {x: [1, 3, 256, 256]}\n"
                               "calibration:\n  samples: 2000\n")
    message = refused(capsys, "plan", model, "--spec", spec)
    assert message.startswith(f"{spec}:4 calibration.samples: 2000 samples"), message
    fits = spec_file(tmp_path, "kiln: 1\ninputs: {x: [1, 3, 256, 256]}\nverify: {samples: 8}\n",
                     name="fits.yaml")
    assert main(["plan", model, "--spec", fits]) == 0


def test_verbose_prints_every_step(capsys):
    assert main(["compile", EXAMPLE, "--spec", "reparam", "--no-build", "-v"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert "kiln: loading model ..." in err and "kiln: pass fold_batchnorm ..." in err
    assert any(line.startswith("kiln: pass fold_batchnorm: ") for line in err)
    assert main(["compile", EXAMPLE, "--spec", "reparam", "--no-build"]) == 0
    assert "kiln: pass fold_batchnorm ..." not in capsys.readouterr().err   # quick: no line
