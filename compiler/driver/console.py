"""Where the CLI's output goes: rich consoles, progress, quiet native logging, tables that fit.

- ``progress(mode)``: the ``say(text)`` callback the pipeline reports its steps to. On a
  terminal, a rich live line (a determinate bar when the step says ``(done/total)``); in a
  pipe or a CI log, plain lines flushed as they happen for each step that runs over a
  second: when it has run a second, and when it ends with its time
  (``kiln: build: legalize: 1.3 s``).
- ``native_output_silenced()``: TVM and LLVM log from C++ straight to file descriptor 2
  (``llvm_instance.cc:218: Error: ... -mcpu=bogus``, once per kernel) and no environment
  variable of TVM 0.27 turns that off (``TVM_LOG_DEBUG`` only adds VLOGs), so ``-q``
  points fd 2 at a scratch file while the work runs.
- ``print_table(console, table)``: a rich table as is when it fits the console, else one
  block per row (``name`` then ``column value`` pairs wrapped to the width).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

#: "build: tune (12/64)" -> the step "build: tune", 12 done of 64
_COUNTER = re.compile(r"^(?P<step>.*?)\s*\((?P<done>\d+)/(?P<total>\d+)\)$")

Say = Callable[[str], None]


def make_console(stderr: bool = False):
    """A rich console on stdout (or stderr); in a pipe it keeps rich's width (80, or
    ``$COLUMNS``) so that what is printed fits a log viewer too."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _split(text: str) -> tuple[str, int | None, int | None]:
    match = _COUNTER.match(text)
    if not match:
        return text, None, None
    return match["step"], int(match["done"]), int(match["total"])


class PlainProgress:
    """Timed plain lines for logs, for the steps that are slow enough to matter.

    A step that is still running after ``SLOW_SECONDS`` gets a line then (from a timer,
    flushed at once: a 75 s build shows up while it runs), its counter now and then, and a
    line with its time when it ends. Quicker steps print nothing, so a fast compile (or
    one refused at once) prints only its result or its one-line error.
    """

    SLOW_SECONDS = 1.0
    #: a counter is printed again after this many seconds or this fraction of its total
    EVERY_SECONDS = 10.0
    EVERY_FRACTION = 0.25

    def __init__(self, stream: TextIO, *, every_step: bool = False) -> None:
        self.stream = stream
        self.every_step = every_step      # -v: every step gets its lines, however quick
        self.lock = threading.Lock()
        self.timer: threading.Timer | None = None
        self.step: str | None = None
        self.text = ""
        self.shown = False
        self.started = 0.0
        self.last_print = 0.0
        self.last_done = 0

    def _write(self, line: str) -> None:
        self.stream.write(f"kiln: {line}\n")
        self.stream.flush()

    def _show(self, step: str | None) -> None:
        with self.lock:
            if self.step == step and not self.shown:
                self.shown = True
                self.last_print = time.perf_counter()
                self._write(self.text + ("" if _split(self.text)[1] is not None else " ..."))

    def _finish(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        with self.lock:
            if self.step is not None and self.shown:
                self._write(f"{self.step}: {time.perf_counter() - self.started:.1f} s")
            self.step = None

    def __call__(self, text: str) -> None:
        step, done, total = _split(text)
        now = time.perf_counter()
        if step != self.step:
            self._finish()
            with self.lock:
                self.step, self.text, self.shown = step, text, False
                self.started, self.last_print, self.last_done = now, now, 0
            if self.every_step:
                self._show(step)
                return
            self.timer = threading.Timer(self.SLOW_SECONDS, self._show, args=(step,))
            self.timer.daemon = True
            self.timer.start()
            return
        with self.lock:
            self.text = text
            if not self.shown or done is None or total is None:
                return
            if now - self.last_print >= self.EVERY_SECONDS or done == total or \
                    done - self.last_done >= max(1, total * self.EVERY_FRACTION):
                self._write(text)
                self.last_print, self.last_done = now, done

    def close(self) -> None:
        self._finish()


@contextmanager
def _rich_progress(console) -> Iterator[Say]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                  transient=True) as bars:
        task = bars.add_task("kiln", total=None)
        current: list[str | None] = [None]

        def say(text: str) -> None:
            step, done, total = _split(text)
            if step != current[0]:       # a new step: its own clock and its own bar
                bars.reset(task, total=total, completed=done or 0, description=step)
                current[0] = step
            else:
                bars.update(task, total=total, completed=done or 0)

        yield say


@contextmanager
def progress(mode: str, *, every_step: bool = False) -> Iterator[Say]:
    """``say(text)`` for the pipeline's steps. ``mode``: ``"auto"`` (live bars on a terminal,
    timed plain lines otherwise), ``"plain"`` (always lines) or ``"off"`` (nothing).
    ``every_step`` (``-v``): plain lines for every step, not only the slow ones."""
    if mode == "off":
        yield lambda text: None
        return
    console = make_console(stderr=True)
    if mode == "auto" and console.is_terminal:
        with _rich_progress(console) as say:
            yield say
        return
    plain = PlainProgress(sys.stderr, every_step=every_step)
    try:
        yield plain
    finally:
        plain.close()


@contextmanager
def native_output_silenced(enabled: bool = True) -> Iterator[None]:
    """Send file descriptor 2 (where TVM's and LLVM's C++ logging writes) to a scratch
    file while the block runs; Python's own stderr is flushed first and restored after."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:               # no fd 2 to redirect (a closed stderr): nothing to silence
        yield
        return
    with tempfile.TemporaryFile(prefix="kiln-native-log-") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _cell_text(cell: Any) -> str:
    return cell.plain if hasattr(cell, "plain") else str(cell)


def print_table(console, table) -> None:
    """Print ``table`` if it fits ``console.width``; else each row as a block: its first
    cell, then the other columns as ``header value`` pairs wrapped to the width."""
    # a table's measurement is capped at the width it is given: ask with room to spare
    natural = console.measure(table, options=console.options.update(max_width=10_000))
    if natural.maximum <= console.width:
        console.print(table)
        return
    if table.title:
        console.print(_cell_text(table.title), markup=False, soft_wrap=True,
                      style="bold")
    columns = list(table.columns)
    rows = [[_cell_text(c) for c in column.cells] for column in columns]
    headers = [_cell_text(column.header) for column in columns]
    width = max(console.width, 40)
    for i in range(len(rows[0]) if rows else 0):
        console.print(rows[0][i], markup=False, style="bold", soft_wrap=True)
        pairs = [f"{h} {r[i]}" for h, r in zip(headers[1:], rows[1:]) if r[i] != ""]
        for line in _pack(pairs, width - 4):
            console.print("    " + line, markup=False, soft_wrap=True)


def _pack(pairs: list[str], width: int) -> list[str]:
    """``a 1, b 2, ...`` in lines of at most ``width``, never breaking inside a pair."""
    lines: list[str] = []
    for pair in pairs:
        if lines and len(lines[-1]) + 2 + len(pair) <= width:
            lines[-1] += ", " + pair
        else:
            if lines:
                lines[-1] += ","
            lines.append(pair)
    return lines
