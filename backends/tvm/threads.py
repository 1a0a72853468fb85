"""How many CPU threads a compiled model's calls use, and TVM's thread pool setup.

TVM's CPU pool splits each parallel loop statically, one chunk per thread, and the
calling thread waits (yielding) for the slowest chunk: a worker that shares its core
with another process stalls every kernel. Two things follow.

- TVM's idle workers wait for the next kernel by calling ``sched_yield`` up to
  ``TVM_THREAD_POOL_SPIN_COUNT`` times (300000 by default) before they sleep. On a loaded
  machine a yielding worker gives its core to the other processes and picks up its
  chunk a time slice late; a sleeping one is woken with the scheduler's wake-up
  preference. Measured on 2 Zen 4 cores beside one or two busy processes (load 4-10,
  ocr-cls-fp32 at a fixed 2 threads, median of 20-40 calls): with the default count (or
  1e8, or TVM_BIND_THREADS=1) 4 of 6 runs took 130-404 ms a call, with 20000 4 of 8
  took 63-252 ms, with 0 none of 7 took over 10 ms (1 thread: 0.6-0.9 ms). But on free
  cores 0 costs a futex wake per parallel kernel: 2 threads, blocks, load ~0.1, encoder
  9.12 vs 4.98 ms, ocr-cls 1.50 vs 0.47, lcnet 2.65 vs 2.10 (spin 0 vs 300000). So kiln
  leaves TVM's count (:data:`SPIN_COUNT` None; set the variable to choose one) and relies
  on the governor: beside a busy process it drops to 1 thread, which has no idle worker.
- :class:`ThreadGovernor` picks the count per call between 1 and the most the caller
  allows from the calls' own times, so a model beside a busy process falls back to
  fewer threads, and goes back up when the cores are free again.

TVM sizes its pool once, when it is first used, from ``TVM_NUM_THREADS`` (else
``OMP_NUM_THREADS``), else half the logical CPUs on x86 (it assumes two hardware threads
per core): on a 2-core machine without SMT that is one thread, whatever ``threads=`` asks.
:func:`size_pool_from_cores` (called when ``kiln.backends.tvm`` is imported) sets
``TVM_NUM_THREADS`` to the physical cores this process may run on when neither is set.
"""

from __future__ import annotations

import os
import statistics
import threading
from collections import deque
from collections.abc import Hashable
from pathlib import Path

#: Yields an idle TVM worker makes before it sleeps; None keeps TVM's (300000).
SPIN_COUNT: int | None = None
#: A core counts as taken when it was busier than this over :func:`free_cores`' sample.
BUSY_FRACTION = 0.5
#: How long :func:`free_cores` watches the cores (load time, once per model).
FREE_CORES_SAMPLE_S = 0.05

#: The thread count TVM's pool of the current thread was last configured with.
pool_state = threading.local()


