"""Run conformance cases through kiln and classify each one.

A case is compiled by kiln for ``host`` with the empty spec (verification on, as a
user gets it), loaded, run on the case's inputs and compared with its expected outputs
at the case's tolerances (onnx's runner: ``assert_allclose``, NaN equal to NaN).
ONNX Runtime runs the same case first, so the figures can count only cases it passes.

Outcomes: ``pass``; ``refused`` (a clean :class:`KilnError`: its first line is the
reason); ``crash`` (any other exception, a signal such as SIGSEGV, or a hang past the
timeout); ``wrong`` (kiln built and ran it and the numbers differ); ``excluded`` (not
runnable as tensors: sequence/optional/map inputs).

Each case runs in a worker process (``python -m kiln.compiler.testing.conformance.worker``)
that handles many cases one after another; a worker that dies or hangs is killed,
its case classified, and a fresh worker started. Results come back on a dedicated
pipe, so whatever TVM prints on stdout cannot garble them.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from queue import Empty, Queue

import numpy as np

from .cases import Case

logger = logging.getLogger(__name__)

OUTCOMES = ("pass", "refused", "crash", "wrong", "excluded")
#: seconds a case may take (compile + build + run) before it counts as a hang
DEFAULT_TIMEOUT_S = 120.0
#: seconds a fresh worker may take to import TVM and kiln (not counted in a case's time)
STARTUP_TIMEOUT_S = 600.0
#: a line the runner sends a fresh worker; answered with READY once its heavy imports
#: are done, so a case's timeout does not count a slow start
PING = "ping"
READY = "ready"


@dataclass
class Outcome:
    """What happened to one case."""

    name: str
    op: str
    kind: str
    outcome: str                  # one of OUTCOMES
    reason: str = ""              # refusal / crash / mismatch, one line
    ort: str = ""                 # "pass", or why ONNX Runtime failed the case
    seconds: float = 0.0
    figures: list[str] = field(default_factory=list)  # cases.FIGURES it counts in
    #: kernels of the build left at TVM's default schedule (the report's ``unscheduled``)
    unscheduled: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def mismatch(expected: list[np.ndarray], actual: list[np.ndarray], names: list[str],
             rtol: float, atol: float) -> str | None:
    """Why ``actual`` fails onnx's comparison (None when it passes)."""
    if len(expected) != len(actual):
        return f"{len(actual)} outputs, expected {len(expected)}"
    for name, ref, out in zip(names, expected, actual):
        ref, out = np.asarray(ref), np.asarray(out)
        if ref.shape != out.shape:
            return f"output {name!r} has shape {list(out.shape)}, expected {list(ref.shape)}"
        if ref.dtype != out.dtype:
            return f"output {name!r} is {out.dtype}, expected {ref.dtype}"
        if ref.dtype.kind in "fc" or ref.dtype.name in ("bfloat16", "float16"):
            r64, o64 = ref.astype(np.float64), out.astype(np.float64)
            if not np.allclose(o64, r64, rtol=rtol, atol=atol, equal_nan=True):
                bad = ~np.isclose(o64, r64, rtol=rtol, atol=atol, equal_nan=True)
                i = tuple(int(k) for k in np.argwhere(bad)[0])
                return (f"output {name!r}: {int(bad.sum())} of {ref.size} values differ "
                        f"(at {list(i)}: {o64[i]!r}, expected {r64[i]!r})")
        elif not np.array_equal(ref, out):
            bad = ref != out
            i = tuple(int(k) for k in np.argwhere(bad)[0])
            return (f"output {name!r}: {int(bad.sum())} of {ref.size} values differ "
                    f"(at {list(i)}: {out[i]!r}, expected {ref[i]!r})")
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:400] if text else type(error).__name__


def ort_check(case: Case, feeds: dict, expected: list[np.ndarray]) -> str:
    """"pass", or why ONNX Runtime fails the case (cannot load/run it, or wrong numbers)."""
    import onnx

    from kiln.backends.ort import ReferenceRunner

    try:
        model = onnx.load(case.model_path, load_external_data=False)
        runner = ReferenceRunner(model, threads=1, label=case.name)
        got = runner.run(feeds)
    except Exception as error:
        return _first_line(error)
    names = [o.name for o in model.graph.output]
    return mismatch(expected, got, names, case.rtol, case.atol) or "pass"


def run_in_process(case: Case, *, check_ort: bool = True) -> Outcome:
    """Compile, build, run and compare one case here (a segfault ends this process:
    :func:`run_cases` calls this inside a worker)."""
    import onnx

    from kiln.backends import tvm as tvm_backend
    from kiln.compiler.core.errors import KilnError
    from kiln.compiler.driver.compile import compile_model

    started = time.perf_counter()
    result = Outcome(case.name, case.op, case.kind, "excluded", figures=case.figures)
    if not case.tensor_only:
        result.reason = "non-tensor inputs or outputs"
        return result
    try:
        feeds, expected = case.load_data()
    except Exception as error:
        result.reason = f"cannot read the case's data: {_first_line(error)}"
        return result
    if check_ort:
        result.ort = ort_check(case, feeds, expected)
    names = [o.name for o in onnx.load(case.model_path, load_external_data=False).graph.output]
    with tempfile.TemporaryDirectory(prefix="kiln-conf-") as outdir:
        try:
            compiled = compile_model(case.model_path, None, target="host")
            compiled.save(outdir)
            if compiled.report.compiled is not None:
                result.unscheduled = list(compiled.report.compiled.unscheduled)
            model = tvm_backend.load(outdir, threads=1)
            actual = model(**feeds)
        except KilnError as error:
            result.outcome, result.reason = "refused", _first_line(error)
        except Exception as error:
            result.outcome = "crash"
            frame = traceback.extract_tb(error.__traceback__)[-1]
            where = f"{Path(frame.filename).name}:{frame.lineno}"
            result.reason = f"{type(error).__name__} at {where}: {_first_line(error)}"
        else:
            why = mismatch(expected, actual, names, case.rtol, case.atol)
            result.outcome = "wrong" if why else "pass"
            result.reason = why or ""
    result.seconds = round(time.perf_counter() - started, 3)
    return result


