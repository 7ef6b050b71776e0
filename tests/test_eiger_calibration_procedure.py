# Long by design: the whole EIGER procedure end to end, step by step, with its failure paths.
"""The EIGER trimming and energy calibration end to end against the simulator (250k geometry):
X-ray box + EIGER IOCs on loopback -> ophyd -> plans -> HDF5 frames + tiled -> live analysis ->
derived runs, PSI files, report; then the re-analysis from tiled; then faults.

Physics is checked against the simulator's hidden truth, never fed to the analysis: the vrf scan
puts the line at vthreshold 1200, the untrimmed inflections spread by ~100 DAC and trimming brings
that below 15 %, E(vcmp) per chip matches the truth within 1 %, dead and hot pixels are masked and
never trimmed.

The module runs its own X-ray box + 250k EIGER (a quarter of the session lab's 500k pixels) on a
Channel Access server of its own UDP port, added to the client's address list; it shares the
session's tiled server and data directory.
"""
from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import replace

import bluesky.plan_stubs as bps
import numpy as np
import pytest

from calbench.analysis.eiger_calibration import XRF_LINES_KEV, trimbit_statistics
from calbench.run_queries import derived_runs, last_run
from calbench.analysis.eiger_files import (chips_in_file_order, fit_name, load_scan,
                                           read_calibration_text, trim_prefix_name)
from calbench.analysis.eiger_reanalysis import reanalyse_calibration
from calbench.analysis.scurve import FitStatus
from calbench.contracts.trimfile import read_trim_file
from calbench.config import InstrumentConfig
from calbench.plans.eiger import (CalibrationStepError, calibrate_eiger, global_calibration,
                                  scurve, trimbit_scan, vrf_scan)
from calbench.plans.xray import tube_on
from conftest import TEST_TIME_SCALES, Lab, free_port

VRF_RANGE = (2500, 3700, 30)          # the lab script's vrf scan range
KV, MA = 40.0, 40.0


