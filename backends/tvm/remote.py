"""Measuring on a remote device through TVM's RPC tracker (``--rpc HOST:PORT:KEY``).

The way TVM measures on edge boards: a tracker (``python -m tvm.exec.rpc_tracker --host
0.0.0.0 --port 9190``) on a machine both sides reach, and on each board an RPC server that
registers with it under a key (``python -m tvm.exec.rpc_server --tracker HOST:9190 --key
rk3588``; the board needs only TVM's runtime). kiln then:

- times a compiled artifact on the board (:func:`time_artifact`): uploads ``model.so``,
  loads it there as a Relax VM, feeds the inputs and runs TVM's ``time_evaluator`` on the
  board's own clock; outputs come back for the check against ONNX Runtime on this machine.
  ``python -m bench --rpc HOST:PORT:KEY --target arm64`` uses it;
- measures tuning candidates there (:func:`runner`): MetaSchedule's ``RPCRunner`` in place
  of its local runner while :func:`measuring_on` is active (``python -m bench.tune --rpc``).

The artifact must be built for the board's target (``--target arm64`` for an aarch64 board);
kiln checks nothing about the board beyond what the RPC session reports.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import statistics
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.compiler.core.errors import KilnError

from .manifest import read_manifest

_ADDRESS = re.compile(r"^(?P<host>[^:\s]+):(?P<port>\d{1,5}):(?P<key>[^:\s]+)$")
#: how long a session may stay open on the board (seconds)
SESSION_TIMEOUT_S = 600


@dataclass(frozen=True)
class RpcAddress:
    host: str
    port: int
    key: str

    @classmethod
    def parse(cls, text: str) -> RpcAddress:
        match = _ADDRESS.match(text.strip())
        if not match or not 0 < int(match["port"]) < 65536:
            raise KilnError(f"--rpc {text!r}: expected HOST:PORT:KEY (the RPC tracker's "
                            "address and the device key its servers registered with), "
                            "e.g. 127.0.0.1:9190:rk3588")
        return cls(match["host"], int(match["port"]), match["key"])

    def __str__(self) -> str:
        return f"{self.host}:{self.port}:{self.key}"


def connect(address: RpcAddress, *, timeout_s: int = SESSION_TIMEOUT_S):
    """A session on a device registered under ``address.key`` (KilnError when there is none)."""
    import socket

    from tvm import rpc

    try:  # TVM retries a refused connection for a minute: say so at once instead
        socket.create_connection((address.host, address.port), timeout=10).close()
        tracker = rpc.connect_tracker(address.host, address.port)
    except Exception as error:  # TVM raises its own errors (TVMError, OSError, ...)
        raise KilnError(f"--rpc {address}: cannot reach the RPC tracker at "
                        f"{address.host}:{address.port} ({error})") from None
    try:
        return tracker.request(address.key, priority=1, session_timeout=timeout_s)
    except Exception as error:
        raise KilnError(f"--rpc {address}: no device with key {address.key!r} "
                        f"({str(error).splitlines()[0] if str(error) else type(error).__name__})"
                        ) from None


@dataclass(frozen=True)
class RemoteTiming:
    median_ms: float
    runs_ms: list[float]
    outputs: list[np.ndarray]
    device: str


def time_artifact(outdir: Path | str, feeds: Mapping[str, np.ndarray] | Sequence[np.ndarray],
                  address: RpcAddress, *, runs: int = 10, number: int = 1,
                  session=None) -> RemoteTiming:
    """Run a ``kiln compile`` artifact on the remote device: outputs and per-run times."""
    import tvm
    from tvm import relax

    outdir = Path(outdir)
    manifest = read_manifest(outdir)
    names = [spec.name for spec in manifest.inputs]
    arrays = [feeds[n] for n in names] if isinstance(feeds, Mapping) else list(feeds)
    sess = session if session is not None else connect(address)
    library = outdir / manifest.library
    sess.upload(str(library))
    module = sess.load_module(library.name)
    device = sess.cuda(0) if manifest.target_family == "cuda" else sess.cpu(0)
    vm = relax.VirtualMachine(module, device)
    args = [tvm.runtime.tensor(np.ascontiguousarray(a).reshape(np.shape(a)), device)
            for a in arrays]
    vm.set_input("main", *args, *_load_time_weights(vm, manifest))
    timer = vm.time_evaluator("invoke_stateful", device, number=number, repeat=runs,
                              min_repeat_ms=0)
    result = timer("main")
    outputs = vm.get_outputs("main")
    values = [outputs] if isinstance(outputs, tvm.runtime.Tensor) else list(outputs)
    runs_ms = [float(t) * 1e3 for t in result.results]
    return RemoteTiming(statistics.median(runs_ms), runs_ms, [v.numpy() for v in values],
                        f"{address.key} via {address.host}:{address.port}")


def _load_time_weights(vm, manifest) -> tuple:
    """The weights the library computes once on the device, passed to ``main`` after the
    inputs (template_share builds: :mod:`kiln.backends.tvm.load_time`)."""
    from .manifest import LOAD_TIME_INIT as INIT_FUNCTION
    from .manifest import LOAD_TIME_KEY as MANIFEST_KEY

    if not manifest.extra.get(MANIFEST_KEY):
        return ()
    vm.set_input(INIT_FUNCTION)  # stateful: an RPC call's tuple result is not iterable here
    vm.invoke_stateful(INIT_FUNCTION)
    return tuple(vm.get_outputs(INIT_FUNCTION))


_RPC: contextvars.ContextVar[RpcAddress | None] = contextvars.ContextVar("kiln_rpc",
                                                                         default=None)


@contextlib.contextmanager
def measuring_on(address: RpcAddress | None) -> Iterator[None]:
    """Within the block, the tuner's measurements run on ``address`` (None: locally)."""
    token = _RPC.set(address)
    try:
        yield
    finally:
        _RPC.reset(token)


def current() -> RpcAddress | None:
    return _RPC.get()


def runner(evaluator_config: Any = None):
    """MetaSchedule's runner: an RPCRunner on the current address, else a LocalRunner."""
    from tvm.s_tir import meta_schedule as ms

    address = current()
    if address is None:
        return ms.runner.LocalRunner(evaluator_config=evaluator_config) \
            if evaluator_config is not None else ms.runner.LocalRunner()
    config = ms.runner.RPCConfig(tracker_host=address.host, tracker_port=address.port,
                                 tracker_key=address.key, session_timeout_sec=SESSION_TIMEOUT_S)
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator_config)