class _Worker:
    """A worker process: case names in on stdin, JSON outcomes back on a pipe."""

    def __init__(self) -> None:
        read_fd, write_fd = os.pipe()
        env = dict(os.environ, TVM_NUM_THREADS="1", OMP_NUM_THREADS="1",
                   KILN_CONFORMANCE_RESULT_FD=str(write_fd))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kiln.compiler.testing.conformance.worker"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(write_fd,), env=env, text=True, start_new_session=True)
        os.close(write_fd)
        self.results = os.fdopen(read_fd, "r")
        self.buffer = ""
        self.started = False

    def _send(self, line: str) -> bool:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            return False
        return True

    def _line(self, deadline: float) -> str | None:
        """The worker's next line; "" when it died, None past ``deadline``."""
        while "\n" not in self.buffer:
            left = deadline - time.perf_counter()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.results], [], [], left)
            if ready:
                chunk = os.read(self.results.fileno(), 1 << 16).decode()
                if not chunk:
                    return ""
                self.buffer += chunk
        line, self.buffer = self.buffer.split("\n", 1)
        return line

    def run(self, case: Case, timeout: float) -> Outcome:
        if not self.started:  # the worker's imports do not count against the case
            begun = time.perf_counter()
            if not self._send(PING):
                return self._died(case, begun)
            line = self._line(begun + max(timeout, STARTUP_TIMEOUT_S))
            if line is None:
                self.stop()
                return _failed(case, "crash", "hang: the worker did not start within "
                               f"{max(timeout, STARTUP_TIMEOUT_S):.0f} s", begun)
            if line != READY:
                return self._died(case, begun)
            self.started = True
        started = time.perf_counter()
        if not self._send(json.dumps(asdict(case))):
            return self._died(case, started)
        line = self._line(started + timeout)
        if line is None:
            self.stop()
            return _failed(case, "crash", f"hang: no result within {timeout:.0f} s", started)
        if not line:
            return self._died(case, started)
        return Outcome(**json.loads(line))

    def _died(self, case: Case, started: float) -> Outcome:
        code = self.process.wait()
        if code < 0:
            why = f"killed by {signal.Signals(-code).name}"
        else:
            why = f"worker exited with status {code}"
        return _failed(case, "crash", why, started)

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()
        self.results.close()

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


def _failed(case: Case, outcome: str, reason: str, started: float) -> Outcome:
    return Outcome(case.name, case.op, case.kind, outcome, reason,
                   seconds=round(time.perf_counter() - started, 3),
                   figures=case.figures)


def run_cases(cases: Iterable[Case], *, jobs: int = 2, timeout: float = DEFAULT_TIMEOUT_S,
              on_result: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Run ``cases`` on ``jobs`` worker processes; results in the order of ``cases``."""
    todo = list(cases)
    queue: Queue[tuple[int, Case]] = Queue()
    for item in enumerate(todo):
        queue.put(item)
    results: list[Outcome | None] = [None] * len(todo)
    lock = threading.Lock()

    def serve() -> None:
        worker: _Worker | None = None
        try:
            while True:
                try:
                    i, case = queue.get_nowait()
                except Empty:
                    return
                if worker is None or not worker.alive:
                    if worker is not None:
                        worker.stop()
                    worker = _Worker()
                if not case.tensor_only:
                    outcome = Outcome(case.name, case.op, case.kind, "excluded",
                                      "non-tensor inputs or outputs")
                else:
                    outcome = worker.run(case, timeout)
                results[i] = outcome
                if on_result is not None:
                    with lock:
                        on_result(outcome)
        finally:
            if worker is not None:
                worker.stop()

    threads = [threading.Thread(target=serve, daemon=True) for _ in range(max(1, jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [r for r in results if r is not None]


def summarize(outcomes: Iterable[Outcome], figure: str, *, ort_pass_only: bool = True
              ) -> dict[str, int]:
    """Counts by outcome over the cases in ``figure`` (that ONNX Runtime passes)."""
    counts = dict.fromkeys(OUTCOMES[:4], 0)
    for o in outcomes:
        if figure not in o.figures or o.outcome == "excluded":
            continue
        if ort_pass_only and o.ort != "pass":
            continue
        counts[o.outcome] += 1
    counts["total"] = sum(counts.values())
    return counts


def failures(names: list[str], *, jobs: int = 2) -> list[str]:
    """``"name: outcome: reason"`` for each named case that does not pass (an unknown
    name raises ValueError, as :func:`~.cases.select` does): for tests that hold cases
    to passing."""
    from .cases import select

    return [f"{o.name}: {o.outcome}: {o.reason}"
            for o in run_cases(select(names=names), jobs=jobs) if o.outcome != "pass"]
