"""The procedure lease: a session that dies in a hazardous phase leaves its instrument to the IOC,
which makes it safe by itself once the heartbeats stop, and refuses hazardous puts until a lease is
taken again. The kill drills run each procedure in a real child process and kill -9 it."""
from __future__ import annotations

import pytest

from calbench.devices.base import InstrumentRefused, set_and_check
from calbench.devices.lease import RENEWER
from calbench.contracts.errors import Refused
from calbench.iocs.lease import FREE, HELD, LAPSED, Lease
from calbench.procedures.kill_drill import drill
from wait_support import wait_for

DRILL_LEASE_S = 2.5


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_lease_bookkeeping_on_its_clock():
    clock = FakeClock()
    lease = Lease(30.0, clock=clock)
    lease.check_hazard("HV On")                 # no lease ever taken: manual operation
    lease.take("alice@pc:1:a")
    with pytest.raises(Refused, match="held by 'alice@pc:1:a'"):
        lease.take("bob@pc:2:b")
    clock.t = 29.0
    lease.renew("alice@pc:1:a")
    clock.t = 58.0
    assert not lease.due()
    clock.t = 59.5
    assert lease.due()
    lease.lapse("lapsed for the test")
    with pytest.raises(Refused, match="HV On refused: lapsed for the test; a plan takes"):
        lease.check_hazard("HV On")
    with pytest.raises(Refused, match="holds no lease"):
        lease.renew("alice@pc:1:a")
    lease.take("bob@pc:2:b")                    # taken again: hazardous puts allowed
    assert lease.state == HELD
    lease.check_hazard("HV On")
    with pytest.raises(Refused, match="held by 'bob"):
        lease.release("alice@pc:1:a")
    lease.release("bob@pc:2:b")
    assert lease.state == FREE
    with pytest.raises(Refused, match="empty lease token"):
        lease.take("  ")


def test_a_lapsed_lease_makes_the_sink_safe_and_blocks_current_until_taken_again(lab):
    sink = lab.device("batmet")
    ioc = lab.ioc("batmet")
    world = lab.backend("batmet").sim.world
    set_and_check(sink.reconnect_cmd, 1)
    original = ioc.procedure_lease.timeout_s
    ioc.procedure_lease.timeout_s = 1.0
    try:
        wait_for(lambda: sink.lease.timeout_s.get(use_monitor=False) == 1.0, "1 s lease published")
        sink.lease.set(1).wait(10)
        assert sink.lease.state.get(use_monitor=False) == HELD
        set_and_check(sink.dac, 800)
        assert world.dac == 800
        RENEWER.remove(sink.lease)               # the session dies: no more heartbeats
        wait_for(lambda: ioc.procedure_lease.state == LAPSED, "lapse")
        wait_for(lambda: world.dac == 0, "DAC 0")
        assert "lapsed (no renewal for 1 s" in sink.status_message.get(use_monitor=False)
        with pytest.raises(InstrumentRefused, match="DAC 500 refused: the procedure lease"):
            set_and_check(sink.dac, 500)
        assert world.dac == 0
        sink.lease.set(0).wait(10)
        sink.lease.set(1).wait(10)               # a new lease: current allowed again
        set_and_check(sink.dac, 500)
        assert world.dac == 500
    finally:
        set_and_check(sink.dac, 0)
        sink.lease.set(0).wait(10)
        ioc.procedure_lease.timeout_s = original


def test_a_second_session_cannot_take_a_held_lease(lab):
    box = lab.device("xraybox")
    ioc = lab.ioc("xraybox")
    box.lease.set(1).wait(10)
    try:
        with pytest.raises(InstrumentRefused, match="the procedure lease is held by"):
            set_and_check(box.lease.take_cmd, "other@host:1:x")
        assert ioc.procedure_lease.holder == box.lease.holder.get(use_monitor=False)
    finally:
        box.lease.set(0).wait(10)
    assert ioc.procedure_lease.state == FREE


def test_scopes_nest_and_a_replayed_take_counts_once(lab):
    box, ioc = lab.device("xraybox"), lab.ioc("xraybox")
    box.lease.set(("take", "outer")).wait(10)
    box.lease.set(("take", "inner")).wait(10)
    box.lease.set(("take", "inner")).wait(10)      # replayed by the RunEngine after a pause
    box.lease.set(("release", "inner")).wait(10)
    assert ioc.procedure_lease.state == HELD and box.lease in RENEWER.holding()
    box.lease.set(("release", "outer")).wait(10)
    assert ioc.procedure_lease.state == FREE and box.lease not in RENEWER.holding()


@pytest.mark.parametrize("procedure", ["qc6", "batmet", "xray"])
def test_killed_session_leaves_a_safe_instrument(procedure, lab_config):
    result = drill(procedure, lease_s=DRILL_LEASE_S, cfg=lab_config)
    print(f"\nkill drill: {result.row()}")
    # the session renewed its lease until it was killed, and the IOC acted only after that
    assert 0.0 < result.lapse_s <= result.safe_s
    assert "lapsed (no renewal for 2.5 s: its session stopped)" in result.message
    assert "COULD NOT" not in result.message


def test_shutdown_reports_what_it_could_not_make_safe(lab):
    from calbench.iocs.server import make_safe_all
    faults = lab.backend("batmet").sim.faults
    faults.absent = True                     # the BatMet stops answering before the shutdown
    try:
        unsafe = make_safe_all([lab.ioc("psu"), lab.ioc("batmet")])
    finally:
        faults.absent = False
    assert len(unsafe) == 1 and unsafe[0].startswith(lab.prefix_of("batmet"))
    assert "BatMet DAC not set to 0" in unsafe[0] and "unplug" in unsafe[0]
