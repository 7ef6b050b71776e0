"""A plan waiting on monitored values wakes on the update that makes its condition true, and
otherwise returns after its wall-time bound."""
from __future__ import annotations

import threading
import time

from bluesky import RunEngine
from ophyd import Signal

from calbench.plans.monitor_wait import MonitorWaiter


def _timed(RE, plan):
    t = time.monotonic()
    RE(plan)
    return time.monotonic() - t


def test_wakes_on_the_update_that_makes_the_condition_true():
    RE = RunEngine({})
    sig = Signal(name="level", value=0)
    waiter = MonitorWaiter([sig])

    def raise_later():
        for v in range(1, 8):
            time.sleep(0.05)
            sig.put(v)
    threading.Thread(target=raise_later, daemon=True).start()
    took = _timed(RE, waiter.wait(lambda: sig.get() >= 5, max_wall_s=30.0))
    assert sig.get() >= 5
    assert took < 5.0                  # woken by the update, long before the 30 s bound
    waiter.close()


def test_returns_at_the_wall_bound_and_at_once_when_already_true():
    RE = RunEngine({})
    sig = Signal(name="level", value=0)
    waiter = MonitorWaiter([sig])
    took = _timed(RE, waiter.wait(lambda: sig.get() > 0, max_wall_s=0.3))
    assert 0.25 <= took and sig.get() == 0
    sig.put(1)
    log = []
    RE.msg_hook = lambda msg: log.append(msg.command)
    RE(waiter.wait(lambda: sig.get() > 0, max_wall_s=30.0))
    assert "wait_for" not in log       # true already: no message at all
    waiter.close()


def test_a_condition_that_raises_is_not_ready():
    RE = RunEngine({})
    sig = Signal(name="level", value=0)
    waiter = MonitorWaiter([sig])

    def broken():
        raise ConnectionError("disconnected")
    took = _timed(RE, waiter.wait(broken, max_wall_s=0.2))
    assert took >= 0.15
    waiter.close()

