"""Interrupts (SIGINT, SIGTERM) that stay interrupts, and test pause points.

Python turns SIGINT into ``KeyboardInterrupt`` at the next bytecode; raised inside a
callback that TVM's C++ code called, it comes back out of the FFI as a TVM error
(``RuntimeError``). :func:`handled` installs handlers that remember that a signal
arrived (:func:`received`), so code that catches a library's error can tell an
interrupt from a failure and re-raise it as ``KeyboardInterrupt``. SIGTERM is handled
like SIGINT (Python's default for it kills the process without cleaning up).

:func:`deferred` blocks both signals for a short critical section (the final renames of
an output folder): one that arrives meanwhile is delivered when the section ends.

:func:`release_quietly` frees an interrupted call's frames with stderr silenced (native
destructors would otherwise print warnings after ``kiln: interrupted``).

:func:`checkpoint` is a pause point for tests: with ``KILN_TEST_PAUSE=NAME`` in the
environment, the process prints ``kiln-test: paused at NAME`` to stderr and sleeps
there, so a test can send a signal at a known point of a compile.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

#: Environment variable naming the :func:`checkpoint` at which to pause (tests only).
PAUSE_ENV = "KILN_TEST_PAUSE"
#: How long a checkpoint pauses (a test signals the process well before).
PAUSE_SECONDS = 30.0

_SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None))
                 if s is not None)
_state: dict[str, int | bool | None] = {"signal": None, "deferring": False, "held": None}


def received() -> int | None:
    """The number of the interrupt signal received inside :func:`handled`, if any."""
    signum = _state["signal"]
    return signum if isinstance(signum, int) else None


def _on_signal(signum, frame) -> None:
    _state["signal"] = signum
    if _state["deferring"]:  # inside deferred(): raised when the block ends
        _state["held"] = signum
        return
    raise KeyboardInterrupt


@contextmanager
def handled() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt and are remembered (main thread only;
    elsewhere nothing is installed). The previous handlers come back at the end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_signal) for s in _SIGNALS}
    _state["signal"] = None
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends (then they are delivered).

    Inside :func:`handled`, the handler itself holds them (a signal may be delivered to
    any thread, e.g. one of TVM's workers, and Python still runs the handler in the main
    thread); the main thread's signal mask also blocks them, for Python's default handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS) \
        if hasattr(signal, "pthread_sigmask") else None
    _state["deferring"], _state["held"] = True, None
    try:
        yield
    finally:
        _state["deferring"] = False
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        if _state["held"] is not None:
            _state["held"] = None
            raise KeyboardInterrupt


def pending() -> bool:
    """An interrupt is waiting to be delivered (inside :func:`deferred`) or was received."""
    if received() is not None:
        return True
    if hasattr(signal, "sigpending"):
        return bool(set(signal.sigpending()) & set(_SIGNALS))
    return False


def release_quietly(error: BaseException) -> None:
    """Free what an interrupted call left behind, with the process's stderr (fd 2) silenced.

    The frames of an interrupted call live on in the exception's traceback; freeing them
    destroys native objects whose destructors complain on stderr (TVM's
    ``BlockBuilder destroyed with remaining blocks!`` after an interrupted import). After
    ``kiln: interrupted`` nothing more should be printed, so the tracebacks of ``error``
    and the errors chained to it are dropped and collected while fd 2 points at
    ``/dev/null``; fd 2 is restored afterwards.
    """
    chain: list[BaseException] = []
    link: BaseException | None = error
    while link is not None and all(link is not seen for seen in chain):
        chain.append(link)
        link = link.__cause__ or link.__context__
    try:
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        sys.stderr.flush()
        os.dup2(devnull, 2)
        for link in chain:
            link.__traceback__ = link.__context__ = link.__cause__ = None
        chain.clear()
        gc.collect()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def checkpoint(name: str) -> None:
    """Pause here when ``KILN_TEST_PAUSE`` names this point (see the module docstring)."""
    if os.environ.get(PAUSE_ENV) != name:
        return
    sys.stderr.write(f"kiln-test: paused at {name}\n")
    sys.stderr.flush()
    time.sleep(PAUSE_SECONDS)
