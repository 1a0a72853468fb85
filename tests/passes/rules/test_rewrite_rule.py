"""Rewrite rules in the spec (``rules:``) and the rewrite_rule pass: matching (variables,
constants, commutative inputs, shared intermediates, attributes, closed matches), conditions,
plan, numeric verification (a wrong exact rule is refused), lossy rules with a budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.compiler.driver.cli import main
from kiln.compiler.testing.passcheck import check_pass
from kiln.passes.rules.rewrite_rule import RewriteRule, RewriteRuleConfig

DROP_MUL_ONE = dict(
    pattern="pattern (float[N] x, float one) => (float[N] y) { y = Mul (x, one) }",
    replacement="replacement (float[N] x) => (float[N] y) { y = Identity (x) }",
    where={"one": {"constant": True, "value": 1.0}})

DOUBLE_RELU = dict(
    pattern="p (float[N] x) => (float[N] y) { t = Relu (x) \n y = Add (t, t) }",
    replacement="r (float[N] x) => (float[N] y) {\n"
                "  two = Constant <value = float {2.0}> ()\n  t = Relu (x)\n  y = Mul (t, two) }")


def _model(nodes, inits=None, shape=(4, 8)) -> ir.Model:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.asarray(v, np.float32), k)
                     for k, v in (inits or {}).items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


def _ops(model) -> list[str]:
    return [n.op_type for n in model.graph]


def test_variables_constants_and_either_input_order():
    model = _model([helper.make_node("Mul", ["one", "x"], ["a"], name="m1"),
                    helper.make_node("Relu", ["a"], ["b"], name="r"),
                    helper.make_node("Mul", ["b", "one"], ["y"], name="m2")], {"one": 1.0})
    check = check_pass(RewriteRule(RewriteRuleConfig(**DROP_MUL_ONE)), model)
    assert check.rewritten == 2
    assert _ops(model) == ["Identity", "Relu", "Identity"]


def test_conditions_refuse_with_the_reason():
    model = _model([helper.make_node("Mul", ["x", "two"], ["y"], name="m")], {"two": 2.0})
    check = check_pass(RewriteRule(RewriteRuleConfig(**DROP_MUL_ONE)), model)
    assert not check.modified
    assert [c.reason for c in check.candidates] == ["one is not 1.0 everywhere"]


def test_an_intermediate_read_twice_and_a_constant_in_the_replacement():
    model = _model([helper.make_node("Relu", ["x"], ["t"], name="relu"),
                    helper.make_node("Add", ["t", "t"], ["y"], name="add")])
    check = check_pass(RewriteRule(RewriteRuleConfig(**DOUBLE_RELU)), model)
    assert check.rewritten == 1 and _ops(model) == ["Constant", "Relu", "Mul"]


def test_attributes_must_match_and_matches_must_be_closed():
    rule = RewriteRuleConfig(
        pattern="p (float[N] x) => (float[N] y) { t = Transpose <perm = [1, 0]> (x) \n"
                "y = Transpose <perm = [1, 0]> (t) }",
        replacement="r (float[N] x) => (float[N] y) { y = Identity (x) }")
    same = _model([helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]),
                   helper.make_node("Transpose", ["t"], ["y"], perm=[1, 0])])
    assert check_pass(RewriteRule(rule), same).rewritten == 1
    # t also feeds an Add: replacing the pair would lose it
    shared = _model([helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]),
                     helper.make_node("Transpose", ["t"], ["u"], perm=[1, 0]),
                     helper.make_node("Transpose", ["t"], ["v"], perm=[1, 0]),
                     helper.make_node("Add", ["u", "v"], ["y"])])
    assert check_pass(RewriteRule(rule), shared).rewritten == 0
    other = _model([helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]),
                    helper.make_node("Identity", ["t"], ["y"])], shape=(8, 8))
    assert check_pass(RewriteRule(rule), other).rewritten == 0


@pytest.mark.parametrize("fields, message", [
    (dict(pattern="not a graph", replacement=DROP_MUL_ONE["replacement"]),
     "pattern is not an ONNX graph in textual syntax"),
    (dict(pattern=DROP_MUL_ONE["pattern"],
          replacement="r (float[N] z) => (float[N] y) { y = Identity (z) }"),
     "the replacement reads ['z'], which the pattern does not bind"),
    (dict(DROP_MUL_ONE, where={"two": {"constant": True}}), "where: ['two'] are not inputs"),
    (dict(pattern="p (float[N] x) => (float[N] y) { y = Relu (q) }",
          replacement=DROP_MUL_ONE["replacement"]),
     "value 'q' is read by Relu but is not an input"),
])
def test_bad_rules_are_refused_with_the_reason(fields, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        RewriteRuleConfig(**fields)


def _spec(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text("kiln: 1\n" + body)
    return path


RULES = """\
rules:
  - name: drop-mul-one
    pattern: |
      pattern (float[N] x, float one) => (float[N] y) {
        y = Mul (x, one)
      }
    replacement: |
      replacement (float[N] x) => (float[N] y) { y = Identity (x) }
    where: {one: {constant: true, value: 1.0}}
