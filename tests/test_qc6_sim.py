"""The QC6 world's physics (iocs/sim/qc6.py), stepped by a hand-held world clock: exact ramps,
Ohm's law plus leakage, Poisson discharges whose rate follows the hidden exp(V / v_scale) law, trip
timers, CAEN status bits, PDwn kill/ramp, SVMax clamp, refusals, unreachable crate."""
from __future__ import annotations

import math

import numpy as np
import pytest

from calbench.contracts.errors import InstrumentFault, Refused
from calbench.iocs.sim.qc6 import (
    ITRIP, MAXV, ON, OVC, RDW, RUP, CaenCrateSim, build_world)

SLOT = 3
G1T = 5          # a foil
DRIFT = 6        # a gap


class SteppedClock:
    """World time that moves only when the test says so (the simulator reads `now()`)."""
    time_scale = 1.0

    def __init__(self, start: float = 1.8e9):
        self.t = start

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def world():
    clock = SteppedClock()
    return clock, CaenCrateSim(clock, seed=7, slot=SLOT)


def board(sim):
    return sim.read_board(SLOT)


def test_crate_map_and_channel_names(world):
    _, sim = world
    (b,) = sim.crate_map()
    assert (b.slot, b.model, b.n_channels) == (SLOT, "A1515TG", 14)
    names = board(sim)["ChName"]
    assert names[:7] == ["L1_G3B", "L1_G3T", "L1_G2B", "L1_G2T", "L1_G1B", "L1_G1T", "L1_Drift"]
    assert names[12] == "L2_G1T"


def test_vmon_ramps_at_rup_and_rdwn_with_status_bits(world):
    clock, sim = world
    sim.set_param(SLOT, G1T, "RUp", 20.0)
    sim.set_param(SLOT, G1T, "RDWn", 50.0)
    sim.set_param(SLOT, G1T, "Pw", 1)
    sim.set_param(SLOT, G1T, "V0Set", 400.0)
    clock.advance(10.0)
    assert sim.voltages(SLOT)[G1T] == pytest.approx(200.0)
    assert board(sim)["Status"][G1T] & (ON | RUP) == ON | RUP
    clock.advance(15.0)
    assert sim.voltages(SLOT)[G1T] == pytest.approx(400.0)
    assert board(sim)["Status"][G1T] == ON
    sim.set_param(SLOT, G1T, "Pw", 0)                # switching off ramps down at RDWn
    clock.advance(4.0)
    assert sim.voltages(SLOT)[G1T] == pytest.approx(200.0)
    assert board(sim)["Status"][G1T] == RDW
    clock.advance(10.0)
    assert sim.voltages(SLOT)[G1T] == 0.0 and board(sim)["Status"][G1T] == 0


def test_imon_is_ohmic_leakage_plus_offset_plus_charging_current(world):
    clock, sim = world
    sim.spark_rate_scale = 0.0
    phys = sim.physics(SLOT, DRIFT)
    sim.set_param(SLOT, DRIFT, "Pw", 1)
    sim.set_param(SLOT, DRIFT, "V0Set", 1000.0)
    clock.advance(50.0)                              # mid-ramp at 10 V/s: C dV/dt adds
    ramping = np.mean([board(sim)["IMon"][DRIFT] for _ in range(200)])
    expect = 500.0 / (phys.leak_GOhm * 1e3) + phys.offset_uA + phys.capacitance_nF * 10 * 1e-3
    assert ramping == pytest.approx(expect, abs=2e-4)
    clock.advance(100.0)
    held = np.array([board(sim)["IMon"][DRIFT] for _ in range(400)])
    assert held.mean() == pytest.approx(1000.0 / (phys.leak_GOhm * 1e3) + phys.offset_uA, abs=1e-4)
    assert 0.0002 < held.std() < 0.001               # the read-out noise


def test_spark_count_follows_the_hidden_rate_law(world):
    """Discharges at two fixed voltages are Poisson with rate_ref * exp((V - v_ref) / v_scale)."""
    clock, sim = world
    phys = sim.physics(SLOT, G1T)
    sim.set_param(SLOT, G1T, "I0Set", 20.0)          # discharges (<= 60 uA) may trip: count them
    sim.set_param(SLOT, G1T, "Trip", 1000.0)         # ... but never trip
    sim.set_param(SLOT, G1T, "Pw", 1)
    counts = {}
    for volts, hold in ((620.0, 4000.0), (660.0, 1500.0)):
        sim.set_param(SLOT, G1T, "V0Set", volts)
        clock.advance(100.0)
        before = sim.sparks(SLOT, G1T)
        clock.advance(hold)
        counts[volts] = (sim.sparks(SLOT, G1T) - before, phys.spark_rate(volts) * hold)
    for n, expected in counts.values():
        assert abs(n - expected) < 5 * math.sqrt(expected) + 2, counts
    # the ratio recovers the hidden e-folding voltage within its Poisson error
    (n1, e1), (n2, e2) = counts[620.0], counts[660.0]
    v_scale = 40.0 / math.log((n2 / 1500.0) / (n1 / 4000.0))
    assert v_scale == pytest.approx(phys.spark_v_scale_V, rel=0.35)


