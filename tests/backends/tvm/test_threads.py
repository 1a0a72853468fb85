"""threads.py's pool sizing: TVM's pool gets the physical cores this process may run on."""

from __future__ import annotations

import os
import subprocess
import sys

from kiln.backends.tvm.threads import physical_cores


def _fake_topology(root, cores_of_cpus):
    for cpu, (package, core) in enumerate(cores_of_cpus):
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")


def test_physical_cores_counts_hardware_threads_of_a_core_once(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    _fake_topology(tmp_path, [(0, 0), (0, 0), (0, 1), (0, 1)])   # 2 cores with SMT
    assert physical_cores(tmp_path) == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2})
    assert physical_cores(tmp_path) == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert physical_cores(tmp_path) == 1


def test_physical_cores_without_topology_is_none(tmp_path):
    assert physical_cores(tmp_path / "missing") is None


def _pool_in_fresh_process(env):
    code = ("import kiln.backends.tvm, tvm; from kiln.backends.tvm.threads import configure_pool;"
            "print(configure_pool(4096))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[-1])


def test_pool_holds_every_physical_core_unless_the_user_says():
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    # TVM alone takes half the logical CPUs on x86: 1 of 2 cores without SMT
    assert _pool_in_fresh_process(env) == (physical_cores() or 1)
    assert _pool_in_fresh_process({**env, "TVM_NUM_THREADS": "1"}) == 1
