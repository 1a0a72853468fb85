"""bench.compress_cpu_time: the issue-10 cases timed in the calling thread's CPU time."""

from __future__ import annotations

import json
import time

import pytest

from bench.compress_cpu_time import cpu_ms_per_call, main


def test_cpu_time_leaves_out_time_spent_off_the_cpu():
    calls = []
    # sleeping takes wall time, not CPU time; the warm-up call is not counted
    ms = cpu_ms_per_call(lambda: (calls.append(1), time.sleep(0.02)), runs=3)
    assert len(calls) == 4
    assert ms < 10  # the 20 ms of sleep are not in it


@pytest.mark.slow
def test_sparse_case_is_built_with_each_kernel_policy(tmp_path):
    """block-sparse-80 gets three builds (cost model, dense, all sparse) and ORT; the dense
    build's library holds the full fp32 weights, the sparse ones the packed blocks."""
    out = tmp_path / "r.json"
    assert main(["--cases", "block-sparse-80", "--runs", "1", "--rounds", "1",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["cpu_ms"]) == {"block-sparse-80:kiln", "block-sparse-80:kiln-never",
                                     "block-sparse-80:kiln-always", "block-sparse-80:ort"}
    assert all(ms > 0 for ms in result["cpu_ms"].values())
    sizes = result["built_bytes"]
    assert sizes["block-sparse-80:kiln-never"] > 3 * sizes["block-sparse-80:kiln-always"]
    assert sizes["block-sparse-80:kiln"] == sizes["block-sparse-80:kiln-always"]