def test_a_discharge_longer_than_trip_trips_the_channel_kill_mode(world):
    clock, sim = world
    sim.spark_rate_scale = 0.0
    sim.set_param(SLOT, G1T, "Trip", 2.0)
    sim.set_param(SLOT, G1T, "Pw", 1)
    sim.set_param(SLOT, G1T, "V0Set", 500.0)
    clock.advance(60.0)
    sim.inject_discharge(SLOT, G1T, duration_s=1.5, current_uA=30.0)   # shorter than Trip
    clock.advance(0.5)
    assert board(sim)["Status"][G1T] & OVC
    clock.advance(2.0)
    assert board(sim)["Status"][G1T] == ON and sim.trip_log == []
    sim.inject_discharge(SLOT, G1T, duration_s=10.0, current_uA=30.0)
    t_start = clock.t
    clock.advance(5.0)
    (trip,) = sim.trip_log
    assert trip.time == pytest.approx(t_start + 2.0) and trip.voltage_V == pytest.approx(500.0)
    b = board(sim)
    assert b["Status"][G1T] == ITRIP and b["Pw"][G1T] == 0 and b["VMon"][G1T] == 0.0
    with pytest.raises(Refused, match="ClearAlarm"):
        sim.set_param(SLOT, G1T, "Pw", 1)
    sim.clear_alarm()
    assert board(sim)["Status"][G1T] == 0
    sim.set_param(SLOT, G1T, "Pw", 1)


def test_pdwn_ramp_ramps_down_after_a_trip_and_a_short_trips_on_steady_current(world):
    clock, sim = world
    sim.spark_rate_scale = 0.0
    sim.set_param(SLOT, G1T, "PDwn", 1)
    sim.set_param(SLOT, G1T, "Pw", 1)
    sim.set_param(SLOT, G1T, "V0Set", 500.0)
    clock.advance(60.0)
    sim.set_short(SLOT, G1T, 0.1)                    # 100 MOhm: 5 uA at 500 V > I0Set 2 uA
    clock.advance(1.5)                               # Trip 1 s
    assert len(sim.trip_log) == 1
    clock.advance(10.0)                              # RDWn 10 V/s after the trip at t+1
    assert sim.voltages(SLOT)[G1T] == pytest.approx(500.0 - 10.0 * 10.5, abs=0.1)
    assert board(sim)["Status"][G1T] == ITRIP | RDW


def test_v0set_above_svmax_is_clamped_and_out_of_range_values_are_refused(world):
    clock, sim = world
    sim.set_param(SLOT, G1T, "SVMax", 600.0)
    assert sim.set_param(SLOT, G1T, "V0Set", 650.0) == 600.0
    sim.set_param(SLOT, G1T, "Pw", 1)
    clock.advance(100.0)
    b = board(sim)
    assert b["V0Set"][G1T] == 600.0 and sim.voltages(SLOT)[G1T] == pytest.approx(600.0)
    assert b["Status"][G1T] & MAXV
    with pytest.raises(Refused, match="outside 0..1200 V"):
        sim.set_param(SLOT, G1T, "V0Set", 1500.0)
    with pytest.raises(Refused, match="I0Set"):
        sim.set_param(SLOT, G1T, "I0Set", -1.0)
    with pytest.raises(Refused, match="slot 3"):
        sim.set_param(4, 0, "V0Set", 10.0)
    with pytest.raises(Refused, match="no settable parameter"):
        sim.set_param(SLOT, 0, "VMon", 10.0)


def test_kill_make_safe_and_an_unreachable_crate(world):
    clock, sim = world
    for ch in range(7):
        sim.set_param(SLOT, ch, "Pw", 1)
        sim.set_param(SLOT, ch, "V0Set", 300.0)
    clock.advance(40.0)
    sim.kill()
    assert sim.voltages(SLOT)[:7] == [0.0] * 7 and not any(sim.powered(SLOT))
    for ch in range(7):
        sim.set_param(SLOT, ch, "Pw", 1)
    clock.advance(40.0)
    sim.make_safe()
    clock.advance(40.0)
    assert sim.voltages(SLOT)[:7] == [0.0] * 7
    sim.unreachable = True
    with pytest.raises(InstrumentFault, match="does not answer"):
        sim.read_board(SLOT)
    with pytest.raises(InstrumentFault):
        sim.set_param(SLOT, 0, "Pw", 1)
    sim.unreachable = False
    assert board(sim)["Pw"][:7] == [0] * 7


def test_the_world_is_seeded(world):
    clock, _ = world
    a = build_world(clock, 11, {"caen": {"slot": 2}})["caen"]
    b = build_world(clock, 11, {"caen": {"slot": 2}})["caen"]
    c = build_world(clock, 12, {"caen": {"slot": 2}})["caen"]
    assert a.physics(2, G1T) == b.physics(2, G1T) != c.physics(2, G1T)
    assert a.crate_map()[0].slot == 2
