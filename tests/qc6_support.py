"""Shared pieces of the QC6 tests: the crate and a GEM layer on the session's simulated lab, put
back to factory state for each test, and the check that a layer ended safe."""
from __future__ import annotations

import time

import pytest

from calbench.iocs.sim.qc6 import HW_VMAX_V
from conftest import TEST_TIME_SCALES

OFF_V = 2.0
_LAYERS: dict = {}


def reset_crate(sim) -> None:
    """Factory state: link up, no fault, every channel off at 0 V with default settings."""
    sim.unreachable = False
    sim.spark_rate_scale = 1.0
    sim.kill()
    sim.clear_alarm()
    for ch in range(14):
        sim.set_short(sim.slot, ch, None)
        for name, value in (("V0Set", 0.0), ("SVMax", HW_VMAX_V), ("I0Set", 2.0), ("RUp", 10.0),
                            ("RDWn", 10.0), ("Trip", 1.0), ("PDwn", 0)):
            sim.set_param(sim.slot, ch, name, value)


@pytest.fixture
def qc6(lab):
    """(crate device, layer-1 GemLayer, simulated backend), reset before and after the test."""
    sim = lab.backend("caen")
    reset_crate(sim)
    crate = lab.device("caen")
    key = (crate.prefix, 1)
    if key not in _LAYERS:                # one device for the session: 84 PVs to connect
        _LAYERS[key] = crate.layer(1, timeout=30.0)
    layer = _LAYERS[key]
    _wait_for_reset_state(layer)
    yield crate, layer, sim
    reset_crate(sim)


def _shows_reset_state(ch) -> bool:
    return (int(ch.pw.get()) == 0 and float(ch.vmon.get()) == 0.0 and int(ch.status.get()) == 0
            and float(ch.v0set.get()) == 0.0 and float(ch.svmax.get()) == HW_VMAX_V
            and float(ch.rup.get()) == 10.0)


def _wait_for_reset_state(layer, cap_s: float = 120.0) -> None:
    """Until the device's monitors show the factory state (the IOC publishes it on its poll)."""
    deadline = time.monotonic() + cap_s
    while not all(_shows_reset_state(ch) for ch in layer.channels):
        assert time.monotonic() < deadline, "the layer's PVs never showed the reset crate"
        time.sleep(0.02)


def layer_channels(layer) -> list[int]:
    return [ch.channel for ch in layer.channels]


def assert_layer_safe(layer, sim) -> None:
    """Every channel of the layer is off and discharged, in the simulator's truth and on the PVs."""
    truth_v = sim.voltages(sim.slot)
    truth_pw = sim.powered(sim.slot)
    for ch in layer.channels:
        assert not truth_pw[ch.channel], f"{ch.label()} is still powered"
        assert truth_v[ch.channel] < OFF_V, f"{ch.label()} still at {truth_v[ch.channel]:.1f} V"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if all(ch.pw.get() == 0 and ch.vmon.get() < OFF_V for ch in layer.channels):
            return
        time.sleep(0.05)
    raise AssertionError("the PVs do not show the layer off: " + ", ".join(
        f"{ch.label()} Pw={ch.pw.get()} VMon={ch.vmon.get()}" for ch in layer.channels))


# A trip is timed by the IOC poll that first shows it; on a loaded host a poll can come a few tenths
# of a wall second late, which is thousands of world seconds on the accelerated clock.
POLL_LATENCY_S = max(900.0, 0.5 * TEST_TIME_SCALES["qc6"])


def assert_trips_match(recorded, truth, *, max_step_V: float = 0.0,
                       latency_s: float = POLL_LATENCY_S, sim=None):
    """The recorded trips (rows of a "trips" stream) are the crate's trips (the simulator's log):
    channel by channel, the same number in the same order, each seen after it happened and within
    `latency_s` world seconds (or, given the simulator, timed by the crate reading that first showed
    it, however late a loaded host made that reading), with the voltage before it within one step
    (max_step_V) below."""
    rows = [] if recorded is None else list(recorded.itertuples())
    assert sorted(r.trip_channel for r in rows) == sorted(t.channel for t in truth), \
        (sorted(r.trip_channel for r in rows), sorted(t.channel for t in truth))
    for channel in {t.channel for t in truth}:
        mine = sorted((r for r in rows if r.trip_channel == channel), key=lambda r: r.trip_time)
        real = [t for t in truth if t.channel == channel]
        for row, t in zip(mine, real):
            timed = t.time - 1.0 <= row.trip_time <= t.time + latency_s
            if not timed and sim is not None:
                first, after = sim.readings_around(t.time)
                timed = first <= row.trip_time <= after
            assert timed, (channel, row, t)
            # a last look taken mid-ramp (VMon short of V0Set) may be well below the trip voltage
            # (looks are many world seconds apart at high acceleration); a look at the held
            # voltage agrees with the crate within one step
            seen_held = abs(row.trip_voltage - row.trip_v0set) <= 1.0
            if row.trip_v0set < row.trip_voltage - 1.0:
                # seen ramping down (V0Set below VMon): the trip came between that look and V0Set
                assert row.trip_v0set - 1.0 <= t.voltage_V <= row.trip_voltage + 1.0, \
                    (channel, row, t)
                continue
            low = t.voltage_V - max_step_V - 1.0 if seen_held else 0.0
            assert low <= row.trip_voltage <= t.voltage_V + 1.0, (channel, row, t)
