"""calbench.analysis.timewalk: the walk fit, both estimators side by side, bad input, velocity."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calbench.analysis.timewalk import (TDC_LSB_NS, TransitFitError, fit_transit_time, fit_velocity,
                                        fit_walk, plot_monitor_history, plot_walk_fits, walk_model)
from calbench.procedures.fee_paper import walk_model_bias
from calbench.contracts.clock import WorldClock
from calbench.iocs.sim.fee import FeeBoardSim

REGISTERS = np.arange(500, 12001)


@pytest.fixture(scope="module")
def sim():
    b = FeeBoardSim(WorldClock(), 21)
    b.environment.daily_swing_K = 0.0
    b.environment.weather_K = 0.0
    return b


def sweep(board, channel=0, seed=0, registers=REGISTERS):
    return board.pulses(channel, registers, np.full(registers.size, board.clock.now()),
                        rng=np.random.default_rng(seed))


def quantised_model_pulses(t0, a, b, jitter, seed, n=11501):
    """Pulses that follow the walk model exactly (charges uniform like a DAC sweep), smeared by
    Gaussian jitter and quantised by a TDC synchronous with the pulses."""
    rng = np.random.default_rng(seed)
    q = np.linspace(14.0, 336.0, n)
    t = walk_model(q, t0, a, b) + jitter * rng.standard_normal(n)
    return q, np.floor(t / TDC_LSB_NS) * TDC_LSB_NS


def test_likelihood_recovers_t0_of_model_pulses_with_honest_errors():
    """Pulses that follow the model exactly: T0 comes back beyond the 1.5625 ns LSB, and the
    reported error describes the scatter (pulls below 4, their rms near 1)."""
    pulls = []
    for seed in range(8):
        t0 = 200.0 + 0.37 * seed          # sub-LSB positions relative to the bins
        q, t = quantised_model_pulses(t0, 60.0, 40.0, 0.3, seed)
        fit = fit_walk(q, t, "likelihood", q_min_pC=0.0)
        pulls.append((fit.t0_ns - t0) / fit.t0_err_ns)
        assert fit.t0_err_ns < 0.05
    pulls = np.array(pulls)
    assert np.abs(pulls).max() < 4.0
    assert 0.3 < np.sqrt(np.mean(pulls ** 2)) < 2.0


def test_estimators_side_by_side_on_the_simulated_board(sim, tmp_path):
    """Both estimators recover 2L/v plus the walk model's own bias on the simulated shapes (the
    skin effect's slow onset), to within their errors; the naive estimate is far off."""
    truth = sim.truth(0)
    curve = sim.walk_curve(0, REGISTERS)
    r = sweep(sim, seed=3)
    results = {}
    for method in ("binned", "likelihood"):
        fit = fit_transit_time(r.direct_charge_pC, r.direct_time_ns, r.reflected_charge_pC,
                               r.reflected_time_ns, method, amplitude=REGISTERS, label="channel 0")
        model_bias = (walk_model_bias(method, curve["q_reflected_pC"], curve["t_reflected_ns"],
                                      curve["t0_reflected_ns"], fit.reflected.q_min_pC)
                      - walk_model_bias(method, curve["q_direct_pC"], curve["t_direct_ns"],
                                        curve["t0_direct_ns"], fit.direct.q_min_pC))
        expected = truth["transit_ns"] + model_bias
        # binned: the pairing of a bin's mean charge with its centre adds up to ~0.4 ns
        allowance = 0.5 if method == "binned" else 0.15
        assert abs(fit.dt_ns - expected) < 4 * fit.dt_err_ns + allowance, method
        assert fit.length_m == pytest.approx(0.208 * fit.dt_ns / 2)
        assert fit.reflected.threshold_charge_pC == pytest.approx(truth["reflected_threshold_pC"],
                                                                 rel=0.15)
        results[method] = fit
    assert results["likelihood"].dt_err_ns < results["binned"].dt_err_ns
    assert results["likelihood"].reflected.jitter_ns > 0
    # the walk of the reflection stays in the naive estimate: many ns
    assert results["binned"].naive_dt_ns - truth["transit_ns"] > 5.0
    fig = plot_walk_fits(r.direct_charge_pC, r.direct_time_ns, r.reflected_charge_pC,
                         r.reflected_time_ns, results["binned"], tmp_path / "walk.png")
    assert (tmp_path / "walk.png").stat().st_size > 10_000 and len(fig.axes) == 2
    plot_monitor_history([0, 3600, 7200, 10800], [15.0, 18.0, 21.0, 19.0],
                         [192.3, 192.4, 192.5, 192.4], [0.05] * 4, tmp_path / "monitor.png")
    assert (tmp_path / "monitor.png").stat().st_size > 10_000


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shift=st.integers(min_value=-40, max_value=40),
       method=st.sampled_from(["binned", "likelihood"]))
