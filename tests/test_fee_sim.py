"""The FEE world (iocs/sim/fee.py): pulse physics, cable, quantisation, sequencer, refusals."""
from __future__ import annotations

import time

import numpy as np
import pytest

from calbench.analysis.timewalk import fit_temperature_coefficient, fit_transit_time
from calbench.contracts.errors import Refused
from calbench.contracts.clock import WorldClock
from calbench.contracts.fee import ADC_FINE_LSB_PC, DAC_FULL_SCALE_PC, DAC_MAX, TDC_LSB_NS
from calbench.iocs.sim.fee import FeeBoardSim

REGISTERS = np.arange(500, 12001)


def board(seed: int = 11, time_scale: float = 1.0) -> FeeBoardSim:
    b = FeeBoardSim(WorldClock(time_scale), seed)
    b.environment.daily_swing_K = 0.0
    b.environment.weather_K = 0.0
    return b


def test_time_walk_emerges_from_the_pulse_shape():
    b = board()
    curve = b.walk_curve(0, REGISTERS)
    walk_d = curve["t_direct_ns"] - curve["t0_direct_ns"]
    walk_r = curve["t_reflected_ns"] - curve["t0_reflected_ns"]
    fired = np.isfinite(walk_r)
    # later crossings for smaller pulses, never before the pulse starts
    assert np.all(np.diff(walk_d) <= 1e-9) and walk_d.min() > 0
    assert np.all(np.diff(walk_r[fired]) <= 1e-9) and walk_r[fired].min() > 0
    # the dispersed, 30x smaller reflection walks over many more TDC bins than the direct pulse
    span_d, span_r = np.ptp(walk_d), np.ptp(walk_r[fired])
    assert span_d > 3 * TDC_LSB_NS
    assert span_r > 3 * span_d
    # the smallest reflections do not reach the threshold: it lies inside the paper's sweep
    assert 0 < (~fired).sum() < 0.1 * fired.size


def test_charges_follow_the_dac_and_the_cable_attenuates_the_reflection():
    b = board()
    assert b.charge_of(np.array([DAC_MAX]))[0] == pytest.approx(DAC_FULL_SCALE_PC, abs=0.05)
    r = b.pulses(0, REGISTERS, np.full(REGISTERS.size, b.clock.now()))
    assert np.nanmax(r.direct_charge_pC) == pytest.approx(336.0, abs=1.0)
    # the paper: 0..336 pC direct, 0..12 pC reflected (20 m of RG58 by default)
    assert np.nanmax(r.reflected_charge_pC) == pytest.approx(12.0, abs=0.5)
    b.cables[0].length_m = 150.0          # longer cable: more loss, slower reflection
    r150 = b.pulses(0, REGISTERS, np.full(REGISTERS.size, b.clock.now()))
    assert np.nanmax(r150.reflected_charge_pC) < 0.8 * np.nanmax(r.reflected_charge_pC)
    assert np.nanmedian(r150.reflected_time_ns - r150.direct_time_ns) > 1400.0   # 2 x 150 m / v


def test_tdc_and_adc_quantisation():
    b = board()
    r = b.pulses(0, REGISTERS, np.full(REGISTERS.size, b.clock.now()))
    for t in (r.direct_time_ns, r.reflected_time_ns):
        t = t[np.isfinite(t)]
        assert np.allclose(t / TDC_LSB_NS, np.round(t / TDC_LSB_NS), atol=1e-9)
    q = r.reflected_charge_pC[np.isfinite(r.reflected_charge_pC)]
    assert np.allclose(q / ADC_FINE_LSB_PC, np.round(q / ADC_FINE_LSB_PC), atol=1e-6)


def test_no_cable_means_no_reflection():
    b = board()
    b.set_cable_length(4, 0.0)
    r = b.pulses(4, REGISTERS, np.full(REGISTERS.size, b.clock.now()))
    assert np.isnan(r.reflected_time_ns).all() and np.isfinite(r.direct_time_ns).all()


