"""Fault timeouts on the instrument's clock: only readings of the instrument past the deadline
count, so a control PC too loaded to look (or an IOC too loaded to publish) cannot invent a fault."""
from __future__ import annotations

from calbench.plans.world_clock import WorldDeadline


def test_passes_after_three_readings_past_the_end():
    deadline = WorldDeadline(1000.0, 20.0)
    assert not any(deadline.passed(t) for t in (1000.0, 1010.0, 1020.0))   # not past the end
    assert not deadline.passed(1500.0)         # one reading far past it: a monitor may trail
    assert not deadline.passed(1500.0)         # the same reading looked at again
    assert not deadline.passed(1500.5)
    assert deadline.passed(1501.0)


def test_a_stalled_instrument_clock_never_passes_however_often_the_plan_looks():
    deadline = WorldDeadline(1000.0, 20.0)
    assert not any(deadline.passed(1000.0 + 1e-3) for _ in range(10_000))
