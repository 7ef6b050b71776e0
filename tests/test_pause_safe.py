"""A paused plan leaves its instruments safe: the RunEngine's pause closes the X-ray shutter and
zeroes the BatMet sink, its resume restores them, and the session keeps renewing its procedure lease
while paused (the IOC does not make the instrument safe under a paused plan)."""
from __future__ import annotations

import threading
import time

import bluesky.plan_stubs as bps
import pytest
from bluesky.utils import RunEngineInterrupted

from calbench.devices.base import set_and_check
from calbench.iocs.lease import HELD
from calbench.plans.batmet import collect_sink_calibration
from calbench.plans.xray import tube_on, xrf_exposure
from wait_support import wait_for


def pause_when(condition, RE):
    """Request an immediate pause from another thread once condition() holds."""
    def watch():
        wait_for(condition, "pause condition")
        RE.request_pause(defer=False)
    threading.Thread(target=watch, daemon=True).start()


def _exposure(box, seen: list):
    """A second of exposure after a checkpoint; notes the shutter it found."""
    yield from bps.checkpoint()
    seen.append((yield from bps.rd(box.xrf_shutter)))
    yield from bps.sleep(1.0)


def test_pause_closes_the_xrf_shutter_keeps_the_lease_and_resume_reopens_it(lab, RE):
    box, sim, ioc = lab.device("xraybox"), lab.backend("xraybox"), lab.ioc("xraybox")
    RE(tube_on(box, 30.0, 10.0))
    seen = []
    original = ioc.procedure_lease.timeout_s
    ioc.procedure_lease.timeout_s = 1.0
    try:
        wait_for(lambda: box.lease.timeout_s.get(use_monitor=False) == 1.0, "1 s lease published")
        pause_when(lambda: seen and sim.read().shutters["XRF"], RE)     # in the exposure
        with pytest.raises(RunEngineInterrupted):
            RE(xrf_exposure(box, "Cu", _exposure(box, seen)))
        wait_for(lambda: not sim.read().shutters["XRF"], "shutter closed by the pause")
        # paused, the session renews: the lease outlives several of its timeouts
        t_pause = time.monotonic()
        wait_for(lambda: ioc.procedure_lease.expires > t_pause + 3 * ioc.procedure_lease.timeout_s,
                 "renewals while paused")
        assert ioc.procedure_lease.state == HELD
        reopened = threading.Event()
        threading.Thread(target=lambda: (wait_for(lambda: sim.read().shutters["XRF"], "reopen"),
                                         reopened.set()), daemon=True).start()
        RE.resume()
    finally:
        ioc.procedure_lease.timeout_s = original
        if RE.state != "idle":
            RE.abort()
    assert seen == ["Open"] and reopened.is_set()          # reopened before the plan went on
    wait_for(lambda: not sim.read().shutters["XRF"], "shutter closed at the end")
    assert ioc.procedure_lease.state != HELD and not box.lease.held


def test_a_pause_after_an_aborted_pause_still_closes_the_shutter(lab, RE):
    """Abort after a pause (no resume), then pause again: the box must act again."""
    box, sim = lab.device("xraybox"), lab.backend("xraybox")
    RE(tube_on(box, 30.0, 10.0))
    seen = []
    for attempt in range(2):
        seen.clear()
        pause_when(lambda: seen and sim.read().shutters["XRF"], RE)
        with pytest.raises(RunEngineInterrupted):
            RE(xrf_exposure(box, "Cu", _exposure(box, seen)))
        wait_for(lambda: not sim.read().shutters["XRF"], f"shutter closed by pause {attempt + 1}")
        RE.abort("operator abort (test)")


def test_pause_zeroes_the_sink_and_resume_restores_it(lab, RE):
    dmm, psu, sink = (lab.device(n) for n in ("dmm", "psu", "batmet"))
    world = lab.backend("batmet").sim.world
    pause_when(lambda: world.dac >= 500, RE)
    with pytest.raises(RunEngineInterrupted):
        RE(collect_sink_calibration(dmm, sink, psu, dac_start=450, dac_stop=700, dac_step=50))
    try:
        wait_for(lambda: world.dac == 0, "DAC 0 while paused")
        assert world.supply.output_on             # the supply is not the pause's business
        RE.resume()
    finally:
        if RE.state != "idle":
            RE.abort()
    assert world.dac == 0 and not world.supply.output_on    # the plan's own exit path
    # the hooks themselves: a pause saves the code, a resume puts it back
    sink.lease.set(1).wait(10)
    try:
        set_and_check(sink.dac, 1200)
        sink.pause()
        sink.pause()                                   # once per pause, however many ask
        assert world.dac == 0
        sink.dac.resume()                              # a signal hands it to its device
        assert world.dac == 1200
    finally:
        set_and_check(sink.dac, 0)
        sink.lease.set(0).wait(10)
