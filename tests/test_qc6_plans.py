"""The whole QC6 sequence against the simulated crate, with the lab's default parameters: the same
plan code that holds 17 hours in the lab runs here on the accelerated world clock. The runs go to
tiled; every trip the crate made is recorded exactly once; the files are in the lab's formats; the
I-V analysis recovers the electrodes' hidden leakage resistances."""
from __future__ import annotations

import time

import numpy as np
import pytest

from calbench.analysis.qc6_files import (
    read_iv_file, read_megger_sheet, read_stability_file, read_stress_file)
from calbench.analysis.qc6_fits import fit_iv
from calbench.plans.qc6 import (
    CrateUnreachable, check_connection, iv_short_stability, long_stability, megger_test,
    stress_test)
from qc6_support import (  # noqa: F401  (qc6 is a fixture)
    assert_layer_safe, assert_trips_match, layer_channels, qc6)


def table(run, stream):
    return run[stream].base["internal"].read()


def truth_trips(sim, layer, t0, t1):
    chans = set(layer_channels(layer))
    return [r for r in sim.trip_log if r.channel in chans and t0 <= r.time <= t1]


def test_qc6_sequence_with_lab_defaults(lab, qc6, RE, tmp_path):
    crate, layer, sim = qc6
    results = tmp_path / "results"
    wall = {}

    t = time.monotonic()
    (uid,) = RE(check_connection(layer))
    assert RE.catalog[uid].metadata["start"]["crate"]["model"] == "A1515TG"

    (uid,) = RE(megger_test(layer.detector_name, [14.2, 9.8, 22.0], [0, 3, 1],
                            comments="GEM 2 sparked twice", results_dir=results))
    megger = RE.catalog[uid]
    assert megger.metadata["start"]["plan_name"] == "megger_test"
    sheet = read_megger_sheet(megger.metadata["start"]["qc6_files"]["megger"])
    assert sheet["sparks"] == [0, 3, 1] and sheet["comments"] == "GEM 2 sparked twice"
    assert list(table(megger, "primary")["megger_impedance_GOhm"]) == [14.2, 9.8, 22.0]

    # -- stress test: foils one at a time, 0 -> 650 V by 10 V -------------------------------------
    t0 = sim.clock.now()
    (uid,) = RE(stress_test(layer, results_dir=results))
    wall["stress"] = time.monotonic() - t
    run = RE.catalog[uid]
    assert run.metadata["stop"]["exit_status"] == "success"
    assert_layer_safe(layer, sim)
    truth = truth_trips(sim, layer, t0, sim.clock.now())
    trips = table(run, "trips") if "trips" in run else None
    assert_trips_match(trips, truth, max_step_V=10.0, sim=sim)
    steps = table(run, "primary")
    for foil in layer.foils:               # each foil reached the top step unless it failed
        at = steps[f"{foil.name}_vmon"].to_numpy()
        assert at.max() == pytest.approx(650.0, abs=1.0) or \
            sum(r.channel == foil.channel for r in truth) >= 5
    stress_file = run.metadata["start"]["qc6_files"]["stress"]
    on_file = read_stress_file(stress_file)
    assert sorted(on_file.channels) == sorted(r.channel for r in truth)

    # -- IV scan (divider 200 -> 4600 V) + short stability (foils 550 V, 2 h) ---------------------
    t = time.monotonic()
    t0 = sim.clock.now()
    (uid,) = RE(iv_short_stability(layer, results_dir=results))
    wall["iv+ss"] = time.monotonic() - t
    run = RE.catalog[uid]
    assert run.metadata["stop"]["exit_status"] == "success"
    assert_layer_safe(layer, sim)
    files = run.metadata["start"]["qc6_files"]
    iv = read_iv_file(files["iv"])
    assert iv.channels == [6, 5, 4, 3, 2, 1, 0] and iv.voltage_V.shape == (23, 7)
    np.testing.assert_allclose(iv.voltage_V[-1], [1101.5, 548.3, 428.9, 538.5, 856.7, 514.0, 612.0],
                               atol=1.0)
    for channel in iv.channels:            # the hidden leakage of every electrode, from its I-V
        fit = fit_iv(*iv.column(channel), channel=channel)
        hidden = sim.physics(3, channel)
        # within 4 standard errors of the fit (the error floors cover a low residual by chance)
        assert abs(fit.resistance_GOhm - hidden.leak_GOhm) < max(
            4 * fit.resistance_err_GOhm, 0.03 * hidden.leak_GOhm), channel
        assert abs(fit.offset_uA - hidden.offset_uA) < max(4 * fit.offset_err_uA, 0.001), channel
        if channel in (5, 3, 1):           # the foils' currents are well above the noise
            assert fit.resistance_err_GOhm < 0.05 * fit.resistance_GOhm, channel
    ss = read_stability_file(files["short"])
    n_trips = len(truth_trips(sim, layer, t0, sim.clock.now()))
    assert len(ss.trips) <= n_trips and (ss.end is not None) == (n_trips < 3)
    held = table(run, "progress")["qc6_elapsed_s"].max()
    assert held >= 2 * 3600 or n_trips >= 3

    # -- long stability: ramp to 4200 V, foils only at 580 V for 15 h -----------------------------
    t = time.monotonic()
    t0 = sim.clock.now()
    (uid,) = RE(long_stability(layer, results_dir=results))
    wall["long"] = time.monotonic() - t
    run = RE.catalog[uid]
    t1 = sim.clock.now()
    assert run.metadata["stop"]["exit_status"] == "success"
    assert_layer_safe(layer, sim)
    truth = truth_trips(sim, layer, t0, t1)
    assert {r.channel for r in truth} <= {5, 3, 1}           # only the foils were powered
    assert_trips_match(table(run, "trips") if "trips" in run else None, truth, sim=sim)
    progress = table(run, "progress")
    assert progress["qc6_elapsed_s"].max() >= 15 * 3600
    # the last progress event counts every trip but those recorded after it, as the layer went off
    trips = table(run, "trips") if "trips" in run else None
    counted = [] if trips is None else trips["trip_incident"][trips["time"] <= progress["time"].max()]
    assert progress["qc6_trips"].max() == len(set(counted))   # incidents: one per look
    ls = read_stability_file(run.metadata["start"]["qc6_files"]["long"])
    assert len(ls.trips) == len(truth) and ls.end is not None
    assert (ls.end - ls.start).total_seconds() >= 15 * 3600 - 60
    for kind in ("stress", "iv", "short", "long"):
        for path in (results / layer.detector_name).glob("*/*.txt"):
            assert (path.parent / "Plots" / (path.stem + ".png")).exists(), path
    print(f"\nQC6 sequence wall time (s): {wall}")


def test_check_connection_names_an_unreachable_crate(lab, qc6, RE):
    _, layer, sim = qc6
    sim.unreachable = True
    try:
        deadline = time.monotonic() + 5
        while layer.connected_rbv.get() != 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(CrateUnreachable,
                           match="CAEN crate behind the IOC .* does not answer.*check the crate"):
            RE(check_connection(layer))
    finally:
        sim.unreachable = False


def test_a_plan_right_after_building_the_layer_waits_for_its_pvs(lab, qc6, RE):
    from calbench.plans.qc6 import _wait_connected
    crate, layer, _ = qc6
    fresh = crate.layer(1, connect=False)     # as the profile builds `layer`
    (uid,) = RE(check_connection(fresh))
    assert RE.catalog[uid].metadata["start"]["crate"]["model"] == "A1515TG"
    nowhere = type(layer)("NOWHERE:", slot=3, layer=1, name="nowhere")
    with pytest.raises(CrateUnreachable, match=r"unconnected: NOWHERE:\S+.* and \d+ more"):
        RE(_wait_connected(nowhere, timeout_s=1.0))