def test_whole_bin_shifts_move_dt_by_exactly_that(shift, method):
    """A delay of n TDC bins on the reflections (a longer cable by whole bins) moves dt by exactly
    n LSB; the same delay on both pulses leaves dt unchanged."""
    b = FeeBoardSim(WorldClock(), 4)
    r = b.pulses(1, REGISTERS, np.zeros(REGISTERS.size), rng=np.random.default_rng(9))
    base = fit_transit_time(r.direct_charge_pC, r.direct_time_ns, r.reflected_charge_pC,
                            r.reflected_time_ns, method, amplitude=REGISTERS)
    moved = fit_transit_time(r.direct_charge_pC, r.direct_time_ns, r.reflected_charge_pC,
                             r.reflected_time_ns + shift * TDC_LSB_NS, method, amplitude=REGISTERS)
    both = fit_transit_time(r.direct_charge_pC, r.direct_time_ns + shift * TDC_LSB_NS,
                            r.reflected_charge_pC, r.reflected_time_ns + shift * TDC_LSB_NS, method,
                            amplitude=REGISTERS)
    assert moved.dt_ns - base.dt_ns == pytest.approx(shift * TDC_LSB_NS, abs=1e-6)
    assert both.dt_ns == pytest.approx(base.dt_ns, abs=1e-6)


def test_bad_input_names_the_channel_and_the_cause(sim):
    r = sweep(sim, seed=1)
    args = (r.direct_charge_pC, r.direct_time_ns)
    nothing = np.full(REGISTERS.size, np.nan)
    with pytest.raises(TransitFitError, match="channel 7: no reflected pulse .* no cable connected"):
        fit_transit_time(*args, nothing, nothing, label="channel 7")
    with pytest.raises(TransitFitError, match="channel 7: no direct pulse fired"):
        fit_transit_time(nothing, nothing, r.reflected_charge_pC, r.reflected_time_ns,
                         label="channel 7")
    # a sweep over the largest pulses only: the walk hardly moves them
    top = REGISTERS >= 11000
    with pytest.raises(TransitFitError, match="channel 2: .* TDC bin.*start the sweep at a lower"):
        fit_transit_time(r.direct_charge_pC[top], r.direct_time_ns[top], r.reflected_charge_pC[top],
                         r.reflected_time_ns[top], label="channel 2")
    with pytest.raises(TransitFitError, match="differ in length"):
        fit_transit_time(r.direct_charge_pC[:-1], r.direct_time_ns, r.reflected_charge_pC,
                         r.reflected_time_ns)
    with pytest.raises(TransitFitError, match="not multiples of the TDC LSB"):
        fit_transit_time(r.direct_charge_pC, r.direct_time_ns + 0.3, r.reflected_charge_pC,
                         r.reflected_time_ns)
    with pytest.raises(TransitFitError, match="unknown method 'median'"):
        fit_transit_time(*args, r.reflected_charge_pC, r.reflected_time_ns, method="median")


def test_velocity_from_added_lengths():
    dl = np.array([27.5, 57.5, 77.5, 106.5, 137.5]) * 1e-3
    dt = 2 * dl / 0.208 + np.array([0.01, -0.01, 0.005, -0.005, 0.0])
    vf = fit_velocity(dl, dt, np.full(5, 0.01))
    assert vf.velocity_m_per_ns == pytest.approx(0.208, rel=0.01)
    assert 0 < vf.velocity_err_m_per_ns < 0.003
    free = fit_velocity(dl, dt + 0.5, through_origin=False)
    assert free.offset_ns == pytest.approx(0.5, abs=0.03)
    assert free.velocity_m_per_ns == pytest.approx(0.208, rel=0.02)
    with pytest.raises(TransitFitError, match="different lengths"):
        fit_velocity([0.1], [1.0])


def test_binned_refusal_names_the_bins_it_left_out_and_why():
    """A walk spanning only four TDC bins, each with thousands of pulses: the binned estimator must
    say it kept too few because the bins at the sweep's ends are open-ended, not that no bin held
    enough pulses."""
    t = np.linspace(2 * TDC_LSB_NS, 6 * TDC_LSB_NS, 40000, endpoint=False)
    q = (6.0 / t) ** 2                          # t = 6 q^-1/2: four bins of 10,000 pulses
    k = np.floor(walk_model(q, 0.0, 6.0, 0.0) / TDC_LSB_NS + 1e-9)
    counts = np.unique(k, return_counts=True)[1]
    assert counts.size == 4 and counts.min() >= 1000
    with pytest.raises(TransitFitError) as info:
        fit_walk(q, k * TDC_LSB_NS, "binned", label="channel 5")
    message = str(info.value)
    assert "channel 5" in message and "4 bins hold pulses" in message
    assert "open-ended at the sweep's largest pulses" in message
    assert "fewer than" not in message          # every bin held thousands


def test_the_default_estimator_is_the_one_the_plans_use():
    import inspect
    from calbench.plans.fee import transit_time_calibration
    plan_default = inspect.signature(transit_time_calibration).parameters["method"].default
    assert inspect.signature(fit_transit_time).parameters["method"].default == plan_default
    assert inspect.signature(fit_walk).parameters["method"].default == plan_default
