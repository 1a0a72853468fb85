"""Tuning database: records are saved per target, reloaded by later builds and applied.

By default one small case runs (a 4-trial matmul in kiln's space, ~50 s on 2 cores);
tuning convs, other spaces, ``bench.tune --recheck`` (~30 s) and whole models is slow
(KILN_SLOW=1).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.tvm.build import build_artifact
from kiln.backends.tvm.importer import lower_to_relax
from kiln.backends.tvm.runtime import load
from kiln.backends.tvm.targets import resolve_target
from kiln.backends.tvm.tuning.database import (
    RECORD_FILE,
    TUNED_RULE,
    WORKLOAD_FILE,
    database_dirs,
    target_key,
)
from kiln.backends.tvm.tuning.space import RULE_ANNOTATION
from kiln.backends.tvm.tuning.tune import tune_relax_module
from kiln.compiler.core.metrics import relative_error
from kiln.compiler.testing.reference import ort_outputs

# fp32 results may differ from numpy / ONNX Runtime only by summation order.
RTOL = 1e-5


def _matmul(m: int = 32, k: int = 64, n: int = 64) -> tuple[ir.Model, np.ndarray]:
    weight = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        initializer=[numpy_helper.from_array(weight, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.serde.deserialize_model(proto), weight


def _conv(c: int = 16, hw: int = 12) -> ir.Model:
    """Conv 3x3 (c -> 2c channels, padded) + Relu, input [1, c, hw, hw]."""
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((2 * c, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
    bias = rng.standard_normal(2 * c).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["y"])], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2 * c, hw, hw])],
        initializer=[numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.serde.deserialize_model(proto)


def _assert_matches_onnxruntime(model: ir.Model, artifact: Path, x: np.ndarray) -> None:
    out = load(artifact)(x)
    out = np.asarray(out[0] if isinstance(out, (list, tuple)) else out)
    (want,) = ort_outputs(model, {"x": x})
    assert relative_error(out, want) < RTOL


def _records(path: Path) -> list[str]:
    return [line for line in (path / RECORD_FILE).read_text().splitlines() if line.strip()]


def test_target_keys_name_the_cpu():
    assert target_key({"kind": "llvm", "mcpu": "znver4"}) == "llvm-znver4"
    assert target_key(resolve_target("x86-64-v3")) == "llvm-x86-64-v3"
    assert target_key(resolve_target("arm64")) == "llvm-aarch64"
    assert target_key({"kind": "cuda", "arch": "sm_90"}) == "cuda-sm_90"


def test_shipped_records_stand_in_only_for_the_same_vector_width(tmp_path):
    shipped = tmp_path / "shipped"
    (shipped / "llvm-znver4").mkdir(parents=True)
    (shipped / "llvm-znver4" / RECORD_FILE).write_text("[]\n")
    user = tmp_path / "user"
    avx512 = database_dirs(resolve_target({"kind": "llvm", "mcpu": "skylake-avx512"}), user,
                           shipped_root=shipped)
    assert avx512 == [shipped / "llvm-znver4"]
    avx2 = database_dirs(resolve_target("x86-64-v3"), user, shipped_root=shipped)
    assert avx2 == []


def test_records_of_kiln_rules_are_saved_reloaded_and_applied(tmp_path):
    model, _ = _matmul()
    target = resolve_target("host")
    db_root = tmp_path / "db"
    mod = lower_to_relax(model, target_name=target.name)
    seen = []
    summary = tune_relax_module(mod, target, trials=4, tuning_db=db_root, keep_slower=True,
                                space="kiln",
                                progress=lambda step, done, total: seen.append((done, total)))
    assert summary.tasks == 1 and list(summary.kept) == ["matmul"]
    assert summary.origin == {"matmul": "kiln"}
    assert seen[0] == (0, 4) and seen[-1] == (4, 4)
    db_dir = db_root / target_key(target)
    assert len(_records(db_dir)) == 1
    record = _records(db_dir)[0]
    json.loads(record)  # MetaSchedule's JSON record format
    # the trace is kiln's contraction rule with its tunable decisions (MR, K unroll)
    assert RULE_ANNOTATION in record and "SampleCategorical" in record
    assert "SamplePerfectTile" not in record  # (MetaSchedule's multi-level tiling)

    # a later build (fresh database object, read from disk) applies the record, and the
    # weight packing in kiln's trace still runs at compile time
    result = build_artifact(model, target, tmp_path / "out", model_hash="test",
                            tuning_db=db_root)
    assert result.rules == {"matmul_prepacked": TUNED_RULE}
    assert result.unscheduled == []
    assert result.tuning_dbs[0] == str(db_dir)
    x = np.random.default_rng(1).standard_normal((32, 64)).astype(np.float32)
    _assert_matches_onnxruntime(model, tmp_path / "out", x)

    # tuning again finds the record and does no trials
    again = tune_relax_module(mod, target, trials=4, tuning_db=db_root)
    assert again.already == 1 and again.tuned == 0


def test_a_build_without_records_reports_kiln_rules(tmp_path):
    model, _ = _matmul()
    result = build_artifact(model, "host", tmp_path / "out", model_hash="test",
                            tuning_db=tmp_path / "empty")
    assert result.rules == {"matmul_prepacked": "contraction"} or \
        set(result.rules.values()) == {"contraction"}
    assert result.unscheduled == []


@pytest.mark.slow
@pytest.mark.parametrize("space", ["kiln", "union", "metaschedule"])
def test_a_tuned_conv_matches_onnxruntime(tmp_path, space):
    model = _conv()
    target = resolve_target("host")
    mod = lower_to_relax(model, target_name=target.name)
    summary = tune_relax_module(mod, target, trials=16, tuning_db=tmp_path / "db",
                                keep_slower=True, space=space)
    assert summary.kept and set(summary.origin) == set(summary.kept)
    if space == "metaschedule":
        assert set(summary.origin.values()) == {"metaschedule"}
    result = build_artifact(model, target, tmp_path / "out", model_hash="test",
                            tuning_db=tmp_path / "db")
    assert TUNED_RULE in result.rules.values()
    x = np.random.default_rng(1).standard_normal((1, 16, 12, 12)).astype(np.float32)
    _assert_matches_onnxruntime(model, tmp_path / "out", x)


@pytest.mark.slow
def test_bench_tune_recheck_drops_a_record_slower_than_kiln(tmp_path, monkeypatch, capsys):
    """``python -m bench.tune --recheck`` on a record that is the unscheduled kernel."""
    from tvm.s_tir import meta_schedule as ms

    from bench import tune as bench_tune
    from bench.cases import CASES
    from kiln.backends.tvm.tuning.tune import legalized, tuning_target
    from kiln.compiler.core.frontend import load_model

    monkeypatch.setenv("TVM_NUM_THREADS", "2")
    target = resolve_target("host")
    case = CASES["matmul-fp32"](tmp_path)
    model = load_model(str(case.onnx_path), input_shapes=case.input_shapes)
    legal = legalized(lower_to_relax(model, target_name=target.name), target)
    (task,) = ms.relax_integration.extract_tasks(legal, tuning_target(target))
    db_dir = tmp_path / "db" / target_key(target)
    db_dir.mkdir(parents=True)
    database = ms.database.JSONDatabase(work_dir=str(db_dir), allow_missing=True)
    naive = tvm.s_tir.Schedule(task.dispatched[0])  # naive loops (a record needs an
    naive.get_sblock("matmul")                       # instruction to be valid)
    database.commit_tuning_record(ms.database.TuningRecord(
        naive.trace, database.commit_workload(task.dispatched[0]), [1e-6],
        tuning_target(target), ms.arg_info.ArgInfo.from_prim_func(task.dispatched[0]["main"])))
    del database
    assert len(_records(db_dir)) == 1 and (db_dir / WORKLOAD_FILE).is_file()

    assert bench_tune.main(["--recheck", "--cases", "matmul-fp32",
                            "--out", str(tmp_path / "db")]) == 0
    printed = capsys.readouterr().out
    assert '"already": 1' in printed and "dropped matmul" in printed
    assert _records(db_dir) == []


@pytest.mark.slow
def test_build_artifact_tunes_with_progress(tmp_path):
    model, weight = _matmul(64, 128, 128)
    steps = []
    result = build_artifact(model, "host", tmp_path / "out", model_hash="test", tune_trials=16,
                            tuning_db=tmp_path / "db",
                            progress=lambda step, done, total: steps.append(step))
    assert any(step.startswith("tune ") for step in steps)
    assert result.tuning is not None and result.tuning["tasks"] == 1
    x = np.ones((64, 128), np.float32)
    out = load(tmp_path / "out")(x)
    out = np.asarray(out[0] if isinstance(out, (list, tuple)) else out)
    np.testing.assert_allclose(out, x @ weight, rtol=RTOL, atol=RTOL * np.abs(x @ weight).max())
