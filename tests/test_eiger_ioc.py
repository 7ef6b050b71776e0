"""EIGER end to end: simulated detector behind the X-ray box -> EigerIOC -> ophyd Eiger -> RunEngine
-> HDF5 + tiled -> frames read back; refused puts; trim files through the IOC."""
from __future__ import annotations

import subprocess
import sys
import time
from contextlib import contextmanager

import h5py
import numpy as np
import pytest
from bluesky.plans import count, scan
from scipy.optimize import curve_fit

from calbench.analysis.scurve import scurve
from calbench.contracts.trimfile import read_trim_file
from calbench.devices.base import InstrumentRefused, set_and_check
from calbench.devices.eiger import EigerError
from calbench.plans.xray import tube_on, xrf_exposure
from eiger_lab_fixtures import box, det  # noqa: F401 - pytest fixtures
from wait_support import wait_for

KV, MA = 40.0, 40.0


def _beam_now(lab):
    return lab.backend("xraybox").xrf_beam()


def test_count_on_cu_gives_frames_in_tiled_that_follow_the_physics(lab, box, det, RE):
    RE(tube_on(box, KV, MA))
    beams = []

    def counting():
        beams.append(_beam_now(lab))        # the line the detector sees, once the shutter is open
        return (yield from count([det], num=3))

    (uid,) = RE(xrf_exposure(box, "Cu", counting()))
    run = RE.catalog[uid]
    image = run["primary"]["eiger_image"]
    assert image.shape == (3, 512, 1024)
    frames = image.read()
    assert frames.dtype == np.uint32

    # per-pixel means follow the simulator's expectation for the beam the box delivered
    sim = lab.backend("eiger")
    energy, flux = beams[0]
    assert energy == pytest.approx(8.02) and flux > 0
    lam = sim.expected_counts(energy, flux, 0.1).astype(float)
    live = sim.truth().live()
    mean = frames.mean(axis=0)
    chi2 = ((mean - lam) ** 2 / (lam / 3))[live & (lam > 20)].mean()
    assert 0.85 < chi2 < 1.15, f"frames do not follow Poisson(expected): chi2/pixel {chi2:.3f}"
    assert mean[sim.truth().dead].max() == 0

    # events carry the per-chip sums of the same frames
    chip_sums = np.stack(run["primary"]["eiger_chip_sums"].read())
    expected = [lab.ioc("eiger").geometry.chip_sums(f) for f in frames]
    np.testing.assert_allclose(chip_sums, expected)
    totals = run["primary"]["eiger_total_counts"].read()
    np.testing.assert_array_equal(totals, frames.sum(axis=(1, 2), dtype=np.float64))
    # the live view is the last frame in 4 x 4 bins
    binned = frames[-1].astype(np.float64).reshape(128, 4, 256, 4).sum(axis=(1, 3))
    np.testing.assert_array_equal(det.live_image.get(use_monitor=False), binned.ravel())
    assert run.metadata["stop"]["exit_status"] == "success"


def test_one_file_per_trigger_mode_writes_a_file_per_event(lab, det, RE, tmp_path):
    det.file_per_trigger = True
    det.data_dir = lab.cfg.data_dir / "per_trigger"
    try:
        (uid,) = RE(count([det], num=2))
    finally:
        det.file_per_trigger = False
    run = RE.catalog[uid]
    frames = run["primary"]["eiger_image"].read()
    assert frames.shape == (2, 512, 1024)
    files = sorted((lab.cfg.data_dir / "per_trigger").rglob("*.h5"))
    assert [f.name.rsplit("_", 1)[1] for f in files] == ["000000.h5", "000001.h5"]
    with h5py.File(files[1], "r", swmr=True) as f:
        np.testing.assert_array_equal(f["/entry/data/data"][0], frames[1])
        assert f["/entry/instrument/detector/vthreshold"][0] == 1200


