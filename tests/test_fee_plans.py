"""FEE end to end: FeeIOC on loopback, the fly-scanning device, the plans, runs stored in tiled."""
from __future__ import annotations

import numpy as np
import pytest
from ophyd import EpicsSignal

from calbench.analysis.fee_callbacks import refit_run
from calbench.procedures.fee_paper import walk_model_bias
from calbench.plans.fee import FeeCalibrationError, realtime_cable_monitor, transit_time_calibration

REGISTERS = np.arange(500, 12001)


@pytest.fixture(scope="module")
def fee(lab):
    return lab.device("fee")


@pytest.fixture
def cable_lengths(lab):
    """The simulated cables as PV (Sim:CableLength), restored after the test."""
    signal = EpicsSignal(lab.prefix_of("fee") + "Sim:CableLength", name="cable_lengths")
    signal.wait_for_connection(timeout=10)
    before = np.array(signal.get(use_monitor=False), dtype=float)
    yield signal, before.copy()
    signal.put(before, wait=True)


def run(RE, plan):
    """RE(plan) returning the plan's own return value."""
    out = {}

    def wrapper():
        out["value"] = yield from plan

    RE(wrapper())
    return out.get("value")


def test_calibration_stores_the_sweep_and_the_fit(RE, lab, fee, tmp_path):
    sim = lab.backend("fee")
    cal = run(RE, transit_time_calibration(fee, 1, method="likelihood", plot_dir=tmp_path))
    truth = sim.truth(1, cal.time)
    # the fit recovers 2L/v plus the walk model's own bias on the simulated (dispersed) shapes
    curve = sim.walk_curve(1, REGISTERS, cal.time)
    r = cal.result
    model_bias = (walk_model_bias("likelihood", curve["q_reflected_pC"], curve["t_reflected_ns"],
                                  curve["t0_reflected_ns"], r.reflected.q_min_pC)
                  - walk_model_bias("likelihood", curve["q_direct_pC"], curve["t_direct_ns"],
                                    curve["t0_direct_ns"], r.direct.q_min_pC))
    assert abs(r.dt_ns - truth["transit_ns"] - model_bias) < 4 * r.dt_err_ns + 0.15
    assert cal.temperature_C == pytest.approx(truth["temperature_C"], abs=0.1)
    # the sweep: one event, arrays of 11,501 pulses; the fit: a derived run pointing at it
    sweep = RE.catalog[cal.sweep_uid]
    assert sweep.start["channel"] == 1 and sweep.stop["exit_status"] == "success"
    times = sweep["fee_sweep"]["fee_ch01_sweep_reflected_time"].read()
    assert np.asarray(times).shape == (1, 11501)
    fit_run = RE.catalog[cal.fit_uid]
    assert fit_run.start["parent_uid"] == cal.sweep_uid
    stored_dt = fit_run["fit"]["fee_ch01_dt_ns"].read()
    assert float(np.asarray(stored_dt).ravel()[0]) == pytest.approx(r.dt_ns)
    # re-analysing the stored run gives the same answer as the live fit
    again = refit_run(sweep, "likelihood")[1]
    assert again.result.dt_ns == pytest.approx(r.dt_ns, abs=1e-9)
    assert list(tmp_path.glob("fee_ch01_walk_*.png"))
    # left safe: sequencer stopped, DAC parked at 0
    assert int(fee.seq_busy.get(use_monitor=False)) == 0
    assert int(fee.cal_dac.get(use_monitor=False)) == 0


def test_sweep_outside_the_register_is_refused(RE, fee):
    with pytest.raises(FeeCalibrationError, match="channel 2: setting Seq:Stop = 70000 failed: "
                                                  ".*Seq:Stop = 70000 is outside 0..65535"):
        run(RE, transit_time_calibration(fee, 2, start=500, stop=70000))
    assert int(fee.seq_busy.get(use_monitor=False)) == 0
    assert int(fee.cal_dac.get(use_monitor=False)) == 0


def test_too_few_tdc_bins(RE, fee):
    with pytest.raises(FeeCalibrationError, match="channel 3: .*TDC bin"):
        run(RE, transit_time_calibration(fee, 3, start=11000, stop=12000))
    failed = RE.catalog[-1]
    assert failed.start["procedure"] == "fee_transit_time_fit"
    assert failed.stop["exit_status"] == "fail" and "TDC bin" in failed.stop["reason"]


def test_monitor_goes_on_when_a_channel_has_no_cable(RE, lab, fee, cable_lengths, tmp_path):
    signal, lengths = cable_lengths
    lengths[5] = 0.0
    signal.put(lengths, wait=True)
    scale = lab.ioc("fee").clock.time_scale
    every_s = min(1200.0, 2.0 * scale)     # world seconds: 20 minutes when the world runs fast
    history = run(RE, realtime_cable_monitor(fee, [4, 5], every_s, cycles=2, plot_dir=tmp_path))
    ok = [e for e in history if e.channel == 4]
    bad = [e for e in history if e.channel == 5]
    assert len(ok) == 2 and all(not e.error for e in ok)
    assert len(bad) == 2 and all("channel 5: no reflected pulse" in e.error for e in bad)
    # the rounds are `every_s` apart on the board's clock
    assert ok[1].time - ok[0].time >= every_s * 0.99
    truth = lab.backend("fee").truth(4)["transit_ns"]
    assert all(abs(e.dt_ns - truth) < 5.0 for e in ok)
    assert (tmp_path / "fee_ch04_monitor.png").exists()
    assert int(fee.cal_dac.get(use_monitor=False)) == 0
