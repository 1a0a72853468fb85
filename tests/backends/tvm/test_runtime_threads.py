"""``load(outdir, threads=N)`` and ``kiln run --threads N`` set the CPU threads TVM's pool
uses, in every thread that calls the model (TVM keeps one pool per calling thread)."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import tvm

from kiln.backends.tvm import build_artifact, load
from kiln.backends.tvm.threads import free_cores
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


def test_threads_is_the_most_a_call_uses_and_adapt_false_keeps_it(artifact):
    """An explicit count adapts below itself too; ``adapt=False`` keeps exactly it."""
    two = load(artifact, threads=2)
    assert two.governor is not None and two.governor.max_threads == two.max_threads
    assert two.max_threads <= 2 and two.threads == two.max_threads
    assert load(artifact, threads=1).governor.max_threads == 1
    assert load(artifact, threads=2, adapt=False).governor is None
    default = load(artifact)
    assert default.max_threads <= len(os.sched_getaffinity(0))
    assert 1 <= default.threads <= default.max_threads
