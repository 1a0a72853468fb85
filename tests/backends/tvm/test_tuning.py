"""Tuning database: records are saved per target, reloaded by later builds and applied.

One small case runs by default (a 4-trial matmul, ~40 s on 2 cores); tuning whole
models is slow (KILN_SLOW=1).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")

from kiln.backends.tvm.build import build_artifact  # noqa: E402
from kiln.backends.tvm.lower import lower_to_relax  # noqa: E402
from kiln.backends.tvm.runtime import load  # noqa: E402
from kiln.backends.tvm.targets import resolve_target  # noqa: E402
from kiln.backends.tvm.tuning import (  # noqa: E402
    RECORD_FILE,
    TUNED_RULE,
    database_dirs,
    target_key,
    tune_relax_module,
)

# fp32 results may differ from numpy only by summation order.
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


def test_records_are_saved_reloaded_and_applied(tmp_path):
    model, weight = _matmul()
    target = resolve_target("host")
    db_root = tmp_path / "db"
    mod = lower_to_relax(model, target_name=target.name)
    seen = []
    summary = tune_relax_module(mod, target, trials=4, tuning_db=db_root, keep_slower=True,
                                progress=lambda step, done, total: seen.append((done, total)))
    assert summary.tasks == 1 and list(summary.kept) == ["matmul"]
    assert seen[0] == (0, 4) and seen[-1] == (4, 4)
    db_dir = db_root / target_key(target)
    assert len(_records(db_dir)) == 1
    json.loads(_records(db_dir)[0])  # MetaSchedule's JSON record format

    # a later build (fresh database object, read from disk) applies the record
    result = build_artifact(model, target, tmp_path / "out", model_hash="test",
                            tuning_db=db_root)
    assert result.rules == {"matmul": TUNED_RULE}
    assert result.unscheduled == []
    assert result.tuning_dbs[0] == str(db_dir)
    x = np.random.default_rng(1).standard_normal((32, 64)).astype(np.float32)
    (out,) = [load(tmp_path / "out")(x)]
    out = np.asarray(out[0] if isinstance(out, (list, tuple)) else out)
    np.testing.assert_allclose(out, x @ weight, rtol=RTOL, atol=RTOL * np.abs(x @ weight).max())

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