@contextmanager
def _environ(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def eiger_lab(lab_config):
    """X-ray box + 250k EIGER on their own CA server port (frames in the session's data dir)."""
    from calbench.iocs.build import build_iocs
    from calbench.iocs.server import IocThread

    instruments = {name: lab_config.instruments[name] for name in ("xraybox", "eiger")}
    e = instruments["eiger"]
    instruments["eiger"] = InstrumentConfig(e.name, e.backend, e.prefix,
                                            {**e.settings, "geometry": "250k",
                                             "hostnames": ["beb058"]})
    cfg = replace(lab_config, pv_prefix=f"E{uuid.uuid4().hex[:6]}:", instruments=instruments)
    groups = build_iocs(cfg, time_scales=TEST_TIME_SCALES)
    port = free_port(socket.SOCK_DGRAM)
    with _environ(EPICS_CA_SERVER_PORT=port, EPICS_CAS_SERVER_PORT=port):
        server = IocThread(groups).start()
    addr_list = os.environ.get("EPICS_CA_ADDR_LIST", "127.0.0.1")
    os.environ["EPICS_CA_ADDR_LIST"] = f"{addr_list} 127.0.0.1:{port}"
    try:
        yield Lab(cfg, groups, server)
    finally:
        os.environ["EPICS_CA_ADDR_LIST"] = addr_list
        server.stop()


@pytest.fixture(scope="module")
def cat(tiled_server):
    from calbench.tiled_service import runs_catalog
    return runs_catalog(tiled_server, f"eigercal_{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def RE(cat, tmp_path_factory, lab_config):
    from bluesky import RunEngine

    from calbench.persistence import TiledPersister
    engine = RunEngine({}, call_returns_result=True)
    engine.md.update({"operator": "pytest", "lab": lab_config.name})
    engine.subscribe(TiledPersister(cat, journal_directory=tmp_path_factory.mktemp("journal")))
    yield engine
    if engine.state != "idle":
        engine.halt()


@pytest.fixture(scope="module")
def devices(eiger_lab):
    box = eiger_lab.device("xraybox")
    det = eiger_lab.device("eiger")
    det.data_dir = eiger_lab.cfg.data_dir
    return box, det


@pytest.fixture(scope="module")
def calibrated(eiger_lab, devices, RE, tmp_path_factory):
    """The whole procedure on Cu, once for the module."""
    box, det = devices
    RE(tube_on(box, KV, MA))
    results_dir = tmp_path_factory.mktemp("results")
    # live plots are exercised in test_eiger_calibration_units.py; here they would only cost time
    cal = RE(calibrate_eiger(det, box, "Cu", results_dir=results_dir, vrf_range=VRF_RANGE,
                             plot=False, md={"sample": "pytest"})).plan_result
    return cal


def _sim(eiger_lab):
    return eiger_lab.backend("eiger")


def _live_state(eiger_lab):
    sim = _sim(eiger_lab)
    return sim.pixel_state(), sim.truth()


# -- physics -------------------------------------------------------------------------------------

def test_vrf_scan_puts_the_line_at_vthreshold_1200_with_1000_counts(calibrated, eiger_lab):
    cal = calibrated
    vrf = int(cal.results.vrf.vrf[0])
    truth = _sim(eiger_lab).truth()
    live = truth.live()
    # the hidden truth at the chosen vrf, untrimmed (trimbit 32)
    mu_true = truth.inflection(XRF_LINES_KEV["Cu"], vrf, 32, 2500)[live]
    assert abs(mu_true.mean() - 1200) < 50, f"vrf {vrf} puts the Cu line at {mu_true.mean():.0f}"
    # the counts at each good pixel's inflection: the trimbit scan's targets
    at_inflection = cal.results.untrimmed.trimbit_targets()[cal.results.untrimmed.good]
    assert np.isfinite(at_inflection).all()
    assert 700 < np.median(at_inflection) < 1300


def test_untrimmed_spread_is_about_100_dac_and_trimming_brings_it_below_15_percent(
        calibrated, eiger_lab):
    cal = calibrated
    g = cal.geometry
    untrimmed, tb = cal.results.untrimmed, cal.results.trimbits
    # every trimmed pixel with a fit, outliers included: the trimming, not a cut, must do it;
    # the procedure keeps no fit map, the step's PSI fit file has it
    trimmed = np.load(cal.out_dir / fit_name("T63", "Cu", 1))
    use1 = tb.trimmed & (trimmed["status"] == FitStatus.OK)
    for chip in range(g.n_chips):
        sl = g.chip_slice(chip)
        before = untrimmed.mu[sl][untrimmed.good[sl]].std(dtype=np.float64)
        after = trimmed["mu"][sl][use1[sl]].std()
        assert 80 < before < 130, f"chip {chip}: untrimmed spread {before:.1f} DAC"
        assert after <= 0.15 * before, f"chip {chip}: trimmed {after:.1f} vs {before:.1f} DAC"
    # and the detector really is trimmed: the hidden inflections with the loaded trimbits
    state, truth = _live_state(eiger_lab)
    mu_true = truth.inflection(XRF_LINES_KEV["Cu"], state["vrf"], state["trimbits"],
                               state["vtrim"])
    live = truth.live() & tb.trimmed
    for chip in range(g.n_chips):
        sl = g.chip_slice(chip)
        assert mu_true[sl][live[sl]].std() <= 0.15 * untrimmed.mu_std[chip]


def test_trimbits_have_the_statistics_of_psis_real_modules(calibrated):
    """PSI's published standard trim files (slsDetectorPackage settingsdir/eiger/standard, 4500,
    5400 and 6400 eV, modules 031 and 032; `calbench eiger trimstats` on them) hold trimbits with
    mean 31.41-31.72, standard deviation 8.86-10.17, 0.235-0.557 % at 0, 0.046-0.065 % at 63 and
    chip means 0.75-2.26 apart. The simulated sensor trimmed by the procedure must look like
    them, rails included, and the pixels trimmed onto a rail are reported."""
    tb = calibrated.results.trimbits
    stats = calibrated.results.summary()["trimbits"]["statistics"]
    r = calibrated.results
    print(f"\n{trimbit_statistics(tb.trimbits, calibrated.geometry).line()}; inflection spread "
          f"{np.round(r.untrimmed.mu_std, 1)} -> {np.round(r.trimmed.mu_std, 2)} DAC, dispersion "
          f"{r.dispersion_untrimmed.sigma_eV:.0f} -> {r.dispersion_trimmed.sigma_eV:.1f} eV")
    assert 31.4 <= stats["mean"] <= 31.75
    assert 8.85 <= stats["std"] <= 10.2
    assert 0.23 <= stats["percent_at_0"] <= 0.56
    assert 0.045 <= stats["percent_at_63"] <= 0.07
    assert 0.1 < stats["chip_mean_range"] <= 2.5
    s = tb.summary()
    low, high = tb.on_rails
    assert s["rail_0_pixels"] == low.sum() > 0 and s["rail_63_pixels"] == high.sum() > 0
    assert (tb.trimbits[low] == 0).all() and (tb.trimbits[high] == 63).all()


def test_energy_calibration_per_chip_matches_the_truth_within_1_percent(calibrated, eiger_lab):
    cal = calibrated.results.calibration
    state, truth = _live_state(eiger_lab)
    m_true, k_true = truth.chip_calibration(state["vrf"], state["trimbits"], state["vtrim"])
    np.testing.assert_allclose(cal.m, m_true, rtol=0.01)
    np.testing.assert_allclose(cal.k, k_true, rtol=0.01)
    chips = np.arange(len(m_true))
    for energy in (XRF_LINES_KEV["Cu"], XRF_LINES_KEV["Ge"]):
        vcmp_true = m_true - k_true * energy
        np.testing.assert_allclose(cal.energy(vcmp_true, chips), energy, rtol=0.01)
    assert calibrated.results.dispersion_trimmed.sigma_eV < \
        0.15 * calibrated.results.dispersion_untrimmed.sigma_eV


def test_dead_and_hot_pixels_are_masked_and_never_trimmed(calibrated, eiger_lab):
    cal = calibrated
    truth = _sim(eiger_lab).truth()
    bad = cal.results.untrimmed.bad
    assert bad.mask[truth.dead].all() and bad.mask[truth.hot].all()
    assert bad.mask[truth.noisy].all()
    assert bad.mask.sum() < 0.005 * bad.mask.size, "the mask must not swallow good pixels"
    tb = cal.results.trimbits
    never = truth.dead | truth.hot
    assert not tb.trimmed[never].any()
    assert (tb.trimbits[never] == 32).all()
    # the detector carries the same: the trim file loaded at the end
    loaded = _sim(eiger_lab).trimbits()
    np.testing.assert_array_equal(loaded, tb.trimbits)


# -- files ---------------------------------------------------------------------------------------

def test_psi_files_are_written_in_psi_names_and_layouts(calibrated):
    cal = calibrated
    out = cal.out_dir
    assert out == cal.results_dir / "T63" / "gain5"
    prefix = out / trim_prefix_name("T63", "Cu", "gain5")
    tf = read_trim_file(f"{prefix}.sn058")
    assert tf.dac("vrpreamp") == cal.results.vrf.vrf[0]
    assert tf.tau_ns == 200
    for chip in range(4):
        hm, name = cal.geometry.chip_vcmp(chip)
        assert tf.dac(name) == cal.results.untrimmed.vcmp[chip]
    assert tf.dac("vcp") == cal.results.untrimmed.vcp[0]
    np.testing.assert_array_equal(tf.trimbits, cal.results.trimbits.trimbits)
    assert (out / "settings" / "gain5" / "noise.sn058").read_bytes() == \
        (out / "T63_CuXRF_gain5.sn058").read_bytes()

    m, k, tau = read_calibration_text(out / "calibration.sn058")
    assert tau is None                             # sls_detector_tools writes no tau line
    order = chips_in_file_order(cal.geometry, 0)
    np.testing.assert_allclose(m, cal.results.calibration.m[order], atol=0.005)
    np.testing.assert_allclose(k, cal.results.calibration.k[order], atol=0.005)
    with np.load(out / "calibration.npz") as f:
        np.testing.assert_array_equal(f["p1"], cal.results.calibration.p1)
        assert list(f["energy"]) == [8.02, 9.9]

    x, data = load_scan(out / "T63_vcmp_CuXRF_0.npz")
    assert data.shape == (256, 1024, 51) and data.dtype == np.float64
    np.testing.assert_array_equal(x, np.arange(0, 2001, 40))
    fit = np.load(out / "T63_vcmp_CuXRF_0_fit.npy")
    assert {"p0", "p1", "mu", "sigma", "A", "C"} <= set(fit.dtype.names)
    assert fit.shape == (256, 1024)
    # what the procedure keeps of the S-curve is the file's fit, as float32
    np.testing.assert_array_equal(fit["mu"].astype(np.float32), cal.results.untrimmed.mu)
    assert cal.results.untrimmed.mu.dtype == np.float32
    for name in ("T63_vrf_CuXRF_0.npz", "T63_tbscan_CuXRF_0.npz", "T63_vcmp_CuXRF_1.npz",
                 "T63_vcmp_CuXRF_1_fit.npy", "T63_vcmp_GeXRF_1.npz", "T63_CuXRF_gain5.npz"):
        assert (out / name).is_file(), name
    assert (out / "T63_gain5_calibration_report.pdf").read_bytes()[:5] == b"%PDF-"


# -- tiled: runs, derived runs, re-analysis -----------------------------------------------------

def test_every_scan_is_in_tiled_with_its_metadata_and_derived_run(calibrated, cat):
    cal = calibrated
    steps = [(r["step"], r["run_id"], r["target"]) for r in cal.runs]
    assert steps == [("vrf_scan", 0, "Cu"), ("scurve", 0, "Cu"), ("trimbit_scan", 0, "Cu"),
                     ("scurve", 1, "Cu"), ("line_scan", 1, "Ge")]
    for r in cal.runs:
        start = cat[r["uid"]].metadata["start"]
        assert start["calibration_id"] == cal.calibration_id
        assert (start["det_id"], start["gain"], start["target"], start["run_id"]) == \
            ("T63", "gain5", r["target"], r["run_id"])
        assert start["geometry"] == "250k" and start["module_serials"] == ["058"]
        assert start["sample"] == "pytest"
        assert cat[r["uid"]].metadata["stop"]["exit_status"] == "success"
        derived = cat[r["derived_uid"]].metadata["start"]
        assert derived["parent_uid"] == r["uid"] and derived["analysis"]
        # found by the step's name (not list_scan's); the scan finds its derived run
        assert start["plan_name"] == r["step"] and start["plan_args"]["target"] == r["target"]
        assert derived["plan_name"] == f"{r['step']}_analysis"
        assert r["derived_uid"] in [d.metadata["start"]["uid"] for d in derived_runs(cat, r["uid"])]
    assert "primary" in last_run(cat, "vrf_scan")
    mu = cat[cal.runs[1]["derived_uid"]]["results"]["mu"].read()
    np.testing.assert_array_equal(np.asarray(mu)[0],
                                  np.load(cal.out_dir / fit_name("T63", "Cu", 0))["mu"])
    summary = cat[cal.summary_uid]
    assert summary.metadata["start"]["parent_uids"] == [r["uid"] for r in cal.runs]
    assert summary.metadata["start"]["plan_name"] == "calibrate_eiger"


def test_reanalysis_from_tiled_gives_identical_numbers(calibrated, cat):
    cal = calibrated
    again = reanalyse_calibration(cat, cal.summary_uid)
    assert again.differences == []
    r, live = again.results, cal.results
    np.testing.assert_array_equal(r.vrf.vrf, live.vrf.vrf)
    assert r.vrf.exptime_s == live.vrf.exptime_s
    np.testing.assert_array_equal(r.untrimmed.vcmp, live.untrimmed.vcmp)
    np.testing.assert_array_equal(r.trimbits.trimbits, live.trimbits.trimbits)
    np.testing.assert_array_equal(r.trimmed.mu, live.trimmed.mu)
    np.testing.assert_array_equal(r.untrimmed.targets, live.untrimmed.targets)
    np.testing.assert_array_equal(r.calibration.m, live.calibration.m)
    np.testing.assert_array_equal(r.calibration.k, live.calibration.k)
    assert r.summary() == live.summary()


# -- faults ----------------------------------------------------------------------------------------

def _settings(eiger_lab):
    sim = _sim(eiger_lab)
    return sim.dac_table(), sim.trimbits(), sim.dr, sim.exptime


def _assert_unchanged(eiger_lab, before):
    table, trimbits, dr, exptime = _settings(eiger_lab)
    np.testing.assert_array_equal(table, before[0])
    np.testing.assert_array_equal(trimbits, before[1])
    assert (dr, exptime) == before[2:]


def _shutters_closed(eiger_lab, timeout_s: float = 2.0):
    """Both shutters closed (waiting out a shutter still in motion, 0.3 world seconds)."""
    box = eiger_lab.backend("xraybox")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not box.shutter_open("XRF") and not box.shutter_open("Direct"):
            return True
        time.sleep(0.02)
    return False


def test_high_voltage_off_is_refused_before_anything_changes(calibrated, eiger_lab, devices, RE):
    box, det = devices
    before = _settings(eiger_lab)
    RE(bps.mv(box.hv, "Off"))
    deadline = time.monotonic() + 5
    while box.hv.get(use_monitor=False) != "Off" and time.monotonic() < deadline:
        time.sleep(0.05)                          # the readback follows at the IOC's next poll
    try:
        with pytest.raises(CalibrationStepError, match="high voltage is 'Off'.*tube_on"):
            RE(vrf_scan(det, box, start=2500, stop=3700, step=30, cal=calibrated, plot=False))
    finally:
        RE(tube_on(box, KV, MA))
    _assert_unchanged(eiger_lab, before)
    assert _shutters_closed(eiger_lab)


def test_a_shutter_that_will_not_open_leaves_the_detector_as_it_was(calibrated, eiger_lab,
                                                                    devices, RE):
    box, det = devices
    before = _settings(eiger_lab)
    n_runs = len(calibrated.runs)
    eiger_lab.backend("xraybox").shutter_stuck = True
    try:
        with pytest.raises(CalibrationStepError, match="did not open.*jammed"):
            RE(scurve(det, box, cal=calibrated, plot=False))
    finally:
        eiger_lab.backend("xraybox").shutter_stuck = False
    _assert_unchanged(eiger_lab, before)
    assert _shutters_closed(eiger_lab)
    assert len(calibrated.runs) == n_runs          # no scan was started


def test_a_target_not_installed_is_named(calibrated, eiger_lab, devices, RE):
    box, det = devices
    before = _settings(eiger_lab)
    sim_box = eiger_lab.backend("xraybox")
    installed = sim_box.targets
    sim_box.targets = ("Cu", "Fe")
    try:
        with pytest.raises(CalibrationStepError, match="'Ge' is not installed"):
            RE(global_calibration(det, box, cal=calibrated, plot=False, report=False))
    finally:
        sim_box.targets = installed
    _assert_unchanged(eiger_lab, before)
    assert _shutters_closed(eiger_lab)


@pytest.mark.parametrize("in_detector", [False, True], ids=["step_by_step", "in_detector"])
def test_an_aborted_trimbit_scan_keeps_the_last_good_trim_and_its_partial_run(
        calibrated, eiger_lab, devices, RE, cat, in_detector):
    from bluesky.utils import RunEngineInterrupted

    box, det = devices
    cal = replace(calibrated, detector_scan=in_detector)
    before = _settings(eiger_lab)
    seen = []

    def pause_mid_scan(name, doc):
        if name == "start":
            seen.append(doc["uid"])
        # step by step: after the fifth point; in the detector: before its acquisition starts
        # (tests/test_eiger_detector_scan.py aborts one while it runs)
        if (name == "event" and doc["seq_num"] == 5) or (in_detector and name == "descriptor"):
            # from another thread, as Ctrl-C would: the callback runs in the RunEngine's loop
            threading.Thread(target=RE.request_pause, kwargs={"defer": False}).start()

    token = RE.subscribe(pause_mid_scan)
    try:
        with pytest.raises(RunEngineInterrupted):
            RE(trimbit_scan(det, box, cal=cal, plot=False))
        RE.abort("operator abort (test)")
    finally:
        RE.unsubscribe(token)
    _assert_unchanged(eiger_lab, before)
    assert _shutters_closed(eiger_lab)
    assert det.scan.get(use_monitor=False) == "0"
    run = cat[seen[0]]
    stop = run.metadata["stop"]
    assert stop["exit_status"] == "abort"
    assert stop["num_events"].get("primary", 0) < run.metadata["start"]["num_points"]
    assert run.metadata["start"]["step"] == "trimbit_scan"


@pytest.mark.parametrize("in_detector", [False, True], ids=["step_by_step", "in_detector"])
def test_an_exception_mid_scan_keeps_the_settings_and_marks_the_run_failed(
        calibrated, eiger_lab, devices, RE, cat, in_detector):
    box, det = devices
    before = _settings(eiger_lab)
    seen = []

    def broken_consumer(name, doc):
        if name == "start":
            seen.append(doc["uid"])
        # step by step: the fourth point; in the detector, its points come as one page
        if (name == "event" and doc["seq_num"] == 4) or name == "event_page":
            raise RuntimeError("disk full in a downstream consumer")

    cal = replace(calibrated, detector_scan=in_detector)
    with pytest.raises(Exception, match="disk full"):
        RE(scurve(det, box, cal=cal, plot=False), broken_consumer)
    _assert_unchanged(eiger_lab, before)
    assert _shutters_closed(eiger_lab)
    stop = cat[seen[0]].metadata["stop"]
    assert stop["exit_status"] == "fail" and "disk full" in stop["reason"]


def test_a_stored_vrf_scan_replayed_into_the_live_analysis_gives_the_same_result(calibrated, cat):
    """run.documents() from tiled (json-seq) fed to the callback the plan ran live."""
    from calbench.analysis.eiger_callbacks import StepAnalysis

    vrf = next(r for r in calibrated.runs if r["step"] == "vrf_scan")
    replayed = StepAnalysis()
    names = []
    for name, doc in cat[vrf["uid"]].documents():
        names.append(name)
        replayed(name, doc)
    assert names[0] == "start" and names[-1] == "stop"
    assert {"event", "event_page"} & set(names)
    assert replayed.error == "", replayed.error
    assert replayed.result.summary() == calibrated.results.vrf.summary()