def _one_pixel_scan(RE, box, det, pixel, trimval):
    set_and_check(det.trimval, trimval)
    set_and_check(det.exptime, 1.0)         # ~1e4 counts on the plateau: mu to ~9 DAC
    # up to 1840: a high trimbit also brings the pixel's noise edge (near its baseline) to ~1900
    (uid,) = RE(xrf_exposure(box, "Cu", scan([det], det.vthreshold, 0, 1840, 24)))
    run = RE.catalog[uid]
    x = np.asarray(run["primary"]["eiger_vthreshold"].read(), float)
    y = np.asarray(run["primary"]["eiger_image"][:, pixel[0], pixel[1]], float)
    return x, y


def _fit_mu(x, y):
    top = max(y[-3:].mean(), 1.0)
    p0 = [0, 0, x[np.argmin(abs(y - top / 2))], 120, top, 0]
    popt, _ = curve_fit(scurve, x, y, p0=p0, sigma=np.sqrt(np.maximum(y, 1)), maxfev=20000)
    return popt[2]


def test_threshold_scan_of_one_pixel_is_an_s_curve_moving_with_its_trimbit(lab, box, det, RE):
    RE(tube_on(box, KV, MA))
    truth = lab.backend("eiger").truth()
    # a pixel with the chip's median offset: at high trimbits its noise edge stays above 2000
    chip = lab.ioc("eiger").geometry.chip_slice(1)
    base = np.where(truth.live()[chip], truth.base[chip], np.nan)
    r, c = np.unravel_index(np.nanargmin(abs(base - np.nanmedian(base))), base.shape)
    pixel = (chip[0].start + int(r), chip[1].start + int(c))
    mus = {}
    for trimval in (16, 48):
        x, y = _one_pixel_scan(RE, box, det, pixel, trimval)
        assert y[0] < 0.05 * y[-1] and y[-1] > 300, "not a rising S-curve"
        mus[trimval] = _fit_mu(x, y)
    step = truth.trim_step(2500)[pixel]
    expected = {t: truth.inflection(8.02, 3040, t, 2500)[pixel] for t in mus}
    for t in mus:
        assert mus[t] == pytest.approx(expected[t], abs=35)
    # a higher trimbit lowers the inflection (counts rise with the trimbit) by 32 steps
    assert mus[16] - mus[48] == pytest.approx(32 * step, rel=0.1)


def test_describe_gives_frame_shape_and_dtype_per_dynamic_range(det):
    set_and_check(det.dynamic_range, 16)
    set_and_check(det.frames, 2)
    det.stage()
    try:
        desc = det.describe()["eiger_image"]
    finally:
        det.unstage()
    assert desc["shape"] == [2, 512, 1024]
    assert np.dtype(desc["dtype_numpy"]) == np.uint16
    assert desc["external"] == "STREAM:"


@pytest.mark.parametrize("signal, value, reason", [
    ("dacs.vrpreamp", 4500, "outside 0..4000"),
    ("trimval", 64, "outside 0..63"),
    ("dynamic_range", 10, "10 bit not supported"),
    ("threshold_energy", 8000, "8000 not defined for this module"),
    ("vcmp", [1200] * 7, "takes exactly 8 values, got 7"),
])
def test_bad_puts_are_refused_and_leave_the_detector_unchanged(det, signal, value, reason):
    sig = det
    for part in signal.split("."):
        sig = getattr(sig, part)
    before = {"vrf": det.dacs.vrpreamp.get(use_monitor=False), "dr": det.dynamic_range.get(
        use_monitor=False), "trimval": det.trimval.get(use_monitor=False),
        "vcmp": list(det.vcmp.get(use_monitor=False))}
    with pytest.raises(InstrumentRefused, match=reason):
        set_and_check(sig, value)
    after = {"vrf": det.dacs.vrpreamp.get(use_monitor=False), "dr": det.dynamic_range.get(
        use_monitor=False), "trimval": det.trimval.get(use_monitor=False),
        "vcmp": list(det.vcmp.get(use_monitor=False))}
    assert after == before
    assert reason.split()[0] in det.status_message.get(use_monitor=False)


