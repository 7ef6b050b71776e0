"""EIGER calibration pieces without IOCs: the vrf edge, energy calibration, PSI file formats, the
document callbacks (frames from HDF5 files named by StreamResource documents) and the live plots."""
from __future__ import annotations

import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest
from event_model import compose_run
from hypothesis import given, settings
from hypothesis import strategies as st

from calbench.analysis.eiger_calibration import (CalibrationError, ChipInflections,
                                                 analyse_vrf_scan, fit_energy_calibration,
                                                 fit_vrf_edge, trimbit_statistics)
from calbench.analysis.eiger_callbacks import (ChipCurvesPlot, StepAnalysis, VrfScanPlot,
                                               path_from_uri)
from calbench.analysis.eiger_files import (CalibrationFileError, chips_in_file_order,
                                           read_calibration_text, write_calibration_text,
                                           write_result_arrays, write_trim_files)
from calbench.contracts.eiger_geometry import geometry
from calbench.contracts.trimfile import DAC_NAMES, read_trim_file
from scipy.special import ndtr


def _edge_counts(x, centres, g, rng, plateau=800.0, width=60.0):
    """Poisson counts of half modules whose summed counts rise around ``centres`` (vrf DAC)."""
    counts = np.zeros(g.shape + (x.size,))
    for hm, c in enumerate(centres):
        rs, cs = g.half_module_slice(hm)
        counts[rs, cs, :] = plateau * ndtr((x - c) / width)
    return rng.poisson(counts)


def test_vrf_edge_and_exposure_are_recovered_from_counts():
    g = geometry("500k")
    x = np.arange(2500, 3700, 30)
    rng = np.random.default_rng(1)
    counts = _edge_counts(x, [3044.0, 3101.0], g, rng)
    counts[10, 10, :] = 20000                    # a hot pixel in the top half module
    r = analyse_vrf_scan(x, counts, g, 0.1)
    assert abs(r.vrf[0] - 3044) <= 5 and abs(r.vrf[1] - 3101) <= 5
    assert r.cleaned[10, 10] and r.cleaned.sum() == 1
    # ~1000 counts at the inflection: at the step nearest its vrf each half module counts ~400
    assert 0.1 * 1000 / 450 < r.exptime_s < 0.1 * 1000 / 350


def test_a_vrf_edge_outside_the_scan_is_refused_with_the_remedy():
    x = np.arange(2500, 3700, 30)
    y = 1e6 * ndtr((x - 3800.0) / 60.0)
    with pytest.raises(CalibrationError, match="widen the scan"):
        fit_vrf_edge(x, y)
    with pytest.raises(CalibrationError, match="no photons"):
        fit_vrf_edge(x, np.zeros(x.size))


def _line(target, energy, mu):
    return ChipInflections(target=target, energy_keV=energy, x=np.zeros(1), sums=np.zeros((1, 1)),
                           fit=np.zeros(1), mu=np.asarray(mu, float))


def test_energy_calibration_inverts_vcmp_equals_m_minus_k_e():
    m = np.array([2360.0, 2334.0, 2362.0, 2350.0])
    k = np.array([147.8, 147.7, 147.5, 144.5])
    cal = fit_energy_calibration([_line("Cu", 8.02, m - k * 8.02), _line("Ge", 9.9, m - k * 9.9)])
    np.testing.assert_allclose(cal.m, m)
    np.testing.assert_allclose(cal.k, k)
    np.testing.assert_allclose(cal.energy(m - k * 5.0, np.arange(4)), 5.0)
    low, high = cal.threshold_range((100, 1900))
    assert low == pytest.approx(np.max((m - 1900) / k)) and high == pytest.approx(
        np.min((m - 100) / k))
    with pytest.raises(CalibrationError, match="two different XRF lines"):
        fit_energy_calibration([_line("Cu", 8.02, m)])
    with pytest.raises(CalibrationError, match="k > 0"):
        fit_energy_calibration([_line("Cu", 8.02, m), _line("Ge", 9.9, m + 10)])


