"""The CAEN crate over Channel Access: CaenCrateIOC's PVs (CAENHVAsyn-style names, crate map,
ClearAlarm, Kill, refusals, unreachable crate) and the ophyd devices (HvChannel positioner, GemLayer
divider emulation), against the simulated crate of the session's lab."""
from __future__ import annotations

import time

import pytest

from calbench.devices.base import InstrumentRefused, set_and_check
from calbench.devices.caen import STATUS_ITRIP, ChannelOff, ChannelTripped
from calbench.iocs.sim.qc6 import ITRIP, ON, RUP
from qc6_support import qc6  # noqa: F401  (fixture)


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_pv_names_and_crate_map(lab, qc6):
    import epics
    crate, layer, sim = qc6
    p = lab.prefix_of("caen")
    assert epics.caget(p + "S03:C05:ChName", use_monitor=False) == "L1_G1T"
    assert epics.caget(p + "S03:C13:ChName", use_monitor=False) == "L2_Drift"
    assert crate.system_type.get() == "SY5527" and crate.slots.get() == "3"
    assert crate.board.model.get() == "A1515TG" and crate.board.n_channels.get() == 14
    assert [ch.pvname.rsplit(":", 3)[-3:] for ch in (layer.g1t.v0set,)] == [["S03", "C05", "V0Set"]]
    layer2 = crate.layer(2)
    assert [c.channel for c in layer2.channels] == [13, 12, 11, 10, 9, 8, 7]
    assert [c.channel for c in layer2.foils] == [12, 10, 8]


def test_refused_puts_name_the_limit(qc6):
    _, layer, _ = qc6
    with pytest.raises(InstrumentRefused, match="outside 0..1200 V"):
        set_and_check(layer.g1t.v0set, 5000.0)
    with pytest.raises(InstrumentRefused, match="I0Set"):
        set_and_check(layer.g1t.i0set, 50.0)
    assert layer.g1t.v0set.get(use_monitor=False) == 0.0


def test_channel_positioner_ramps_clamps_and_fails_clearly(qc6):
    _, layer, sim = qc6
    ch = layer.g2t
    with pytest.raises(ChannelOff, match="switched off"):
        ch.set(300).wait(5)
    set_and_check(ch.pw, 1)
    ch.set(300).wait(10)
    assert abs(ch.position - 300) <= 1.0 and not ch.status.get() & RUP
    assert sim.voltages(3)[ch.channel] == pytest.approx(300.0)
    set_and_check(ch.svmax, 450.0)
    ch.set(600).wait(10)                          # V0Set held at SVMax: arrives at 450 V
    assert ch.v0set.get() == 450.0 and abs(ch.position - 450) <= 1.0
    sim.set_short(3, ch.channel, 0.05)            # 50 MOhm: 9 uA at 450 V -> trips
    with pytest.raises(ChannelTripped, match="tripped"):
        ch.set(440).wait(10)
    assert ch.status.get() & STATUS_ITRIP


def test_gem_layer_divider_setpoints_capped_at_svmax(qc6):
    _, layer, sim = qc6
    for ch in layer.channels:
        set_and_check(ch.pw, 1)
    set_and_check(layer.drift.svmax, 900.0)
    layer.set(4600).wait(30)
    ref = {"drift": 900.0, "g1t": 548.3, "g1b": 428.9, "g2t": 538.5, "g2b": 856.7, "g3t": 514.0,
           "g3b": 612.0}
    truth = sim.voltages(3)
    for electrode, volts in ref.items():
        ch = getattr(layer, electrode)
        assert truth[ch.channel] == pytest.approx(volts, abs=0.1), electrode
        assert abs(ch.position - volts) <= 1.0


def test_status_bits_clear_alarm_and_kill_over_ca(lab, qc6):
    _, layer, sim = qc6
    ch = layer.g3t
    set_and_check(ch.pw, 1)
    ch.set(200).wait(10)
    sim.inject_discharge(3, ch.channel, duration_s=50.0)
    assert wait_until(lambda: ch.status.get() == ITRIP)
    # PDwn Kill; VMon's monitor update may arrive just after Status's
    assert wait_until(lambda: ch.pw.get() == 0 and ch.vmon.get() == 0.0)
    with pytest.raises(InstrumentRefused, match="ClearAlarm"):
        set_and_check(ch.pw, 1)
    set_and_check(layer.clear_alarm_cmd, 1)
    assert wait_until(lambda: ch.status.get() == 0)
    set_and_check(ch.pw, 1)
    assert wait_until(lambda: ch.status.get() & ON)
    set_and_check(layer.kill_cmd, 1)
    assert wait_until(lambda: ch.pw.get() == 0 and ch.vmon.get() == 0.0)
    assert not any(sim.powered(3))


def test_an_unreachable_crate_shows_on_connected_and_the_status_message(lab, qc6):
    import epics
    _, layer, sim = qc6
    p = lab.prefix_of("caen")
    assert epics.caput(p + "Sim:Unreachable", 1, wait=True, timeout=5)
    assert wait_until(lambda: layer.connected_rbv.get() == 0)
    assert "does not answer" in layer.status_message.get(use_monitor=False)
    t0 = layer.world_time.get()
    assert wait_until(lambda: layer.world_time.get() > t0)          # the IOC itself stays alive
    with pytest.raises(InstrumentRefused, match="does not answer"):   # the put fails at once
        set_and_check(layer.g1t.pw, 1, timeout=5.0)
    assert not sim.powered(3)[layer.g1t.channel]
    epics.caput(p + "Sim:Unreachable", 0, wait=True, timeout=5)
    assert wait_until(lambda: layer.connected_rbv.get() == 1)