def test_wrong_trimbit_waveform_and_missing_trim_file_are_refused(det, tmp_path):
    with pytest.raises(InstrumentRefused, match="takes exactly 524288 values, got 1000"):
        set_and_check(det.trimbits, np.zeros(1000, np.int16))
    with pytest.raises(InstrumentRefused, match="not found"):
        set_and_check(det.load_trimbits, str(tmp_path / "nothing" / "noise"))
    assert det.trimval.get(use_monitor=False) == 32


def test_trim_files_round_trip_through_the_ioc_bit_exactly(lab, det, tmp_path):
    rng = np.random.default_rng(7)
    tb = rng.integers(0, 64, size=(512, 1024)).astype(np.int16)
    set_and_check(det.trimbits, tb.ravel())
    set_and_check(det.dacs.vrpreamp, 3111)
    prefix = tmp_path / "T63_CuXRF_gain5"
    set_and_check(det.save_trimbits, str(prefix))
    top, bottom = read_trim_file(f"{prefix}.sn058"), read_trim_file(f"{prefix}.sn059")
    np.testing.assert_array_equal(top.trimbits, tb[256:512])
    np.testing.assert_array_equal(bottom.trimbits, tb[0:256])
    assert top.dac("vrpreamp") == 3111 and top.dac("vcmp_ll") == 1200

    set_and_check(det.trimval, 0)
    set_and_check(det.dacs.vrpreamp, 2000)
    set_and_check(det.load_trimbits, str(prefix))
    np.testing.assert_array_equal(np.asarray(det.trimbits.get(use_monitor=False)).reshape(512, 1024),
                                  tb)
    assert det.dacs.vrpreamp.get(use_monitor=False) == 3111
    again = tmp_path / "again"
    set_and_check(det.save_trimbits, str(again))
    for sn in ("058", "059"):
        assert (tmp_path / f"again.sn{sn}").read_bytes() == (tmp_path / f"T63_CuXRF_gain5.sn{sn}") \
            .read_bytes()


def test_threshold_energy_loads_interpolated_settings_until_a_dac_is_touched(det):
    set_and_check(det.threshold_energy, 6000)
    assert det.threshold_energy.get(use_monitor=False) == 6000
    assert det.settings_rbv.get(use_monitor=False) == "standard"
    assert det.trimval.get(use_monitor=False) == -1          # trimmed: the trimbits differ
    assert det.vthreshold.get(use_monitor=False) == -1       # chip vcmp differ
    set_and_check(det.vthreshold, 1100)
    assert det.threshold_energy.get(use_monitor=False) == -1
    assert det.settings_rbv.get(use_monitor=False) == "undefined"
    assert list(det.vcmp.get(use_monitor=False)) == [1100] * 8


def test_abort_stops_a_long_acquisition_and_keeps_the_frames_taken(det):
    set_and_check(det.frames, 20)
    set_and_check(det.exptime, 1.0)                 # 20 world seconds, 4 s at the test's speed
    det.stage()
    try:
        status = det.trigger()
        deadline = time.monotonic() + 3.0             # stop once a frame is in, well before the 20th
        while det.images_counter.get(use_monitor=False) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        det.stop()
        status.wait(10)
        taken = det.images_counter.get(use_monitor=False)
        assert det.detector_state.get(use_monitor=False) == "Aborted"
        assert 1 <= taken < 20
        path = det.full_file_name.get(use_monitor=False)
    finally:
        det.unstage()
    with h5py.File(path, "r", swmr=True) as f:
        assert f["/entry/data/data"].shape[0] == taken


_SWMR_READER = """
import sys, time, h5py
path = sys.argv[1]
with h5py.File(path, "r", swmr=True) as f:
    d = f["/entry/data/data"]
    while d.shape[0] == 0:
        time.sleep(0.01)
        d.refresh()
    print("SEEN", d.shape[0], int(d[0].sum()), flush=True)
"""


def wait_until_idle(det) -> None:
    """Until the IOC has finished (or aborted) its acquisition and takes puts again."""
    wait_for(lambda: det.acquire_rbv.get(use_monitor=False) == "Done", "end of the acquisition")


