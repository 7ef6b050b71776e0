"""The BatMet sink analysis: quadratic fit, csink line, the lab's `DAC<TAB>current` files, plots."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calbench.analysis.batmet import (CalibrationFileError, csink_line, fit_sink, format_point,
                                      plot_sink_fit, read_calibration_file, setting_accuracy,
                                      write_calibration_file)

# the lab's README: `./collect.py | tee calibration_d_i.txt`
README_LINES = """450\t5.1925633333333336e-05
630\t0.14030770666666667
640\t0.15371349666666667
650\t0.16676064
660\t0.17984219
670\t0.19308439666666669
2790\t2.9714523666666666
2800\t2.9835309666666667
2810\t2.9965467666666665
2820\t3.0102106
"""


def synthetic_scan(a, b, c, *, noise_A=0.0, seed=0, quiescent_A=5.2e-5):
    """A sink scan from a known transfer: DAC 450..4090 by 10 until 3 A, a dead zone below c."""
    dac = np.arange(450, 4100, 10, dtype=float)
    e = np.maximum(dac - c, 0.0)
    current = 2 * e / (b + np.sqrt(b * b + 4 * a * e)) + quiescent_A
    current += np.random.default_rng(seed).normal(0.0, noise_A, dac.size)
    n = int(np.argmax(current > 3.0)) + 1
    return dac[:n], current[:n]


def test_reference_csink_line_and_its_3A_check():
    line = csink_line(0.209938, 762.136354, 522.857571)
    assert line == "csink 0 4 0.209938 762.136354 522.857571"
    # the reference's check: 3 A needs DAC 2811, which the README data shows (2810 -> 2.9965 A)
    assert round(0.209938 * 9 + 762.136354 * 3 + 522.857571) == 2811
    with pytest.raises(ValueError, match="need 0 <= min < max"):
        csink_line(0.2, 762.0, 522.0, 4.0, 0.0)


@pytest.mark.parametrize("a, b, c", [(0.209938, 762.136354, 522.857571), (0.0, 750.0, 510.0),
                                     (-0.3, 775.0, 530.0)])
def test_fit_recovers_a_known_transfer(a, b, c):
    dac, current = synthetic_scan(a, b, c, noise_A=2e-5, seed=1)
    fit = fit_sink(dac, current)
    # the quiescent current (52 uA) shifts c by b * 52e-6 = 0.04 codes
    assert fit.b == pytest.approx(b, rel=1e-4)
    assert fit.c == pytest.approx(c - b * 5.2e-5, abs=0.05)
    assert fit.a == pytest.approx(a, abs=0.02)
    assert fit.rms_error_A == pytest.approx(2e-5, rel=0.3)       # the noise we put in
    assert fit.n_dropped == int(np.sum(dac <= c))                 # the dead zone
    # current_for inverts dac_for
    grid = np.linspace(0.01, 3.0, 50)
    np.testing.assert_allclose(fit.current_for(fit.dac_for(grid)), grid, atol=1e-12)


def test_dead_zone_rows_are_dropped_until_the_current_first_exceeds_0p1_mA():
    dac, current = synthetic_scan(0.21, 762.1, 522.9)
    current = current.copy()
    current[1] = 3e-4             # a glitch inside the dead zone starts the fitted range early
    fit = fit_sink(dac, current)
    assert fit.dac[0] == dac[1]
    assert np.all(fit.current_A > 1e-4)
    valid = np.ones(dac.size, bool)
    valid[-1] = False             # e.g. the supply clamped the last point
    assert fit_sink(dac, current, valid=valid).dac[-1] == dac[-2]


def test_fit_refuses_what_is_not_a_sink_scan():
    dac = np.arange(450, 600, 10)
    with pytest.raises(ValueError, match="never conducted"):
        fit_sink(dac, np.full(dac.size, 5e-5))
    with pytest.raises(ValueError, match="only 2 usable points"):
        fit_sink(dac, np.r_[np.full(dac.size - 2, 5e-5), 0.01, 0.02])
    with pytest.raises(ValueError, match="not a finite number"):
        fit_sink([450, 460, 470, 480, 490], [0.1, 0.2, np.nan, 0.4, 0.5])
    with pytest.raises(ValueError, match="equal length"):
        fit_sink([450, 460], [0.1])
    with pytest.raises(ValueError, match="does not rise with current"):
        fit_sink(np.arange(10) * 10.0 + 450, np.linspace(1.0, 0.1, 10))


def test_readme_file_reads_and_fits(tmp_path):
    path = tmp_path / "calibration_d_i.txt"
    path.write_text(README_LINES)
    dac, current = read_calibration_file(path)
    assert dac.tolist()[:3] == [450, 630, 640] and current[0] == 5.1925633333333336e-05
    fit = fit_sink(dac, current)
    # two clusters of points leave the curvature loose, but the ends are pinned: the lab's
    # calibration (csink 0 4 0.209938 762.136354 522.857571) agrees within 2 codes at both
    lab = np.poly1d([0.209938, 762.136354, 522.857571])
    for amps in (0.15, 3.0):
        assert fit.dac_for(amps) == pytest.approx(lab(amps), abs=2.0)
    assert fit.max_error_A < 1e-3


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.floats(-1.0, 4.0, allow_nan=False)),
                min_size=1, max_size=60))
def test_calibration_file_round_trip(tmp_path_factory, steps):
    """Whatever `collect` writes, `fit -c` reads back exactly (codes and float currents)."""
    dac = np.cumsum([s for s, _ in steps])
    dac = dac[dac <= 4095]
    current = np.array([c for _, c in steps])[:dac.size]
    if dac.size == 0:
        return
    path = tmp_path_factory.mktemp("rt") / "cal.txt"
    write_calibration_file(path, dac, current)
    read_dac, read_current = read_calibration_file(path)
    np.testing.assert_array_equal(read_dac, dac)
    np.testing.assert_array_equal(read_current, current)      # repr() round-trips floats
    assert path.read_text().splitlines()[0] == format_point(dac[0], current[0])


@pytest.mark.parametrize("content, message", [
    ("450\t1e-5\t7\n", r"cal.txt:1: 3 fields"),
    ("450\t1e-5\n460 x\n", r"cal.txt:2: .* is not two numbers"),
    ("4096\t1.0\n", r"cal.txt:1: DAC '4096' is not an integer code in 0..4095"),
    ("450.5\t1.0\n", r"cal.txt:1: DAC '450.5' is not an integer"),
    ("450\tnan\n", r"cal.txt:1: current 'nan' is not a finite number"),
    ("450\t1e-5\n460\t2e-5\n450\t1e-5\n", r"cal.txt:3: DAC 450 after 460: codes must increase"),
    ("# only a comment\n\n", r"has no data lines"),
])
def test_malformed_calibration_files_name_the_line(tmp_path, content, message):
    path = tmp_path / "cal.txt"
    path.write_text(content)
    with pytest.raises(CalibrationFileError, match=message):
        read_calibration_file(path)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(CalibrationFileError, match="not found; collect one with"):
        read_calibration_file(tmp_path / "nothing.txt")
    binary = tmp_path / "cal.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(CalibrationFileError, match="not a text file"):
        read_calibration_file(binary)


def test_plot_and_setting_accuracy(tmp_path):
    dac, current = synthetic_scan(0.21, 762.1, 522.9, noise_A=1e-3, seed=3)
    fit = fit_sink(dac, current)
    path = plot_sink_fit(fit, dac, current, path=tmp_path / "fit.png") and tmp_path / "fit.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".fit.png.*"))          # no temporary left behind
    acc = setting_accuracy([0.5, 1.0, 1.5], [0.501, 0.998, 1.5015])
    assert acc.max_error_A == pytest.approx(2e-3) and acc.rms_error_A == pytest.approx(
        np.sqrt((1e-6 + 4e-6 + 2.25e-6) / 3))
