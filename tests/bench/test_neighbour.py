"""bench.neighbour: which alone time a model beside a neighbour is held against."""

import argparse
import os

import pytest

from bench.neighbour import free_core_count


def _args(kind: str, hogs: int = 1) -> argparse.Namespace:
    return argparse.Namespace(kind=kind, hogs=hogs)


def test_free_cores_leave_the_neighbours_cores_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert free_core_count(2, _args("spin")) == 1
    assert free_core_count(2, _args("ort")) == 1
    assert free_core_count(2, _args("procs", hogs=2)) == 1  # never below one
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert free_core_count(2, _args("procs", hogs=3)) == 2  # at most what kiln may use
    assert free_core_count(8, _args("procs", hogs=3)) == 5