def test_calibration_text_lists_chips_in_vcmp_order_top_0_3_bottom_7_4(tmp_path):
    g = geometry("500k")
    assert chips_in_file_order(g, 0) == [0, 1, 2, 3]
    assert chips_in_file_order(g, 1) == [7, 6, 5, 4]
    m = 2300 + np.arange(8.0)
    k = 140 + np.arange(8.0)
    cal = fit_energy_calibration([_line("Cu", 8.02, m - k * 8.02), _line("Ge", 9.9, m - k * 9.9)])
    top, bottom = write_calibration_text(tmp_path, cal, g, ["058", "059"])
    assert top.name == "calibration.sn058" and bottom.name == "calibration.sn059"
    assert top.read_text().splitlines()[0] == "2300.00 140.00"
    assert bottom.read_text().splitlines()[0] == "2307.00 147.00"


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.floats(1000, 4000), st.floats(50, 400)), min_size=4, max_size=4))
def test_calibration_text_round_trips_to_two_decimals(tmp_path_factory, mk):
    g = geometry("250k")
    m, k = np.array(mk).T
    cal = fit_energy_calibration([_line("Cu", 8.02, m - k * 8.02), _line("Ge", 9.9, m - k * 9.9)])
    (path,) = write_calibration_text(tmp_path_factory.mktemp("cal"), cal, g, ["058"])
    m2, k2, tau = read_calibration_text(path)
    np.testing.assert_allclose(m2, cal.m, atol=0.0051)
    np.testing.assert_allclose(k2, cal.k, atol=0.0051)
    assert tau is None


PSI_FILES = Path(__file__).parent / "data" / "psi"


def test_psis_calibration_file_with_its_tau_line_is_read():
    m, k, tau = read_calibration_text(PSI_FILES / "calibration.sn031")
    np.testing.assert_array_equal(m, [3851.3, 3850.95, 3845.29, 3645.21])
    np.testing.assert_array_equal(k, [517.439, 521.812, 518.808, 484.783])
    assert tau == 410


def test_psis_one_line_calibration_file_is_not_a_half_module():
    with pytest.raises(CalibrationFileError,
                       match=r"calibration.snbeb045: 1 chip line\(s\) \(chip lines: 1\); a half "
                             "module's calibration has 4"):
        read_calibration_text(PSI_FILES / "calibration.snbeb045")


GOOD = "2300.00 140.00\n2310.00 141.00\n2320.00 142.00\n2330.00 143.00\n"


@pytest.mark.parametrize("text, line, reason", [
    ("2300.00 140.00\n", None, r"1 chip line\(s\) \(chip lines: 1\)"),
    (GOOD + "2340.00 144.00\n", 5, "a fifth chip line"),
    (GOOD.replace("141.00", "-141.00"), 2, "slope k = -141 DAC/keV is not positive"),
    (GOOD.replace("142.00", "-1.6e+251"), 3, r"slope k = -1.6e\+251 DAC/keV is not positive"),
    (GOOD.replace("142.00", "1.6e+251"), 3, "absurd for a 12-bit vcmp"),
    (GOOD.replace("2330.00", "nan"), 4, "not finite"),
    (GOOD.replace("2310.00", "inf"), 2, "not finite"),
    (GOOD.replace("2300.00", "-50.00"), 1, "no positive threshold energy for vcmp 0..4000"),
    (GOOD.replace("140.00", "0.001"), 1, "threshold of 2.3e\\+06 keV at vcmp 0, an absurd"),
    (GOOD + "410.5\n", 5, "tau 410.5 ns must be a whole number"),
    (GOOD + "-3\n", 5, "tau -3 ns must be a whole number of ns in 0..10000"),
    (GOOD + "410\n1\n", 6, "follows the tau line"),
    ("410\n" + GOOD, 1, "not 'm k'"),
])
def test_malformed_or_impossible_calibrations_are_refused_naming_line_and_reason(
        tmp_path, text, line, reason):
    path = tmp_path / "calibration.sn058"
    path.write_text(text)
    where = f"calibration.sn058:{line}: " if line else "calibration.sn058: "
    with pytest.raises(CalibrationFileError, match=where.replace(".", r"\.") + ".*" + reason):
        read_calibration_text(path)