def test_a_reader_sees_the_frames_of_a_long_acquisition_while_it_runs(det):
    """Another process reading the run's file (HDF5 SWMR, as a live viewer does) sees a long
    acquisition's frames before it ends, though the IOC no longer flushes after every frame."""
    set_and_check(det.frames, 100)
    set_and_check(det.exptime, 1.0)                 # 100 world seconds, 20 s at the test's speed
    det.stage()
    try:
        status = det.trigger()
        path = det.full_file_name.get(use_monitor=False)
        reader = subprocess.Popen([sys.executable, "-c", _SWMR_READER, path],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = reader.stdout.readline()
        during = not status.done
        det.stop()
        status.wait(60)
        reader.wait(60)
        wait_until_idle(det)
        assert line.startswith("SEEN"), reader.stderr.read()
        assert during, "the reader saw the frames only after the acquisition ended"
        assert int(line.split()[2]) > 0             # a whole frame with its counts
    finally:
        det.unstage()


@contextmanager
def _staged_short_then_long(det, trigger_timeout_s: float, exptime: float):
    """The detector staged for one 0.1 s exposure (the trigger's deadline counts from that),
    then set to 20 frames of ``exptime`` world seconds; put back afterwards."""
    set_and_check(det.frames, 1)
    set_and_check(det.exptime, 0.1)
    det.trigger_timeout_s = trigger_timeout_s
    det.stage()
    try:
        set_and_check(det.frames, 20)
        set_and_check(det.exptime, exptime)
        yield
    finally:
        det.trigger_timeout_s = 30.0
        set_and_check(det.frames, 1)
        set_and_check(det.exptime, 0.1)
        det.unstage()


def test_an_acquisition_that_stalls_past_its_timeout_fails_the_trigger(det):
    """The trigger's own timeout (no new frame for trigger_timeout_s past the exposures
    staged) fails the status with the PVs to look at; a later acquisition is not held up."""
    with _staged_short_then_long(det, 0.5, 30.0):   # no frame for 6 s at the X-ray world's 5x
        status = det.trigger()
        with pytest.raises(EigerError, match="no new frame within 0.5 s.*DetectorState"):
            status.wait(60)
        det.stop()
        wait_until_idle(det)
        set_and_check(det.frames, 1)
        set_and_check(det.exptime, 0.1)
        det.trigger_timeout_s = 30.0
        det.trigger().wait(60)                      # the next trigger is served at once


def test_an_acquisition_that_keeps_taking_frames_outlives_the_trigger_timeout(det):
    """A big detector may write frames slower than it exposes them: a trigger fails only when
    the frames stop coming, not when the staged exposures are over."""
    with _staged_short_then_long(det, 1.5, 1.0):    # 4 s at the X-ray world's 5x, a frame a 0.2 s
        before = int(det.array_counter.get())
        det.trigger().wait(120)
        assert int(det.array_counter.get(use_monitor=False)) == before + 20


def test_a_detector_that_stops_answering_fails_the_trigger_with_the_reason(lab, det):
    det.stage()
    try:
        lab.backend("eiger").unresponsive = True
        status = det.trigger()
        with pytest.raises(EigerError, match="no answer from beb058.*power-cycle"):
            status.wait(10)
    finally:
        lab.backend("eiger").unresponsive = False
        det.unstage()
    assert det.connected_rbv.get(use_monitor=False) in (0, 1)   # the poll loop recovers


def test_an_acquisition_that_cannot_write_its_file_is_refused(det, tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    det.file_per_trigger = True
    det.stage()
    try:
        set_and_check(det.file_path, str(tmp_path / "a_file" / "frames"))
        counter = det.array_counter.get(use_monitor=False)
        with pytest.raises(InstrumentRefused, match="cannot create FilePath .*a_file/frames"):
            det.trigger().wait(10)
        assert det.array_counter.get(use_monitor=False) == counter
        assert det.detector_state.get(use_monitor=False) == "Error"
    finally:
        det.file_per_trigger = False
        det.unstage()
