"""``load(outdir, threads=N)`` and ``kiln run --threads N`` set the CPU threads TVM's pool
uses, in every thread that calls the model (TVM keeps one pool per calling thread)."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import tvm

from kiln.backends.tvm import build_artifact, load
from kiln.backends.tvm.runtime import free_cores
from kiln.compiler.core.errors import KilnError
from kiln.compiler.driver.cli import main as kiln_main
from kiln.compiler.testing.onnx_models import tiny_cnn, to_ir


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_cnn")
    build_artifact(to_ir(tiny_cnn()), "host", out, model_hash="h")
    return out


def _pool_threads() -> int:
    return int(tvm.get_global_func("runtime.NumThreads")())


def test_threads_is_the_pool_size_in_every_calling_thread(artifact):
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    wide = load(artifact, threads=2)
    one = load(artifact, threads=1)
    assert one.threads == 1 and "threads=1" in repr(one)
    (want,) = wide(x)
    (got,) = one(x)
    assert _pool_threads() == 1
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    wide(x)  # the other model takes the pool back to its own count
    assert _pool_threads() == wide.threads
    seen = []
    worker = threading.Thread(target=lambda: (one(x), seen.append(_pool_threads())))
    worker.start()
    worker.join()
    assert seen == [1]


@pytest.mark.parametrize("bad", [0, -2, 1.5])
def test_threads_must_be_a_positive_count(artifact, bad):
    with pytest.raises(KilnError, match="threads="):
        load(artifact, threads=bad)


def test_default_uses_the_free_cores(artifact):
    allowed = len(os.sched_getaffinity(0))
    assert 1 <= free_cores() <= allowed
    assert 1 <= load(artifact).threads <= allowed


def test_kiln_run_threads(artifact, tmp_path):
    np.savez(tmp_path / "in.npz", x=np.zeros((1, 3, 32, 32), np.float32))
    assert kiln_main(["run", str(artifact), "--inputs", str(tmp_path / "in.npz"),
                      "--threads", "1"]) == 0
    assert _pool_threads() == 1


def test_governor_drops_a_thread_on_stalls_and_probes_back_with_backoff():
    """A neighbour starts (calls 3x slower): one thread less; it stays: the probe back to
    two threads stalls and the next probe waits twice as long; it leaves: two threads."""
    from kiln.backends.tvm.runtime import ThreadGovernor

    gov = ThreadGovernor(2)
    assert gov.observe(0.010, now=0.0) == 2          # first call: the bar
    assert gov.observe(0.009, now=0.1) == 2          # normal
    assert gov.observe(0.200, now=0.2) == 1          # stalled beside a neighbour
    assert gov.observe(0.016, now=0.3) == 1          # one thread, not a stall
    assert gov.observe(0.016, now=1.3) == 2          # after FIRST_PROBE_S: probe two
    assert gov.observe(0.300, now=1.4) == 1          # still busy: back to one
    assert gov.probe_after == 2 * ThreadGovernor.FIRST_PROBE_S
    assert gov.observe(0.016, now=2.5) == 1          # back-off not over yet
    assert gov.observe(0.016, now=3.5) == 2          # probe again
    assert gov.observe(0.009, now=3.6) == 2          # the neighbour left: two threads stay
    assert gov.probe_after == ThreadGovernor.FIRST_PROBE_S
    assert ThreadGovernor(1).observe(1.0, now=0.0) == 1


def test_governor_only_with_the_default_thread_count(artifact):
    outdir = artifact[0] if isinstance(artifact, tuple) else artifact
    assert load(outdir, threads=1).governor is None
    assert load(outdir).governor is not None
