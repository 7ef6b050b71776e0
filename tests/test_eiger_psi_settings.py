"""PSI's own published EIGER settings (slsDetectorPackage ``settingsdir/eiger``), read from a
checkout named by CALBENCH_PSI_SETTINGSDIR; skipped without one:

    git clone --depth 1 https://github.com/slsdetectorgroup/slsDetectorPackage
    CALBENCH_PSI_SETTINGSDIR=$PWD/slsDetectorPackage/settingsdir/eiger pytest tests/test_eiger_psi_settings.py

Every trim file of every layout PSI ships reads and says its layout; the calibration files with
their tau line read, the one-line ones are refused; and the threshold interpolation between PSI's
trim energies equals a C build of slsDetectorPackage's formula on every pixel."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from calbench.analysis.eiger_files import CalibrationFileError, read_calibration_text
from calbench.contracts.trimfile import (DAC_NAMES, INTERPOLATED_DACS, LAYOUT_DACS,
                                         LAYOUT_DACS_IODELAY, LAYOUT_DACS_IODELAY_TAU,
                                         TRIM_FILE_LAYOUTS, interpolate_trim,
                                         linear_interpolation, read_trim_file, round_half_away)
import eiger_upstream

SETTINGS = Path(os.environ.get("CALBENCH_PSI_SETTINGSDIR", "/nonexistent"))
pytestmark = pytest.mark.skipif(
    not (SETTINGS / "standard" / "4500eV").is_dir(),
    reason="PSI's settings are not here: clone github.com/slsdetectorgroup/slsDetectorPackage and "
           "set CALBENCH_PSI_SETTINGSDIR to its settingsdir/eiger")


def _trim_files():
    return sorted(p for p in SETTINGS.rglob("*") if p.is_file()
                  and (p.name.startswith(("noise.sn", "eigernoise.sn", "settings.sn"))
                       or p.suffix == ".trim"))


def test_every_trim_file_psi_ships_reads_in_its_layout():
    files = _trim_files()
    assert len(files) >= 20
    layouts = {}
    for path in files:
        tf = read_trim_file(path)
        assert tf.layout == TRIM_FILE_LAYOUTS[path.stat().st_size], path
        layouts.setdefault(tf.layout, []).append(path.relative_to(SETTINGS))
        assert tf.trimbits.shape == (256, 1024)
    assert set(layouts) == {LAYOUT_DACS_IODELAY_TAU, LAYOUT_DACS_IODELAY, LAYOUT_DACS}
    old = read_trim_file(SETTINGS / "standard" / "noise.sn031")
    assert (old.layout, old.iodelay, old.tau_ns, old.dac("vrpreamp")) == \
        (LAYOUT_DACS_IODELAY, 651, 0, 3300)
    oldest = read_trim_file(SETTINGS / "highgain" / "settings.snbeb045")
    assert (oldest.layout, oldest.iodelay, oldest.tau_ns) == (LAYOUT_DACS, None, 0)
    current = read_trim_file(SETTINGS / "standard" / "4500eV" / "noise.sn031")
    assert (current.dac("vrpreamp"), current.iodelay, current.tau_ns) == (3422, 660, 540)


def test_calibration_files_with_tau_read_and_one_line_files_are_refused():
    read = refused = 0
    for path in sorted(SETTINGS.rglob("calibration.sn*")):
        if len(path.read_text().split("\n")) >= 4:
            m, k, tau = read_calibration_text(path)
            assert m.shape == (4,) and np.all(k > 0) and tau == 410
            read += 1
        else:
            with pytest.raises(CalibrationFileError, match="1 chip line"):
                read_calibration_text(path)
            refused += 1
    assert read >= 6 and refused >= 2


@pytest.mark.parametrize("energy, e1, e2", [(5650, 5400, 6400), (4950, 4500, 5400),
                                             (6000, 5400, 6400)])
def test_interpolation_of_psis_trim_files_equals_upstream_on_every_pixel(tmp_path, energy, e1, e2):
    exe = eiger_upstream.build(tmp_path)
    for serial in ("031", "032"):
        a = read_trim_file(SETTINGS / "standard" / f"{e1}eV" / f"noise.sn{serial}")
        b = read_trim_file(SETTINGS / "standard" / f"{e2}eV" / f"noise.sn{serial}")
        out = interpolate_trim(energy, e1, a, e2, b)
        np.testing.assert_array_equal(
            out.trimbits, eiger_upstream.interpolate(exe, energy, e1, e2, a.trimbits, b.trimbits))
        upstream = eiger_upstream.interpolate(exe, energy, e1, e2, a.dacs, b.dacs)
        for i, name in enumerate(DAC_NAMES):       # the others are copied from the first file
            assert out.dacs[i] == (upstream[i] if name in INTERPOLATED_DACS else a.dacs[i]), name
        assert out.tau_ns == linear_interpolation(energy, e1, e2, a.tau_ns, b.tau_ns) == \
            eiger_upstream.interpolate(exe, energy, e1, e2, a.tau_ns, b.tau_ns)
        # the former formula round(k*E + y1 - k*E1) rounds some .5 ties the other way
        k = (b.trimbits - a.trimbits.astype(float)) / (e2 - e1)
        former = round_half_away(k * energy + a.trimbits - k * e1)
        if energy == 5650:                  # a quarter of the way: every difference 2 mod 4 ties
            assert np.sum(former != out.trimbits) > 10_000      # 12,118 and 10,919 pixels