def allowed_cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def physical_cores(sysfs: Path = Path("/sys/devices/system/cpu")) -> int | None:
    """Physical cores among the CPUs this process may run on (hardware threads of one core
    count once), from Linux's CPU topology; None where that cannot be read."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        topology = sysfs / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            return None
    return len(cores) or None


def size_pool_from_cores() -> None:
    """``TVM_NUM_THREADS`` = :func:`physical_cores` unless it or ``OMP_NUM_THREADS`` is set
    (before TVM's pool exists: TVM reads it once)."""
    if "TVM_NUM_THREADS" in os.environ or "OMP_NUM_THREADS" in os.environ:
        return
    cores = physical_cores()
    if cores is not None:
        os.environ["TVM_NUM_THREADS"] = str(cores)


def free_cores(sample_s: float = FREE_CORES_SAMPLE_S) -> int:
    """Cores this process may run on that were mostly idle over ``sample_s`` (at least 1).

    Without ``psutil`` (a bare edge board): the cores this process may run on.
    """
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else list(range(os.cpu_count() or 1))
    try:
        import psutil
    except ImportError:
        return len(allowed)
    busy = psutil.cpu_percent(interval=sample_s, percpu=True)
    return max(1, sum(1 for cpu in allowed
                      if cpu < len(busy) and busy[cpu] < 100 * BUSY_FRACTION))


def configure_pool(threads: int) -> int:
    """Set the current thread's TVM pool to ``threads``; returns what TVM will use (its
    pool never grows past ``TVM_NUM_THREADS``, or half the logical cores on x86)."""
    import tvm

    os.environ.setdefault("TVM_BIND_THREADS", "0")  # read by TVM at each configuration
    if SPIN_COUNT is not None:
        os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", str(SPIN_COUNT))  # read once
    # mode 1 is TVM's kBig (all cores of the fastest kind); the count overrides it
    tvm.get_global_func("runtime.config_threadpool")(1, threads)
    used = int(tvm.get_global_func("runtime.NumThreads")())
    pool_state.threads = used
    return used


class ThreadGovernor:
    """Thread count for the next call, from the times of the calls so far.

    ``observe(seconds, now, key)`` takes one call's duration at :attr:`threads`, the
    clock and what makes calls comparable (the input shapes); it returns the count to use
    next. Pure bookkeeping with no clock of its own, so it is tested with given times.

    - ``STALLS_TO_DROP`` calls in a row each ``STALL_FACTOR`` times slower than the
      median of the last ``WINDOW`` at this count and key drop one thread (a neighbour
      started; one slow call on a loaded machine is noise).
    - After ``probe_after`` seconds at one count the governor tries the next count up
      (or down, at the most threads) for ``PROBE_CALLS`` calls and keeps the count whose
      median is lower. A probe that loses doubles ``probe_after`` (up to
      ``MAX_PROBE_S``), and one call ``STALL_FACTOR`` times the kept median ends it at
      once; one that wins, or a drop, resets it. So a neighbour that makes
      two threads merely slower than one (not a stall) is found within seconds, and
      free cores are found again after the neighbour leaves.
    - Calls with another key (other input shapes) are not compared with each other.
    """

    STALL_FACTOR = 3.0
    FIRST_PROBE_S = 1.0
    MAX_PROBE_S = 60.0
    PROBE_CALLS = 3
    STALLS_TO_DROP = 2
    #: calls per count and key whose median is compared with a probe's
    WINDOW = 8

    def __init__(self, max_threads: int, start: int | None = None) -> None:
        self.max_threads = max(1, max_threads)
        self.threads = self.max_threads if start is None else min(max(1, start),
                                                                  self.max_threads)
        self.stalls = 0
        self.recent: dict[tuple[int, Hashable], deque[float]] = {}
        self.probe_after = self.FIRST_PROBE_S
        self.changed_at: float | None = None
        #: (count before the probe, key, times at the probed count) while probing
        self.probe: tuple[int, Hashable, list[float]] | None = None

    def _move(self, threads: int, now: float) -> int:
        self.threads, self.changed_at = threads, now
        return threads

    def _median(self, n: int, key: Hashable) -> float | None:
        times = self.recent.get((n, key))
        return statistics.median(times) if times and len(times) >= self.PROBE_CALLS else None

    def observe(self, seconds: float, now: float, key: Hashable = None) -> int:
        n = self.threads
        if self.changed_at is None:
            self.changed_at = now
        usual = self._median(n, key)
        stalled = usual is not None and seconds > self.STALL_FACTOR * usual
        self.stalls = self.stalls + 1 if stalled else 0
        self.recent.setdefault((n, key), deque(maxlen=self.WINDOW)).append(seconds)
        if self.probe is not None:
            return self._probing(seconds, now, key)
        if self.stalls >= self.STALLS_TO_DROP and n > 1:
            self.probe_after, self.stalls = self.FIRST_PROBE_S, 0
            return self._move(n - 1, now)
        if self.max_threads > 1 and now - self.changed_at >= self.probe_after \
                and len(self.recent[(n, key)]) >= self.PROBE_CALLS:
            self.probe = (n, key, [])
            return self._move(n + 1 if n < self.max_threads else n - 1, now)
        return n

    def _probing(self, seconds: float, now: float, key: Hashable) -> int:
        assert self.probe is not None
        before, probe_key, times = self.probe
        if key != probe_key:  # other shapes: the probe compares nothing; back to before
            self.probe = None
            return self._move(before, now)
        times.append(seconds)
        kept = statistics.median(self.recent[(before, key)])
        costly = seconds > self.STALL_FACTOR * kept  # far worse: stop paying for it
        if len(times) < self.PROBE_CALLS and not costly:
            return self.threads
        self.probe, self.stalls = None, 0
        if not costly and statistics.median(times) < kept:
            self.probe_after = self.FIRST_PROBE_S
            return self._move(self.threads, now)
        self.probe_after = min(self.MAX_PROBE_S, 2 * self.probe_after)
        return self._move(before, now)
