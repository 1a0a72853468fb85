"""ThreadGovernor: the thread count per call from the calls' own times (given clocks)."""

from __future__ import annotations

from kiln.backends.tvm.threads import ThreadGovernor


def _calls(gov: ThreadGovernor, seconds: float, start: float, count: int, step: float = 0.1,
           key=None) -> list[int]:
    return [gov.observe(seconds, now=start + i * step, key=key) for i in range(count)]


def test_stalls_drop_a_thread_and_a_losing_probe_backs_off():
    """A neighbour starts (calls 20x slower): after two such calls one thread; the probe
    back to two is far slower and ends at once, the next waits twice as long; the
    neighbour leaves: the next probe keeps two. One slow call alone is noise."""
    gov = ThreadGovernor(2)
    assert _calls(gov, 0.009, 0.0, 3) == [2, 2, 2]
    assert gov.observe(0.200, now=0.3) == 2          # one slow call: not yet
    assert gov.observe(0.009, now=0.4) == 2
    assert _calls(gov, 0.200, 0.5, 2) == [2, 1]      # two in a row: one thread
    assert _calls(gov, 0.016, 0.7, 3) == [1, 1, 1]   # no probe before FIRST_PROBE_S
    assert gov.observe(0.016, now=1.6) == 2          # probe two
    assert gov.observe(0.300, now=1.7) == 1          # far worse: back to one at once
    assert gov.probe_after == 2 * ThreadGovernor.FIRST_PROBE_S
    assert gov.observe(0.016, now=2.8) == 1          # back-off not over yet
    assert gov.observe(0.016, now=3.8) == 2          # probe again
    assert _calls(gov, 0.009, 3.9, 3) == [2, 2, 2]   # the neighbour left: two stay
    assert gov.probe_after == ThreadGovernor.FIRST_PROBE_S
    assert _calls(gov, 0.009, 4.2, 3) == [2, 2, 2]


def test_two_threads_merely_slower_than_one_fall_back_to_one():
    """A busy process makes two threads 2x slower (no stall): the probe down finds one
    thread faster and keeps it; probes back up lose while the neighbour stays."""
    gov = ThreadGovernor(2)
    assert _calls(gov, 0.009, 0.0, 3) == [2, 2, 2]
    assert _calls(gov, 0.020, 0.3, 5) == [2] * 5      # 2.2x: not a stall
    assert gov.observe(0.020, now=1.0) == 1           # probe one thread
    assert _calls(gov, 0.012, 1.1, 3) == [1, 1, 1]    # faster: kept
    assert gov.threads == 1 and gov.probe is None
    assert gov.observe(0.012, now=2.4) == 2           # 1 s later: probe two again
    assert _calls(gov, 0.020, 2.5, 3) == [2, 2, 1]    # slower: back to one
    assert gov.probe_after == 2 * ThreadGovernor.FIRST_PROBE_S


def test_calls_of_other_shapes_are_not_compared():
    gov = ThreadGovernor(2)
    assert _calls(gov, 0.001, 0.0, 3, key=(1, 16)) == [2, 2, 2]
    assert _calls(gov, 0.050, 0.3, 3, key=(1, 512)) == [2, 2, 2]  # longer input, no stall
    assert gov.observe(0.050, now=1.0, key=(1, 512)) == 1           # probe
    assert gov.observe(0.001, now=1.1, key=(1, 16)) == 2            # other shapes: undone


def test_start_and_a_single_core():
    assert ThreadGovernor(2, start=1).threads == 1
    assert ThreadGovernor(2, start=5).threads == 2
    gov = ThreadGovernor(1)
    assert _calls(gov, 1.0, 0.0, 30, step=1.0) == [1] * 30
