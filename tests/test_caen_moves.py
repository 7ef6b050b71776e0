"""The CAEN channel's own move (HvChannel.set, GemLayer.set) against the simulated crate: it owns the
arrival rule (not ramping, within 1 V of V0Set as the crate holds it, i.e. capped at SVMax), fails
with the channel's trip or switch-off, and a plan's stop withdraws it while a pause leaves it going.
Channels are switched on at the simulator (a Pw On through the IOC needs the procedure lease)."""
from __future__ import annotations

import time

import pytest

from calbench.devices.caen import ChannelOff, ChannelTripped
from qc6_support import qc6  # noqa: F401  (a fixture)

MOVE_S = 60.0        # wall seconds a move of a few hundred volts may take on a loaded host


def switch_on(sim, *channels) -> None:
    """On at the crate, and until the devices' own fresh reads show it."""
    for ch in channels:
        sim.set_param(sim.slot, ch.channel, "Pw", 1)
    deadline = time.monotonic() + MOVE_S
    for ch in channels:
        while int(ch.pw.get(use_monitor=False)) != 1:
            assert time.monotonic() < deadline, f"{ch.label()} never showed Pw On"
            time.sleep(0.02)


def slow_move(sim, ch, volts: float):
    """A move at 1 V/s (world): far from arriving while the test acts on it."""
    sim.set_param(sim.slot, ch.channel, "RUp", 1.0)
    switch_on(sim, ch)
    return ch.set(volts)


def test_a_move_arrives_at_the_voltage_the_crate_holds(qc6):
    _, layer, sim = qc6
    g1t = layer.g1t
    sim.set_param(sim.slot, g1t.channel, "SVMax", 300.0)
    switch_on(sim, g1t)
    g1t.set(250.0).wait(MOVE_S)
    assert abs(sim.voltages(sim.slot)[g1t.channel] - 250.0) <= 1.0
    g1t.set(400.0).wait(MOVE_S)                   # above SVMax: it arrives at SVMax
    assert abs(sim.voltages(sim.slot)[g1t.channel] - 300.0) <= 1.0


def test_a_layer_move_is_one_status_failed_by_the_channel_that_trips(qc6):
    _, layer, sim = qc6
    switch_on(sim, layer.g1t, layer.g2t)
    layer.set({"g1t": 100.0, "g2t": 120.0}).wait(MOVE_S)
    voltages = sim.voltages(sim.slot)
    assert abs(voltages[layer.g1t.channel] - 100.0) <= 1.0
    assert abs(voltages[layer.g2t.channel] - 120.0) <= 1.0
    sim.set_short(sim.slot, layer.g2t.channel, 0.001)      # 1 MOhm: far above I0Set
    status = layer.set({"g1t": 300.0, "g2t": 300.0})
    with pytest.raises(ChannelTripped, match=r"g2t \(channel \d+\).* tripped") as tripped:
        status.wait(MOVE_S)
    assert tripped.value.channel is layer.g2t and tripped.value.bits


def test_a_channel_switched_off_on_the_way_fails_its_move(qc6):
    _, layer, sim = qc6
    g3t = layer.g3t
    status = slow_move(sim, g3t, 1000.0)
    sim.set_param(sim.slot, g3t.channel, "Pw", 0)
    with pytest.raises(ChannelOff, match="went off without a trip"):
        status.wait(MOVE_S)
    with pytest.raises(ChannelOff, match="switched off"):  # and a move of a channel off fails at once
        g3t.set(10.0).wait(MOVE_S)


def test_a_pause_leaves_a_move_going_and_a_plans_stop_withdraws_it(qc6):
    _, layer, sim = qc6
    g2t = layer.g2t
    status = slow_move(sim, g2t, 1000.0)
    # off at once: the move can neither arrive nor fail before two fresh looks (RECHECK_S apart)
    sim.set_param(sim.slot, g2t.channel, "Pw", 0)
    layer.stop(success=True)                  # what the RunEngine calls on a pause
    assert not status.done
    layer.stop()                              # bps.stop(layer): nobody waits on the move any more
    status.wait(5)
    assert status.success
