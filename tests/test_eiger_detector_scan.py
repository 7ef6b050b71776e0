"""EIGER scans the detector runs itself (Scan PV, devices/eiger_scan.py, plans/eiger_scans.py):
simulated detector behind the X-ray box -> EigerIOC -> flyer -> RunEngine -> HDF5 + tiled. The
run must read back as a step scan of the same points would: the same keys, one frame per point,
the per-chip sums of those frames, and the physics of each step's setting."""
from __future__ import annotations

import threading

import h5py
import numpy as np
import pytest
from bluesky.plans import scan as step_scan

from calbench.analysis.eiger_callbacks import StepAnalysis
from calbench.devices.base import InstrumentRefused, set_and_check
from calbench.plans.eiger_scans import detector_scan
from calbench.plans.xray import tube_on, xrf_exposure
from eiger_lab_fixtures import box, det  # noqa: F401 - pytest fixtures
from wait_support import wait_for

KV, MA = 40.0, 40.0


def _collected(start, RE, uid):
    """The run as the calibration's callback collects it (frames read from the HDF5 file)."""
    analysis = StepAnalysis(analyse=lambda data, untrimmed=None: data)
    for name, doc in RE.catalog[uid].documents():
        analysis(name, doc)
    return analysis.result


def test_a_detector_side_threshold_scan_records_a_frame_per_step(lab, box, det, RE):
    RE(tube_on(box, KV, MA))
    points = np.arange(200, 1801, 100)
    md = {"x_key": det.vthreshold.name, "image_key": det.image_key, "geometry": "500k"}
    (uid,) = RE(xrf_exposure(box, "Cu", detector_scan(det, det.vthreshold, points, md=md)))
    run = RE.catalog[uid]
    assert run.metadata["stop"]["exit_status"] == "success"
    assert run.metadata["start"]["detector_scan"] == "vthreshold 200 1800 100 1ms"
    x = np.asarray(run["primary"]["eiger_vthreshold"].read())
    np.testing.assert_array_equal(x, points)
    frames = run["primary"]["eiger_image"].read()
    assert frames.shape == (len(points), 512, 1024) and frames.dtype == np.uint32

    # each event's chip sums and total are its own frame's
    geometry = lab.ioc("eiger").geometry
    sums = np.stack(run["primary"]["eiger_chip_sums"].read())
    np.testing.assert_array_equal(sums, [geometry.chip_sums(f) for f in frames])
    np.testing.assert_array_equal(run["primary"]["eiger_total_counts"].read(),
                                  frames.sum(axis=(1, 2), dtype=np.float64))

    # physics: the counts rise with vthreshold (a lower energy threshold) through the Cu line
    totals = frames.sum(axis=(1, 2), dtype=np.float64)
    assert totals[-1] > 5 * totals[0] > 0
    assert np.all(np.diff(totals) >= -0.02 * totals.max())

    # the file says which threshold each frame had
    with h5py.File(det.full_file_name.get(use_monitor=False), "r", swmr=True) as f:
        per_frame = f["/entry/instrument/detector"]
        np.testing.assert_array_equal(per_frame["vthreshold"][-len(points):], points)
        np.testing.assert_array_equal(per_frame["scan_value"][-len(points):], points)
        targets = per_frame["scan_target"].attrs["targets"].split(",")
        assert {targets[i] for i in per_frame["scan_target"][-len(points):]} == {"vthreshold"}
        np.testing.assert_array_equal(f["/entry/data/data"][-len(points):], frames)

    # the detector's scan is off again and the threshold stays at the last step (as PSI's server)
    assert det.scan.get(use_monitor=False) == "0"
    assert int(det.scan_steps.get(use_monitor=False)) == 0
    assert int(det.frames.get(use_monitor=False)) == 1
    assert int(det.vthreshold.get(use_monitor=False)) == points[-1]

    # the calibration's callback collects it as it collects a step scan
    data = _collected(md, RE, uid)
    np.testing.assert_array_equal(data.x, points)
    np.testing.assert_array_equal(data.frames, frames)


def test_a_step_scan_and_a_detector_scan_record_the_same_keys(lab, box, det, RE):
    RE(tube_on(box, KV, MA))
    points = [600, 1000, 1400]
    (step_uid,) = RE(xrf_exposure(box, "Cu", step_scan([det], det.vthreshold, 600, 1400, 3)))
    set_and_check(det.vthreshold, 1200)
    (fly_uid,) = RE(xrf_exposure(box, "Cu", detector_scan(det, det.vthreshold, points)))
    stepped, flown = RE.catalog[step_uid]["primary"], RE.catalog[fly_uid]["primary"]
    keys = {det.vthreshold.name, det.chip_sums.name, det.total_counts.name, det.image_key}
    assert keys <= set(stepped) and keys <= set(flown)
    for key in keys:
        assert np.asarray(stepped[key].read()).shape == np.asarray(flown[key].read()).shape, key
    np.testing.assert_array_equal(flown[det.vthreshold.name].read(),
                                  stepped[det.vthreshold.name].read())
    # same settings, same beam: the same counts within Poisson noise
    a = np.asarray(stepped[det.total_counts.name].read(), float)
    b = np.asarray(flown[det.total_counts.name].read(), float)
    assert np.all(abs(a - b) < 6 * np.sqrt(a + b) + 1)