"""


@pytest.fixture
def mul_model(tmp_path) -> Path:
    model = _model([helper.make_node("Mul", ["x", "one"], ["a"], name="m1"),
                    helper.make_node("Mul", ["a", "two"], ["y"], name="m2")],
                   {"one": 1.0, "two": 2.0})
    path = tmp_path / "model.onnx"
    ir.save(model, path)
    return path


def test_spec_rules_in_plan_and_compile(tmp_path, mul_model, capsys):
    spec = _spec(tmp_path, RULES + "passes: []\n")
    assert main(["plan", str(mul_model), "--spec", str(spec)]) == 0
    text = capsys.readouterr().out
    assert "rule:drop-mul-one" in text and "+ m1" in text
    assert "- m2" in text and "one is not 1.0 everywhere" in text
    out = tmp_path / "out"
    assert main(["compile", str(mul_model), "--spec", str(spec), "--no-build", "-q",
                 "-o", str(out)]) == 0
    assert [n.op_type for n in onnx.load(out / "model.onnx").graph.node] == ["Identity", "Mul"]


def test_a_wrong_exact_rule_is_caught_by_verification(tmp_path, capsys):
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="relu")])
    path = tmp_path / "relu.onnx"
    ir.save(model, path)
    spec = _spec(tmp_path, "rules:\n  - name: wrong\n"
                 "    pattern: 'p (float[N] x) => (float[N] y) { y = Relu (x) }'\n"
                 "    replacement: 'r (float[N] x) => (float[N] y) { y = Identity (x) }'\n")
    assert main(["compile", str(path), "--spec", str(spec), "--no-build", "-q",
                 "-o", str(tmp_path / "out")]) == 2
    assert "exact pass 'rule:wrong' changed the outputs" in capsys.readouterr().err


def test_a_lossy_rule_meets_its_budget(tmp_path, capsys):
    model = _model([helper.make_node("Sigmoid", ["x"], ["y"], name="sig")])
    path = tmp_path / "sig.onnx"
    ir.save(model, path)
    spec = _spec(tmp_path, "rules:\n  - name: hard-sigmoid\n    exact: false\n"
                 "    budget: {sqnr_db: 20}\n"
                 "    pattern: 'p (float[N] x) => (float[N] y) { y = Sigmoid (x) }'\n"
                 "    replacement: 'r (float[N] x) => (float[N] y) { y = HardSigmoid "
                 "<alpha = 0.2, beta = 0.5> (x) }'\n")
    out = tmp_path / "out"
    assert main(["compile", str(path), "--spec", str(spec), "--no-build", "-q",
                 "-o", str(out)]) == 0
    import json

    (entry,) = json.loads((out / "report.json").read_text())["passes"]
    assert entry["name"] == "rule:hard-sigmoid" and 20 <= entry["sqnr_db"] < 60


def test_a_bad_rule_names_the_spec_line(tmp_path, mul_model, capsys):
    spec = _spec(tmp_path, "rules:\n  - name: broken\n    pattern: 'nope'\n"
                 "    replacement: 'r (float x) => (float y) { y = Identity (x) }'\n")
    assert main(["plan", str(mul_model), "--spec", str(spec)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"kiln: error: {spec}:3 rules[0]: rule 'broken': pattern is not"), line


def test_rewrite_rule_as_a_pass_item(tmp_path, mul_model):
    spec = _spec(tmp_path, "passes:\n  - rewrite_rule:\n      name: drop\n"
                 f"      pattern: '{DROP_MUL_ONE['pattern']}'\n"
                 f"      replacement: '{DROP_MUL_ONE['replacement']}'\n"
                 "      where: {one: {value: 1}}\n")
    out = tmp_path / "out"
    assert main(["compile", str(mul_model), "--spec", str(spec), "--no-build", "-q",
                 "-o", str(out)]) == 0
    assert [n.op_type for n in onnx.load(out / "model.onnx").graph.node] == ["Identity", "Mul"]
