"""QC6 result files: the lab's formats written and read back (hypothesis), the legacy scripts' files
(with their quirks), malformed files named clearly, the Megger sheet, and `calbench qc6 plot`."""
from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calbench.analysis.qc6_files import (
    IvTable, Qc6FileError, StabilityLog, StressTrips, detect_kind, read_iv_file, read_megger_sheet,
    read_stability_file, read_stress_file, result_path, write_iv_file, write_megger_sheet,
    write_stability_file, write_stress_file)
from calbench.analysis.qc6_fits import cumulative_trips, fit_iv
from calbench.analysis.qc6_plots import plot_result_file
from calbench.devices.caen import divider_setpoints

FAST = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
minutes = st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2035, 1, 1)).map(
    lambda d: d.replace(second=0, microsecond=0))


@FAST
@given(rows=st.lists(st.tuples(minutes.map(lambda d: d.replace(second=17)),
                               st.sampled_from([5, 3, 1, 12, 10, 8]),
                               st.floats(0, 1200, allow_nan=False).map(lambda v: round(v, 2))),
                     max_size=12))
def test_stress_file_round_trip(tmp_path, rows):
    trips = StressTrips([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    back = read_stress_file(write_stress_file(tmp_path / "stress_x.txt", trips))
    assert (back.times, back.channels) == (trips.times, trips.channels)
    np.testing.assert_allclose(back.voltages, trips.voltages, atol=0.005)


@FAST
@given(channels=st.sampled_from([[6, 5, 4, 3, 2, 1, 0], [13, 12, 11, 10, 9, 8, 7], [5, 3]]),
       data=st.data())
def test_iv_file_round_trip(tmp_path, channels, data):
    n = data.draw(st.integers(0, 23))
    values = st.floats(-1.0, 1200.0, allow_nan=False)
    v = np.array(data.draw(st.lists(values, min_size=n * len(channels),
                                    max_size=n * len(channels)))).reshape(n, len(channels))
    i = np.array(data.draw(st.lists(values, min_size=n * len(channels),
                                    max_size=n * len(channels)))).reshape(n, len(channels))
    back = read_iv_file(write_iv_file(tmp_path / "iv_scan_x.txt", IvTable(channels, v, i)))
    assert back.channels == channels
    np.testing.assert_allclose(back.voltage_V, v, atol=1e-6)
    np.testing.assert_allclose(back.current_uA, i, atol=1e-6)


@FAST
@given(start=minutes, gaps=st.lists(st.integers(0, 600), max_size=8),
       chans=st.lists(st.lists(st.sampled_from([5, 3, 1]), min_size=1, max_size=3), min_size=8,
                      max_size=8),
       finished=st.booleans())
def test_stability_file_round_trip_and_cumulative_trips(tmp_path, start, gaps, chans, finished):
    t, trips = start, []
    for gap, c in zip(gaps, chans):
        t = t + timedelta(minutes=gap)
        trips.append((tuple(c), t))
    log = StabilityLog(start, trips, t + timedelta(minutes=5) if finished else None)
    back = read_stability_file(write_stability_file(tmp_path / "LStest_x.txt", log))
    assert back == log
    hours, counts = cumulative_trips(back)
    assert counts[-1] == len(trips) and np.all(np.diff(hours) >= 0)


LEGACY_STRESS = """Time , Channel, Voltage of Trip
2024-05-02_14-03-11,5,612.35
2024-05-02_14-20-40,5,598.1
2024-05-02_15-02-09,12,640.0
"""
LEGACY_LS = """Started at 2024-05-02_18-00
Channels, Timestamp
5,2024-05-02_19-30
3,1,2024-05-03_01-15
Test finished at2024-05-03_09-00"""


def test_legacy_files_are_read_including_their_quirks(tmp_path):
    d = tmp_path / "Results" / "GE21-M6" / "LS_test"
    d.mkdir(parents=True)
    (d / "LStest_2024-05-02_18-00.txt").write_text(LEGACY_LS)
    log = read_stability_file(d / "LStest_2024-05-02_18-00.txt")
    assert log.end == datetime(2024, 5, 3, 9, 0)           # "at<date>" without the space
    assert log.trips[1] == ((3, 1), datetime(2024, 5, 3, 1, 15))
    assert detect_kind(d / "LStest_2024-05-02_18-00.txt") == "long"
    hours, counts = cumulative_trips(log)
    assert hours[-1] == pytest.approx(15.0) and counts[-1] == 2    # across midnight
    s = tmp_path / "Results" / "GE21-M6" / "Stress_Test" / "stress_2024-05-02_14-00.txt"
    s.parent.mkdir(parents=True)
    s.write_text(LEGACY_STRESS)
    trips = read_stress_file(s)
    assert list(trips.of_channel(5)) == [612.35, 598.1] and trips.channels[-1] == 12
    png = plot_result_file(s)      # layer-2 channel 12 is GEM 1 (the legacy plot crashed on it)
    assert png == s.parent / "Plots" / "stress_2024-05-02_14-00.png" and png.stat().st_size > 0


@pytest.mark.parametrize("text,match", [
    ("Time , Channel, Voltage of Trip\n2024-05-02,5,600\n", "YYYY-mm-dd_HH-MM-SS"),
    ("CH6Voltage,CH6Current,CH5Voltage\n1,2,3\n", "CH<n>Voltage,CH<n>Current"),
    ("CH6Voltage,CH6Current\n1,abc\n", "not a number"),
    ("Started at yesterday\n", "YYYY-mm-dd_HH-MM"),
    ("hello world\n", "matches no QC6 result format"),
])
def test_malformed_files_name_the_line_and_the_expected_format(tmp_path, text, match):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(Qc6FileError, match=match):
        kind = detect_kind(path)
        {"stress": read_stress_file, "iv": read_iv_file}.get(kind, read_stability_file)(path)


def test_iv_fit_recovers_resistance_and_offset():
    rng = np.random.default_rng(3)
    v = np.linspace(0, 550, 23)
    i = v / 17.0e3 + 0.003 + rng.normal(0, 5e-4, v.size)      # 17 GOhm, 3 nA offset
    fit = fit_iv(v, i, channel=5)
    assert fit.resistance_GOhm == pytest.approx(17.0, rel=0.05)
    assert fit.offset_uA == pytest.approx(0.003, abs=5e-4) and fit.n_points == 22
    with pytest.raises(ValueError, match="2 distinct voltages"):
        fit_iv([0.0, 0.0], [0.0, 0.0])


def test_divider_emulation_matches_the_reference_values():
    v = divider_setpoints(4600.0)
    ref = {"drift": 1101.5, "g1t": 548.3, "g1b": 428.9, "g2t": 538.5, "g2b": 856.7,
           "g3t": 514.0, "g3b": 612.0}
    for electrode, volts in ref.items():
        assert v[electrode] == pytest.approx(volts, abs=0.06)
    assert sum(v.values()) == pytest.approx(4600.0)
    capped = divider_setpoints(4600.0, {"drift": 1000.0})
    assert capped["drift"] == 1000.0 and capped["g1t"] == v["g1t"]


def test_megger_sheet_layout(tmp_path):
    path = result_path(tmp_path, "GE21-M7", "megger", datetime(2025, 1, 22, 9, 30).timestamp())
    assert path.name == "Megger_Test_2025-01-22_09-30.xlsx"
    assert result_path(tmp_path, "GE21-M7", "megger", datetime(2025, 1, 22, 9, 30).timestamp()) \
        == path                    # not written yet: the same name
    write_megger_sheet(path, [12.5, 9.0, 30.25], [0, 2, 1], comments="foil 2 sparked",
                       detector_name="GE21-M7")
    from openpyxl import load_workbook
    ws = load_workbook(path)["MEGGER Test (at 550 V)"]
    assert (ws["B5"].value, ws["C5"].value) == ("Impedance (GΩ)", "Number of Sparks (1 min.)")
    assert [ws.cell(row=r, column=1).value for r in (6, 7, 8)] == ["GEM 1", "GEM 2", "GEM 3"]
    assert ws["A10"].value == "COMMENTS"
    assert read_megger_sheet(path) == {"impedance_GOhm": [12.5, 9.0, 30.25], "sparks": [0, 2, 1],
                                       "comments": "foil 2 sparked", "detector_name": "GE21-M7"}
    assert result_path(tmp_path, "GE21-M7", "megger",
                       datetime(2025, 1, 22, 9, 30).timestamp()).name.endswith("_2.xlsx")


def test_calbench_qc6_plot_cli_writes_plots_dir_png(tmp_path):
    d = tmp_path / "Results" / "Detector1" / "IV_Scan"
    d.mkdir(parents=True)
    iv = d / "iv_scan_2024-05-02_10-00.txt"
    v = np.outer(np.arange(1, 24) * 200 / 4.698, [1.125, 0.56, 0.438, 0.55, 0.875, 0.525, 0.625])
    write_iv_file(iv, IvTable([6, 5, 4, 3, 2, 1, 0], v, v / 20e3))
    bad = d / "notes.txt"
    bad.write_text("not a result\n")
    out = subprocess.run([sys.executable, "-m", "calbench.cli", "qc6", "plot", str(iv), str(bad)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr          # one file could not be plotted
    assert (d / "Plots" / "iv_scan_2024-05-02_10-00.png").stat().st_size > 0
    assert "notes.txt" in out.stderr and "matches no QC6 result format" in out.stderr