def test_seeded_and_reproducible():
    times = np.zeros(REGISTERS.size)
    a = board(5).pulses(2, REGISTERS, times, rng=np.random.default_rng(1))
    b = board(5).pulses(2, REGISTERS, times, rng=np.random.default_rng(1))
    c = board(6).pulses(2, REGISTERS, times, rng=np.random.default_rng(1))
    assert np.array_equal(a.reflected_time_ns, b.reflected_time_ns, equal_nan=True)
    assert not np.array_equal(a.reflected_time_ns, c.reflected_time_ns, equal_nan=True)


def test_transit_time_follows_the_temperature_and_the_fit_recovers_the_coefficient():
    """0.01 %/K of 2L/v: the walk fit at five temperatures recovers the cable's coefficient."""
    b = board(3)
    temps, dts = [], []
    for i, temp in enumerate((0.0, 10.0, 20.0, 30.0, 40.0)):
        b.environment.mean_C = temp
        r = b.pulses(0, REGISTERS, np.full(REGISTERS.size, b.clock.now()),
                     rng=np.random.default_rng(i))
        fit = fit_transit_time(r.direct_charge_pC, r.direct_time_ns, r.reflected_charge_pC,
                               r.reflected_time_ns, "likelihood", amplitude=REGISTERS)
        temps.append(b.temperature_C())
        dts.append(fit.dt_ns)
    truth = b.cables[0].transit_ns(np.array(temps))
    assert np.ptp(truth) == pytest.approx(2 * 20.0 / 0.208 * 1e-4 * 40.0, rel=1e-6)
    c, c_err, _ = fit_temperature_coefficient(temps, dts)
    assert c == pytest.approx(1.0e-4, rel=0.3)
    assert c_err < 0.3e-4


def test_sequencer_runs_in_world_time_and_stops_early():
    b = board(time_scale=2.0)         # 11,501 pulses at 10 kHz: 1.15 world s, 0.58 s here
    b.set_sweep_range(500, 12000, 1)
    b.set_channel_mask(0b101)
    assert b.start_sweep() == 11501
    busy, done, total = b.sweep_status()
    assert busy and total == 11501 and b.sweep_result() is None
    with pytest.raises(Refused, match="sweep is running"):
        b.start_sweep()
    with pytest.raises(Refused, match="sweep is running"):
        b.set_sweep_range(0, 10, 1)
    deadline = time.monotonic() + 10
    while b.sweep_status()[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    result = b.sweep_result()
    assert result.complete and set(result.channels) == {0, 2}
    assert result.registers[0] == 500 and result.registers[-1] == 12000
    assert result.period_s == pytest.approx(1e-4) and result.pulse_times[0] > 0
    # a stopped sweep delivers the pulses done so far
    b.start_sweep()
    time.sleep(0.02)
    b.stop_sweep()
    partial = b.sweep_result()
    assert not partial.complete and 0 < len(partial.registers) < 11501
    assert len(partial.channels[0].direct_time_ns) == len(partial.registers)


def test_refusals_name_the_cause_and_make_safe():
    b = board()
    with pytest.raises(Refused, match="outside 0..65535"):
        b.set_register(70000)
    with pytest.raises(Refused, match="sweep start -1 outside the DAC register"):
        b.set_sweep_range(-1, 100, 1)
    with pytest.raises(Refused, match="sweep stop 65536 outside the DAC register"):
        b.set_sweep_range(0, 65536, 1)
    with pytest.raises(Refused, match="step 0"):
        b.set_sweep_range(0, 100, 0)
    with pytest.raises(Refused, match="channel 3: threshold"):
        b.set_threshold(3, 1e4)
    with pytest.raises(Refused, match="at least one"):
        b.set_channel_mask(0)
    b.set_sweep_range(900, 800, 1)
    with pytest.raises(Refused, match="above stop"):
        b.start_sweep()
    b.set_register(1234)
    b.set_sweep_range(500, 12000, 1)
    b.start_sweep()
    b.make_safe()
    assert b.register == 0 and not b.sweep_status()[0]
