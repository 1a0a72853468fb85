"""Measuring on a remote device through TVM's RPC tracker, on loopback: a tracker and a server
started here, a kiln artifact timed and run there (outputs vs running it here), bench --rpc,
and the tuner's measurements going through MetaSchedule's RPCRunner."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kiln.backends.tvm.remote import RpcAddress, connect, measuring_on, time_artifact
from kiln.compiler.core.errors import KilnError
from kiln.compiler.driver.cli import main

pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado (the test extra)")

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = REPO / "compiler" / "core" / "examples" / "tiny_cnn.onnx"
KEY = "kiln-loopback"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    """A tracker and one server registered under KEY, both on 127.0.0.1."""
    from tvm import rpc

    log = tmp_path_factory.mktemp("rpc")
    port, server_port = _free_port(), _free_port()
    env = {**os.environ, "TVM_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host",
                               "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)],
                              stdout=open(log / "tracker.log", "w"), stderr=subprocess.STDOUT,
                              env=env, start_new_session=True)]
    try:
        deadline = time.monotonic() + 300  # a busy 2-core machine starts TVM slowly
        while True:
            try:
                rpc.connect_tracker("127.0.0.1", port).summary()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{port}",
             "--key", KEY, "--host", "127.0.0.1", "--port", str(server_port),
             "--port-end", str(server_port + 1)],
            stdout=open(log / "server.log", "w"), stderr=subprocess.STDOUT, env=env,
            start_new_session=True))
        while True:
            queue = rpc.connect_tracker("127.0.0.1", port).summary()["queue_info"]
            if queue.get(KEY, {}).get("free", 0) >= 1:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"no RPC server registered: {(log / 'server.log').read_text()}")
            time.sleep(0.5)
        yield RpcAddress("127.0.0.1", port, KEY)
    finally:
        # each in its own process group: TVM's tracker and server run their loops in
        # popen_worker children, which outlive a terminated parent
        for proc in reversed(procs):
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "out"
    assert main(["compile", str(EXAMPLE), "--spec", "fp32", "--target", "host", "-q",
                 "-o", str(out)]) == 0
    return out


def test_artifact_runs_and_is_timed_on_the_remote(tracker, artifact):
    from kiln.backends.tvm import load

    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    timing = time_artifact(artifact, {"x": x}, tracker, runs=5)
    assert len(timing.runs_ms) == 5 and all(t > 0 for t in timing.runs_ms)
    assert KEY in timing.device
    (want,) = load(artifact, threads=1)(x)
    np.testing.assert_allclose(timing.outputs[0], want, rtol=1e-5, atol=1e-6)


def test_weights_computed_at_load_time_are_made_on_the_remote(tracker, tmp_path):
    """A template_share build's main takes the weights kiln_init makes when loaded."""
    from kiln.backends.tvm import load
    from kiln.backends.tvm.build import build_artifact
    from kiln.compiler.testing.block_models import residual_mlp
    from kiln.passes.share.template_share import TemplateShare, TemplateShareConfig

    model = residual_mlp(2)
    TemplateShare(TemplateShareConfig(templates=2))(model)
    build_artifact(model, "host", tmp_path, model_hash="remote-load-time")
    x = np.random.default_rng(1).standard_normal(
        [d if isinstance(d, int) else 1 for d in model.graph.inputs[0].shape]).astype(np.float32)
    timing = time_artifact(tmp_path, {model.graph.inputs[0].name: x}, tracker, runs=2)
    (want,) = load(tmp_path, threads=1)(x)
    np.testing.assert_allclose(timing.outputs[0], want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_bench_measures_on_the_remote(tracker, tmp_path):
    out = tmp_path / "remote.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--rpc", str(tracker),
                           "--cases", "gemv-fp32", "--runs", "3", "--tuning", "off",
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = json.loads(out.read_text())["cases"]
    assert row["case"] == "gemv-fp32" and row["kiln_ms"] > 0 and row["runs"] == 3
    assert row["max_rel_err_vs_ort"] < 1e-4


@pytest.mark.slow
def test_tuner_measurements_go_through_the_rpc_runner(tracker):
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.script import tirx as T

    from kiln.backends.tvm import remote
    from kiln.backends.tvm.tuning.measure import measure

    @T.prim_func(s_tir=True)
    def add(a: T.Buffer((1024,), "float32"), b: T.Buffer((1024,), "float32")):
        T.func_attr({"tirx.noalias": True})
        for i in range(1024):
            with T.sblock("b"):
                vi = T.axis.spatial(1024, i)
                b[vi] = a[vi] + T.float32(1)

    with measuring_on(tracker):
        assert isinstance(remote.runner(), ms.runner.RPCRunner)
        secs = measure({"add": add}, tvm.target.Target("llvm"))
    assert isinstance(remote.runner(), ms.runner.LocalRunner)
    assert 0 < secs["add"] < 0.1


def test_bad_addresses_are_one_line_errors():
    with pytest.raises(KilnError, match="expected HOST:PORT:KEY"):
        RpcAddress.parse("localhost:9190")
    with pytest.raises(KilnError, match="cannot reach the RPC tracker"):
        connect(RpcAddress("127.0.0.1", _free_port(), "none"), timeout_s=5)