@settings(max_examples=50, deadline=None)
@given(text=st.text(alphabet="0123456789.-+e \nainf", max_size=120))
def test_any_text_reads_as_four_sensible_chips_or_is_refused_by_line(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cal") / "calibration.sn058"
    path.write_text(text)
    try:
        m, k, tau = read_calibration_text(path)
    except CalibrationFileError as exc:
        assert str(exc).startswith(f"{path}:") and len(str(exc)) < 400
        return
    assert m.shape == k.shape == (4,)
    assert np.all(np.isfinite(m)) and np.all(k > 0) and np.all(m > 0)
    assert tau is None or 0 <= tau <= 10000


def test_a_malformed_calibration_file_names_the_line(tmp_path):
    path = tmp_path / "calibration.sn058"
    path.write_text("2300.00 140.00\n2300.00\n")
    with pytest.raises(ValueError, match="calibration.sn058:2:.*not 'm k'"):
        read_calibration_text(path)


def test_trim_files_hold_each_half_modules_dacs_and_its_slice_of_the_trimbits(tmp_path):
    g = geometry("500k")
    table = np.tile(np.arange(17)[:, None] * 10, (1, 2))
    table[DAC_NAMES.index("vrpreamp")] = [3044, 3101]
    tb = np.random.default_rng(3).integers(0, 64, g.shape)
    top, bottom = write_trim_files(tmp_path / "T63_CuXRF_gain5", g, table, 200, tb, ["058", "059"])
    a, b = read_trim_file(top), read_trim_file(bottom)
    assert (a.dac("vrpreamp"), b.dac("vrpreamp")) == (3044, 3101)
    assert a.iodelay == 160 and a.tau_ns == 200
    np.testing.assert_array_equal(a.trimbits, tb[256:512])
    np.testing.assert_array_equal(b.trimbits, tb[0:256])


def test_result_arrays_have_one_event_axis_and_bools_as_bytes(tmp_path):
    paths = write_result_arrays(tmp_path / "r.h5", {"mu": np.ones((4, 5)),
                                                   "bad": np.eye(4, 5, dtype=bool)})
    with h5py.File(tmp_path / "r.h5") as f:
        assert f[paths["mu"]].shape == (1, 4, 5)
        assert f[paths["bad"]].dtype == np.uint8 and f[paths["bad"]][0].sum() == 4


def test_a_derived_run_lets_go_of_its_arrays_once_written(tmp_path):
    """The RunEngine holds every object a plan reads until the plan ends: a derived run of a
    map that is a view of a fit map (a 9M's is ~1 GB) must not keep the fit map alive through
    the rest of the procedure, and its file and documents still carry the map."""
    import gc
    import weakref

    from bluesky import RunEngine

    from calbench.plans.derived_runs import record_results
    docs = []
    alive = []

    def plan():
        fit = np.zeros((16, 32), dtype=[("mu", "f8"), ("sigma", "f8")])
        fit["mu"] = np.arange(fit.size).reshape(fit.shape)
        ref = weakref.ref(fit)
        yield from record_results({"vcmp": [1, 2]}, {"mu": fit["mu"]}, tmp_path / "r.h5",
                                  md={"parent_uid": "p", "analysis": "test"})
        del fit
        gc.collect()
        alive.append(ref() is not None)

    RE = RunEngine({})
    RE(plan(), lambda name, doc: docs.append((name, doc)))
    assert alive == [False]
    desc = next(d for n, d in docs if n == "descriptor")
    assert desc["data_keys"]["mu"]["shape"] == [16, 32]
    resource = next(d for n, d in docs if n == "stream_resource")
    with h5py.File(tmp_path / "r.h5") as f:
        np.testing.assert_array_equal(f[resource["parameters"]["dataset"]][0],
                                      np.arange(512).reshape(16, 32))


# -- callbacks on documents ------------------------------------------------------------------------

def _vrf_run_documents(tmp_path, x, frames, *, exit_status="success"):
    """Documents of a vrf scan whose frames are one HDF5 file per point, as the detector writes."""
    bundle = compose_run(metadata={"step": "vrf_scan", "geometry": "250k", "exptime_s": 0.1,
                                   "x_key": "eiger_dacs_vrpreamp", "image_key": "eiger_image",
                                   "chip_sums_key": "eiger_chip_sums", "target": "Cu"})
    g = geometry("250k")
    desc = bundle.compose_descriptor(name="primary", data_keys={
        "eiger_dacs_vrpreamp": {"source": "sim", "dtype": "number", "shape": []},
        "eiger_chip_sums": {"source": "sim", "dtype": "array", "shape": [4]},
        "eiger_image": {"source": "sim", "dtype": "array", "shape": list(g.shape),
                        "external": "STREAM:"}})
    docs = [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc)]
    for i, (v, frame) in enumerate(zip(x, frames)):
        path = tmp_path / f"frame_{i}.h5"
        with h5py.File(path, "w") as f:
            f["/entry/data/data"] = frame[None]
        res = bundle.compose_stream_resource(
            mimetype="application/x-hdf5",
            uri=path.as_uri().replace("file:///", "file://localhost/"),
            data_key="eiger_image", parameters={"dataset": "/entry/data/data"})
        datum = res.compose_stream_datum(indices={"start": 0, "stop": 1})
        datum["descriptor"] = desc.descriptor_doc["uid"]
        datum["seq_nums"] = {"start": i + 1, "stop": i + 2}
        docs += [("stream_resource", res.stream_resource_doc), ("stream_datum", datum),
                 ("event", desc.compose_event(data={"eiger_dacs_vrpreamp": float(v),
                                                    "eiger_chip_sums": g.chip_sums(frame)},
                                              timestamps={"eiger_dacs_vrpreamp": 0,
                                                          "eiger_chip_sums": 0}, seq_num=i + 1))]
    docs.append(("stop", bundle.compose_stop(exit_status=exit_status)))
    return docs


