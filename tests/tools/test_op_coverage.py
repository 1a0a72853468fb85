"""tools/op_coverage.py: docs/op-coverage.md from a run's JSON lines, with cases rerun
after the run (``--rerun FILE@COMMIT``) merged in place of the run's outcomes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from kiln.compiler.testing.conformance import Outcome

TOOL = Path(__file__).resolve().parents[2] / "tools" / "op_coverage.py"
FIGURES = ["headline", "all-opsets", "extended"]


@pytest.fixture(scope="module")
def op_coverage():
    spec = importlib.util.spec_from_file_location("op_coverage", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["op_coverage"] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    yield module
    del sys.modules["op_coverage"]


def _write(path: Path, outcomes: list[Outcome]) -> str:
    path.write_text("".join(o.to_json() + "\n" for o in outcomes))
    return str(path)


def _outcome(name: str, op: str, outcome: str, reason: str = "") -> Outcome:
    return Outcome(name=name, op=op, kind="node", outcome=outcome, reason=reason, ort="pass",
                   figures=list(FIGURES))


def test_a_rerun_replaces_the_runs_outcomes_of_its_cases(op_coverage, tmp_path):
    # names that are no real case keep the figures written in the file
    run = [_outcome("case_abs", "Abs", "pass"),
           _outcome("case_pad_1", "Pad", "refused", "dynamic pads"),
           _outcome("case_pad_2", "Pad", "refused", "dynamic pads")]
    rerun = [_outcome("case_pad_1", "Pad", "pass"), _outcome("case_pad_2", "Pad", "pass")]
    out = tmp_path / "coverage.out"
    assert op_coverage.main(["--from", _write(tmp_path / "run.jsonl", run),
                             "--rerun", _write(tmp_path / "pad.jsonl", rerun) + "@abc1234",
                             "--commit", "fff0000", "--out", str(out),
                             "--note", "Earlier: 1 of 3 at abc0000."]) == 0
    text = out.read_text()
    assert "at commit fff0000" in text and "\nEarlier: 1 of 3 at abc0000.\n" in text
    assert "Merged after the full run" in text and "2 cases of Pad rerun at commit abc1234" in text
    assert "| Pad | 2 | 2 | 0 | 0 | 0 |  |" in text
    assert "| 3 | **3 (100.0%)** | 0 | 0 | 0 |" in text and "dynamic pads" not in text


def test_later_reruns_win_and_new_cases_are_added(op_coverage):
    first = op_coverage.Rerun([_outcome("a", "Pad", "refused", "x")], "c1")
    second = op_coverage.Rerun([_outcome("a", "Pad", "pass"), _outcome("b", "Pad", "wrong")],
                               "c2")
    merged = op_coverage.merge([_outcome("a", "Pad", "crash"), _outcome("z", "Abs", "pass")],
                               [first, second])
    assert [(o.name, o.outcome) for o in merged] == [("a", "pass"), ("z", "pass"),
                                                     ("b", "wrong")]


def test_the_per_op_table_names_the_kernels_left_unscheduled(op_coverage, tmp_path):
    nms = [_outcome(f"case_nms_{n}", "NonMaxSuppression", "pass") for n in range(3)]
    for o in nms[:2]:
        o.unscheduled = ["kiln_nms"]
    nms[0].unscheduled.append("take")
    old_line = ('{"name": "case_abs", "op": "Abs", "kind": "node", "outcome": "pass", '
                '"reason": "", "ort": "pass", "seconds": 0.1, "figures": '
                '["headline", "all-opsets", "extended"]}\n')  # a run from before the field
    run = tmp_path / "run.jsonl"
    run.write_text("".join(o.to_json() + "\n" for o in nms) + old_line)
    out = tmp_path / "coverage.out"
    assert op_coverage.main(["--from", str(run), "--commit", "fff0000", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| main reason | unscheduled |" in text
    assert "| NonMaxSuppression | 3 | 3 | 0 | 0 | 0 |  | kiln_nms (2), take (1) |" in text
    assert "| Abs | 1 | 1 | 0 | 0 | 0 |  |  |" in text