def test_a_trimbit_scan_and_a_dac_scan_run_in_the_detector(lab, box, det, RE):
    RE(tube_on(box, KV, MA))
    (uid,) = RE(xrf_exposure(box, "Cu", detector_scan(det, det.trimval, np.arange(0, 64, 21))))
    run = RE.catalog[uid]
    np.testing.assert_array_equal(run["primary"]["eiger_trimval"].read(), [0, 21, 42, 63])
    assert int(det.trimval.get(use_monitor=False)) == 63
    (uid,) = RE(xrf_exposure(box, "Cu", detector_scan(det, det.dacs.vrpreamp,
                                                      np.arange(3400, 2500, -300))))
    run = RE.catalog[uid]
    np.testing.assert_array_equal(run["primary"]["eiger_dacs_vrpreamp"].read(),
                                  [3400, 3100, 2800])
    assert run["primary"]["eiger_image"].shape == (3, 512, 1024)


def test_scan_puts_the_detector_refuses_name_the_syntax(det):
    with pytest.raises(InstrumentRefused, match="never goes from 0 to 2000"):
        set_and_check(det.scan, "vthreshold 0 2000 -40")
    with pytest.raises(InstrumentRefused, match="no DAC 'vfoo'"):
        set_and_check(det.scan, "vfoo 0 2000 40")
    with pytest.raises(InstrumentRefused, match="e.g. 'vthreshold 0 2000 40 1ms'"):
        set_and_check(det.scan, "vthreshold 0 2000")
    assert det.scan.get(use_monitor=False) == "0"
    set_and_check(det.scan, "vthreshold 0 2000 40 5ms")
    assert det.scan.get(use_monitor=False) == "vthreshold 0 2000 40 5ms"
    assert int(det.scan_steps.get(use_monitor=False)) == 51
    assert int(det.frames.get(use_monitor=False)) == 51       # one frame per step
    with pytest.raises(InstrumentRefused, match="put Scan = 0 first"):
        set_and_check(det.frames, 3)
    set_and_check(det.scan, "0")
    assert int(det.frames.get(use_monitor=False)) == 1


def test_points_the_detector_cannot_scan_are_refused_before_anything_moves(det):
    with pytest.raises(ValueError, match="evenly spaced integer"):
        list(detector_scan(det, det.vthreshold, [0, 100, 300]))
    with pytest.raises(ValueError, match="cannot be scanned by the detector"):
        list(detector_scan(det, det.exptime, [0.1, 0.2]))


def test_an_abort_while_the_detector_scans_keeps_the_steps_recorded_so_far(lab, box, det, RE):
    from bluesky.utils import RunEngineInterrupted

    RE(tube_on(box, KV, MA))
    set_and_check(det.exptime, 2.0)    # 30 points of 0.4 s (world at 5x): 12 s to abort in, on a loaded CI
    ioc = lab.ioc("eiger")
    seen, pages = [], []

    def pause_after_two_pages(name, doc):
        if name == "start":
            seen.append(doc["uid"])
        if name == "event_page":           # the steps so far, while the detector still scans
            pages.append(len(doc["seq_num"]))
            if len(pages) == 2:
                threading.Thread(target=RE.request_pause, kwargs={"defer": False}).start()

    points = np.arange(0, 2001, 69)
    with pytest.raises(RunEngineInterrupted):
        RE(xrf_exposure(box, "Cu", detector_scan(det, det.vthreshold, points)),
           pause_after_two_pages)
    RE.abort("operator abort (test)")
    wait_for(lambda: ioc.detector_state.value in ("Aborted", "Idle"), "the acquisition to end")
    assert ioc.detector_state.value == "Aborted", "the pause must land while the detector scans"
    run = RE.catalog[seen[0]]
    assert run.metadata["stop"]["exit_status"] == "abort"
    # what was collected before the abort is in tiled: settings, sums and frames
    kept = sum(pages)
    assert 2 <= kept < len(points)
    np.testing.assert_array_equal(run["primary"]["eiger_vthreshold"].read(), points[:kept])
    frames = run["primary"]["eiger_image"].read()
    assert frames.shape == (kept, 512, 1024)
    np.testing.assert_array_equal(run["primary"]["eiger_total_counts"].read(),
                                  frames.sum(axis=(1, 2), dtype=np.float64))
    assert det.scan.get(use_monitor=False) == "0"
    assert int(det.frames.get(use_monitor=False)) == 1
    assert lab.backend("xraybox").xrf_beam()[1] == 0, "the XRF shutter must be closed"


def test_a_detector_scan_shows_its_points_in_the_progress_bar(box, det, RE, capsys):
    from calbench.plans.progress import point_progress

    RE(tube_on(box, KV, MA))
    RE(xrf_exposure(box, "Cu", point_progress(
        detector_scan(det, det.vthreshold, [800, 1000, 1200]), 3, "S-curve in the detector")))
    err = capsys.readouterr().err
    assert "S-curve in the detector: 100%" in err and "3.0/3.0 points" in err, err