@pytest.fixture
def vrf_documents(tmp_path):
    g = geometry("250k")
    x = np.arange(2500, 3700, 30)
    counts = _edge_counts(x, [3044.0], g, np.random.default_rng(5))
    frames = np.moveaxis(counts, -1, 0).astype(np.uint16)
    return x, frames, lambda **kw: _vrf_run_documents(tmp_path, x, frames, **kw)


def test_step_analysis_reads_the_frames_the_stream_resources_name(vrf_documents):
    x, frames, documents = vrf_documents
    analysis = StepAnalysis()
    for name, doc in documents():
        analysis(name, doc)
    assert analysis.error == ""
    np.testing.assert_array_equal(analysis.data_used.frames, frames)
    np.testing.assert_array_equal(analysis.data_used.x, x)
    assert abs(analysis.result.vrf[0] - 3044) <= 5


def test_step_analysis_of_a_failed_scan_reports_instead_of_raising(vrf_documents):
    _, _, documents = vrf_documents
    analysis = StepAnalysis()
    for name, doc in documents(exit_status="fail"):
        analysis(name, doc)
    assert analysis.result is None and "fail" in analysis.error


def test_live_vrf_plot_fits_the_edge_while_the_scan_runs(vrf_documents):
    _, _, documents = vrf_documents
    plot = VrfScanPlot(figure_label=f"vrf {uuid.uuid4().hex[:6]}")
    for name, doc in documents():
        plot(name, doc)
    label = plot.fits[0].get_label()
    assert label.startswith("vrf ") and abs(float(label.split()[1]) - 3044) <= 5
    assert len(plot.lines[0].get_xdata()) == 40


def test_live_chip_curves_plot_fits_each_chip_when_the_scan_stops(tmp_path):
    g = geometry("250k")
    x = np.arange(0, 2001, 40)
    mu = np.array([1150.0, 1175.0, 1200.0, 1225.0])
    frames = np.empty((x.size,) + g.shape)
    for chip in range(4):
        sl = g.chip_slice(chip)
        frames[(slice(None),) + sl] = (1000 * ndtr((x - mu[chip]) / 120.0))[:, None, None]
    docs = _vrf_run_documents(tmp_path, x, frames.astype(np.uint32))
    docs[0][1]["step"] = "scurve"
    plot = ChipCurvesPlot(figure_label=f"chips {uuid.uuid4().hex[:6]}")
    for name, doc in docs:
        if name == "event":
            doc["data"]["eiger_vthreshold"] = doc["data"].pop("eiger_dacs_vrpreamp")
        if name == "start":
            doc["x_key"] = "eiger_vthreshold"
        plot(name, doc)
    fitted = [float(line.get_label().split("mu ")[1]) for line in plot.lines]
    np.testing.assert_allclose(fitted, mu, atol=2)


def test_frames_must_be_local_files():
    with pytest.raises(ValueError, match="not a local file"):
        path_from_uri("https://example.org/frames.h5")
    assert str(path_from_uri("file://localhost/data/f.h5")) == "/data/f.h5"


def test_trimstats_command_names_the_layout_and_the_trimbit_statistics(tmp_path, capsys):
    from calbench.cli import main
    tb = np.full((256, 1024), 32, "<i4")
    tb[0, :3] = 0                   # 3 pixels on rail 0, one on 63
    tb[1, 0] = 63
    tb[:, 256:512] = 30             # chip 1 two trimbits lower
    tb[0, 300] = 0
    old = tmp_path / "noise.sn031"
    old.write_bytes(np.arange(17, dtype="<i4").tobytes() + tb.tobytes())     # 16 DACs + iodelay
    assert main(["eiger", "trimstats", str(old)]) == 0
    out = capsys.readouterr().out
    assert "16 DACs + iodelay; vrpreamp 2, vtrim 1, iodelay 16, tau 0 ns" in out
    st = trimbit_statistics(tb, geometry("250k"))
    assert (st.at_0, st.at_63) == (4, 1) and st.chip_mean_range == pytest.approx(2.0, abs=0.01)
    assert st.line() in out and "0.002 % at 0" in out
    bad = tmp_path / "noise.sn032"
    bad.write_bytes(b"\0" * 1000)
    assert main(["eiger", "trimstats", str(bad)]) != 0
    assert "1,048,644 bytes (16 DACs + iodelay" in capsys.readouterr().err
